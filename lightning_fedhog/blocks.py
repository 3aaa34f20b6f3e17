"""Exchange blocks: contiguous slices of the flat vector, one of which an averaging round moves, and the rules that
pick it (Chatterjee et al., ICDCS 2024). The other kind of block in the paper, the partial-backprop partition of the
parameter tensors, is in :mod:`~lightning_fedhog.partitions`.

Everything here is pure. Rules that use run-time information take it as an argument that every leader holds
the same copy of (e.g. change scores summed by the round's all-reduce), so all leaders pick the same block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch

BlockRule = Literal["round_robin", "random", "largest_change"]
BLOCK_RULES: tuple[str, ...] = get_args(BlockRule)


def block_bounds(numel: int, num_blocks: int) -> list[tuple[int, int]]:
    """Cuts ``[0, numel)`` into ``num_blocks`` contiguous slices whose sizes differ by at most one.

    Returns:
        ``[(start, stop), ...]`` covering the vector in order, without gaps or overlaps.
    """
    assert 1 <= num_blocks <= max(numel, 1), (num_blocks, numel)  # `FedHogConfig` refuses other counts
    base, extra = divmod(numel, num_blocks)
    bounds = []
    start = 0
    for index in range(num_blocks):
        stop = start + base + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def next_block(
    rule: BlockRule,
    round_index: int,
    num_blocks: int,
    *,
    seed: int = 0,
    scores: Sequence[float] | None = None,
    last_exchanged: Sequence[int] | None = None,
) -> int:
    """The exchange block of round ``round_index``.

    Args:
        rule: ``"round_robin"``: ``r mod num_blocks``, every block once per cycle. ``"random"``: uniform, from a
            seed all leaders share. ``"largest_change"``: the block whose copies moved most since they were last
            exchanged (``scores``, summed over all leaders), so rounds go where the copies drift apart; a block
            that stays unexchanged keeps accumulating change until it wins. Ties (e.g. no training yet) go to
            the block exchanged longest ago, so the rule falls back to round-robin.
        scores: per-block change, required by ``"largest_change"`` (round 0 has none: block 0).
        last_exchanged: the round each block was last exchanged in (-1: never), for tie-breaking.
    """
    assert rule in BLOCK_RULES, rule  # `FedHogConfig` refuses other names
    if num_blocks == 1:
        return 0
    if rule == "round_robin":
        return round_index % num_blocks
    if rule == "random":
        generator = torch.Generator().manual_seed(seed * 7_919 + round_index)
        return int(torch.randint(num_blocks, (1,), generator=generator))
    if scores is None:
        return round_index % num_blocks
    last = last_exchanged if last_exchanged is not None else [-1] * num_blocks
    return max(range(num_blocks), key=lambda index: (scores[index], -last[index], -index))
