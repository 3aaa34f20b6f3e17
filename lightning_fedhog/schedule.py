"""Pure rules for *what* an averaging round exchanges and *when* it starts.

Every leader evaluates these functions on its own; they depend only on values all leaders agree on (the round
index, the configuration), so every leader issues the same sequence of collectives with the same sizes.
"""

from __future__ import annotations


def block_bounds(numel: int, num_blocks: int) -> list[tuple[int, int]]:
    """Cuts ``[0, numel)`` into ``num_blocks`` contiguous slices whose sizes differ by at most one.

    Args:
        numel: length of the flat vector.
        num_blocks: number of blocks, ``1 <= num_blocks <= numel``.

    Returns:
        ``[(start, stop), ...]`` covering the vector in order, without gaps or overlaps.
    """
    if num_blocks < 1 or num_blocks > max(numel, 1):
        raise ValueError(f"num_blocks must be in [1, {max(numel, 1)}], got {num_blocks}")
    base, extra = divmod(numel, num_blocks)
    bounds = []
    start = 0
    for index in range(num_blocks):
        stop = start + base + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def block_for_round(round_index: int, num_blocks: int) -> int:
    """Round-robin block choice: round ``r`` exchanges block ``r mod num_blocks``.

    The warm-up phase uses the same rule (with a period of one step), so leaders that are in different epochs
    still agree on the block of every round.
    """
    return round_index % num_blocks


def averaging_period(epoch: int, *, period: int, warmup_epochs: int) -> int:
    """Device steps between two rounds in ``epoch``: one during the warm-up epochs, ``period`` after.

    The paper (Sec. V, "pre_post_epochs") averages after every step while the learning rate is high and
    relaxes to every H steps afterwards.
    """
    return 1 if epoch < warmup_epochs else period
