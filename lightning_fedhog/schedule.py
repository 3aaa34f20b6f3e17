"""When an averaging round starts: the pure pacing rule of the background averaging.

Which block a round exchanges is decided in :mod:`lightning_fedhog.blocks`; with whom, in
:mod:`lightning_fedhog.topology`.
"""

from __future__ import annotations

from typing import Literal


def averaging_period(epoch: int, *, period: int | Literal["auto"], warmup_epochs: int) -> int | Literal["auto"]:
    """Device steps between two rounds in ``epoch``: one during the warm-up epochs, ``period`` after.

    The paper (Sec. V, "pre_post_epochs") averages after every step while the learning rate is high and
    relaxes to every H steps afterwards. A leader only changes its own pace with this; the sequence of rounds
    and blocks stays the same on every leader, so leaders in different epochs still agree.
    """
    return 1 if epoch < warmup_epochs else period
