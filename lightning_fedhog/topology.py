"""Gossip peer schedules: which device leader averages with which, round by round.

Every schedule is a *matching*: in each round a leader has at most one peer, and ``i``'s peer is ``j`` exactly
when ``j``'s peer is ``i``, so a round is a set of disjoint pairwise exchanges and preserves the sum of the
devices' vectors. Over one cycle of rounds the union of the pairs connects all leaders, so repeated rounds drive
every copy to the mean. All functions are pure and depend only on values every leader knows.

- ``"exponential"``: the one-peer exponential graph (Assran et al., SGP, ICML 2019; Ying et al., NeurIPS 2021)
  as a hypercube: in round ``r`` leader ``i`` pairs with ``i XOR 2^(r mod ceil(log2 n))``; a leader whose partner
  does not exist (``n`` not a power of two) sits the round out. ``ceil(log2 n)`` rounds connect everyone.
- ``"ring"``: neighbours on a ring, pairs shifted by one every round; ``n`` rounds (2 for even ``n``) cover
  every ring edge.
- ``"random"``: a uniformly random matching per round drawn from a seed all leaders share.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

Topology = Literal["exponential", "ring", "random"]
TOPOLOGIES: tuple[str, ...] = get_args(Topology)


def cycle_length(world_size: int, topology: Topology) -> int:
    """Rounds after which a deterministic schedule repeats (for ``"random"``: the rounds a test should look at)."""
    if world_size <= 1:
        return 1
    if topology == "exponential":
        return max(1, math.ceil(math.log2(world_size)))
    if topology == "ring":
        return 2 if world_size % 2 == 0 else world_size
    return 4 * world_size


def peers(world_size: int, round_index: int, topology: Topology, seed: int = 0) -> list[int | None]:
    """The peer of every leader in ``round_index`` (``None``: no exchange this round)."""
    assert topology in TOPOLOGIES, topology  # `FedHogConfig` refuses other names
    result: list[int | None] = [None] * world_size
    if world_size <= 1:
        return result
    if topology == "exponential":
        distance = 1 << (round_index % cycle_length(world_size, topology))
        for rank in range(world_size):
            partner = rank ^ distance
            result[rank] = partner if partner < world_size else None
        return result
    if topology == "ring":
        shift = round_index % cycle_length(world_size, topology)
        order = [(shift + position) % world_size for position in range(world_size)]
    else:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + round_index)
        order = torch.randperm(world_size, generator=generator).tolist()
    for first, second in zip(order[0::2], order[1::2], strict=False):  # an odd leader out sits the round out
        result[first], result[second] = second, first
    return result
