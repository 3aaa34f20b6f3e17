"""Blocks of the flat vector, the rules that pick the block a round exchanges, and partial-backprop partitions.

Two kinds of block appear in the paper (Chatterjee et al., ICDCS 2024):

- *exchange blocks*: contiguous slices of the flat vector; an averaging round moves one of them.
- *backprop blocks* (LPP-SGD): contiguous groups of parameter tensors; on a partial step worker ``w`` computes
  and applies gradients only for its block, which shortens the backward pass and reduces write conflicts.

Everything here is pure. Rules that use run-time information take it as an argument that every leader holds
the same copy of (e.g. change scores summed by the round's all-reduce), so all leaders pick the same block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch

BlockRule = Literal["round_robin", "random", "largest_change"]
BLOCK_RULES: tuple[str, ...] = get_args(BlockRule)

Partition = Literal["numel", "compute"]
PARTITIONS: tuple[str, ...] = get_args(Partition)


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


# ------------------------------------------------------------------------------------------ partial backprop
def partition_tensors(costs: Sequence[float], num_blocks: int) -> list[range]:
    """Splits tensors ``0..len(costs)-1`` (registration order, input side first) into contiguous blocks whose
    largest total cost is as small as possible (the classic linear-partition dynamic programme).

    With ``costs`` = element counts this is the paper's rule (LPP-SGD: blocks of about equal size). With
    ``costs`` = estimated compute (see :func:`tensor_costs`) the blocks carry about equal gradient work instead:
    a convolution near the input has few weights but applies them at many positions.

    Returns:
        ``num_blocks`` non-empty ranges of tensor indices, in order.
    """
    count = len(costs)
    if num_blocks < 1 or num_blocks > count:
        raise ValueError(
            f"cannot split {count} trainable tensors into {num_blocks} partial-backprop blocks."
            f" HINT: use `workers_per_device` <= {count}, or turn `partial_backprop` off."
        )
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + float(cost))
    inf = float("inf")
    best = [[inf] * (count + 1) for _ in range(num_blocks + 1)]
    cut = [[0] * (count + 1) for _ in range(num_blocks + 1)]
    best[0][0] = 0.0
    for blocks in range(1, num_blocks + 1):
        for stop in range(blocks, count + 1):
            for start in range(blocks - 1, stop):
                value = max(best[blocks - 1][start], prefix[stop] - prefix[start])
                if value < best[blocks][stop]:
                    best[blocks][stop], cut[blocks][stop] = value, start
    ranges, stop = [], count
    for blocks in range(num_blocks, 0, -1):
        start = cut[blocks][stop]
        ranges.append(range(start, stop))
        stop = start
    return ranges[::-1]


def tensor_costs(numels: Sequence[int], positions: Sequence[int], partition: Partition) -> list[float]:
    """Per-tensor cost for :func:`partition_tensors`.

    Args:
        numels: elements of each trainable tensor.
        positions: at how many places each tensor's module applies it per sample (output positions of a
            convolution, 1 for a linear layer), measured on a real batch.
        partition: ``"numel"`` (the paper's element count) or ``"compute"`` (elements x positions, proportional
            to the multiply-adds of the weight gradient and of the activation gradient through that layer).
    """
    assert partition in PARTITIONS, partition  # `FedHogConfig` refuses other names
    if partition == "numel":
        return [float(n) for n in numels]
    return [float(n) * max(int(p), 1) for n, p in zip(numels, positions, strict=True)]


def owned_block(worker: int, epoch: int, num_workers: int, rotate: bool) -> int:
    """The partial-backprop block of ``worker``: its own index, or shifted by one every epoch when rotating.

    Rotation lets every worker train every block over ``K`` epochs, which helps when workers' data shards differ
    (each block then sees every shard's gradients on partial steps too).
    """
    return (worker + epoch) % num_workers if rotate else worker
