"""Partial-backprop partitions (LPP-SGD, Chatterjee et al., ICDCS 2024): contiguous groups of a device's parameter
tensors, one per worker; on a partial step worker ``w`` computes and applies gradients only for its block, which
shortens the backward pass and reduces write conflicts between the Hogwild! workers.

Everything here is pure; :mod:`~lightning_fedhog.partial` applies it to a module during training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

Partition = Literal["numel", "compute"]
"""How tensors are split: equal element counts (the paper's) or equal estimated gradient work."""

PARTITIONS: tuple[str, ...] = get_args(Partition)


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
