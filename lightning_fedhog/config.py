"""The knobs of :class:`~lightning_fedhog.FedHogStrategy`, validated without any process running.

Every rule lives here as plain code so that a unit test can call it directly and a bad value fails at
``Trainer(...)`` construction, long before a worker process is spawned.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, get_args

AveragingMode = Literal["allreduce"]
"""How device leaders mix their copies. Only the global all-reduce of the paper's reference code exists so far."""

_AVERAGING_MODES: tuple[str, ...] = get_args(AveragingMode)


def _require_int(name: str, value: object, minimum: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{name}` must be an integer, got {value!r} ({type(value).__name__}). HINT: {hint}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}. HINT: {hint}")


@dataclass(frozen=True, kw_only=True)
class FedHogConfig:
    """Validated settings of one fedhog run.

    Attributes:
        workers_per_device: K, the number of Hogwild! worker processes that share one parameter copy per device
            (LAP-SGD, Chatterjee et al., ICDCS 2024). The paper uses K=4 per GPU; on CPU, K workers per device
            share that device's cores.
        averaging: how devices mix their copies in the background. ``"allreduce"``: every round, all device
            leaders average one block of the flat parameter vector.
        averaging_period: device steps (optimizer steps summed over the K workers of a device) between two
            averaging rounds once the warm-up is over. The paper's H, 8 to 16.
        averaging_warmup_epochs: during the first this-many epochs a round starts after every device step
            (the paper's ``pre_post_epochs``, about half of training in its recipes), so copies stay close while
            the learning rate is large.
        num_blocks: the flat vector is cut into this many contiguous blocks and one block is exchanged per round,
            round-robin, so a round moves ``1/num_blocks`` of the model.
        timeout: how long a collective (averaging round, consensus barrier) may wait for a peer before the run
            fails with an error naming the peers.
    """

    workers_per_device: int = 2
    averaging: AveragingMode = "allreduce"
    averaging_period: int = 16
    averaging_warmup_epochs: int = 0
    num_blocks: int = 1
    timeout: timedelta = timedelta(minutes=30)

    def __post_init__(self) -> None:
        _require_int(
            "workers_per_device",
            self.workers_per_device,
            1,
            "use 1 for one process per device (no local asynchrony), 2-4 for Hogwild! workers sharing a device.",
        )
        if self.averaging not in _AVERAGING_MODES:
            raise ValueError(
                f"Unknown `averaging={self.averaging!r}`. HINT: choose one of {', '.join(map(repr, _AVERAGING_MODES))}."
            )
        _require_int(
            "averaging_period",
            self.averaging_period,
            1,
            "it counts device steps between averaging rounds; the paper uses 8-16.",
        )
        _require_int(
            "averaging_warmup_epochs",
            self.averaging_warmup_epochs,
            0,
            "use 0 to average every `averaging_period` steps from the start.",
        )
        _require_int("num_blocks", self.num_blocks, 1, "use 1 to exchange the whole vector every round.")
        if not isinstance(self.timeout, timedelta) or self.timeout <= timedelta(0):
            raise ValueError(
                f"`timeout` must be a positive `datetime.timedelta`, got {self.timeout!r}."
                " HINT: e.g. `timeout=timedelta(minutes=10)`."
            )

    def validate_model(self, numel: int) -> None:
        """Checks the settings that depend on the model's size.

        Args:
            numel: number of elements of the flat vector (floating parameters and buffers).
        """
        if numel > 0 and self.num_blocks > numel:
            raise ValueError(
                f"`num_blocks={self.num_blocks}` is larger than the model's {numel} floating elements."
                f" HINT: use `num_blocks` <= {numel}."
            )
