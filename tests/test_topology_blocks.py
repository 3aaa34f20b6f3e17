"""Pure rules: gossip peer schedules, exchange-block rules, partial-backprop partitions."""

from __future__ import annotations

import pytest

from lightning_fedhog.blocks import next_block
from lightning_fedhog.partitions import owned_block, partition_tensors, tensor_costs
from lightning_fedhog.topology import TOPOLOGIES, cycle_length, peers


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5, 6, 7, 8, 12])
def test_every_round_is_a_symmetric_matching_and_a_cycle_connects_everyone(topology: str, world_size: int) -> None:
    parent = list(range(world_size))

    def find(node: int) -> int:
        while parent[node] != node:
            node = parent[node]
        return node

    for round_index in range(cycle_length(world_size, topology)):
        partners = peers(world_size, round_index, topology, seed=3)
        assert len(partners) == world_size
        for rank, peer in enumerate(partners):
            if peer is not None:
                assert peer != rank and partners[peer] == rank, f"round {round_index}: {partners}"
                parent[find(rank)] = find(peer)
    assert len({find(rank) for rank in range(world_size)}) == 1, f"{topology} leaves the graph disconnected"


def test_odd_counts_leave_one_leader_out_per_round_and_one_device_is_a_no_op() -> None:
    assert peers(1, 0, "exponential") == [None]
    assert sum(p is None for p in peers(5, 0, "ring")) == 1
    assert sum(p is None for p in peers(5, 7, "random", seed=1)) == 1


def test_random_matchings_are_shared_by_seed_and_change_with_rounds() -> None:
    assert peers(8, 5, "random", seed=9) == peers(8, 5, "random", seed=9)
    assert len({tuple(peers(8, r, "random", seed=9)) for r in range(10)}) > 1


def test_block_rules() -> None:
    assert [next_block("round_robin", r, 3) for r in range(4)] == [0, 1, 2, 0]
    draws = [next_block("random", r, 4, seed=1) for r in range(40)]
    assert draws == [next_block("random", r, 4, seed=1) for r in range(40)] and set(draws) == {0, 1, 2, 3}
    assert next_block("largest_change", 5, 4, scores=[0.1, 3.0, 3.0, 0.2]) == 1  # ties: lowest index
    assert next_block("largest_change", 0, 4) == 0  # no scores yet


def test_numel_partition_is_contiguous_and_balanced() -> None:
    sizes = [10, 10, 10, 10, 40, 10, 10]
    blocks = partition_tensors(sizes, 3)
    assert [list(b) for b in blocks] == [[0, 1, 2, 3], [4], [5, 6]]
    assert sum(len(b) for b in blocks) == len(sizes)
    with pytest.raises(ValueError, match=r"cannot split 2 trainable tensors into 3 .* HINT"):
        partition_tensors([1, 1], 3)


def test_compute_partition_weighs_tensors_by_the_positions_they_are_applied_at() -> None:
    # an early conv: few weights applied at 1024 positions; a late linear layer: many weights applied once
    numels, positions = [500, 500, 20000, 20000], [1024, 256, 1, 1]
    by_numel = partition_tensors(tensor_costs(numels, positions, "numel"), 2)
    by_compute = partition_tensors(tensor_costs(numels, positions, "compute"), 2)
    assert [list(b) for b in by_numel] == [[0, 1, 2], [3]]
    assert [list(b) for b in by_compute] == [[0], [1, 2, 3]]


def test_ownership_is_fixed_or_rotates_through_every_block() -> None:
    assert [owned_block(1, epoch, 4, rotate=False) for epoch in range(4)] == [1, 1, 1, 1]
    assert sorted(owned_block(1, epoch, 4, rotate=True) for epoch in range(4)) == [0, 1, 2, 3]


def test_largest_change_without_change_falls_back_to_the_stalest_block() -> None:
    last = [-1, -1, -1]
    order = []
    for round_index in range(6):
        block = next_block("largest_change", round_index, 3, scores=[0.0, 0.0, 0.0], last_exchanged=last)
        last[block] = round_index
        order.append(block)
    assert order == [0, 1, 2, 0, 1, 2]
