import itertools

import pytest

from lightning_fedhog.blocks import block_bounds, next_block
from lightning_fedhog.config import averaging_period


@pytest.mark.parametrize(("numel", "num_blocks"), [(10, 1), (10, 3), (10, 10), (7, 2), (1000, 16)])
def test_blocks_cover_the_vector_in_order_with_balanced_sizes(numel: int, num_blocks: int) -> None:
    bounds = block_bounds(numel, num_blocks)
    assert len(bounds) == num_blocks
    assert bounds[0][0] == 0 and bounds[-1][1] == numel
    assert all(stop == next_start for (_, stop), (next_start, _) in itertools.pairwise(bounds))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_round_robin_visits_every_block_once_per_cycle() -> None:
    assert [next_block("round_robin", r, 4) for r in range(9)] == [0, 1, 2, 3, 0, 1, 2, 3, 0]


def test_warmup_averages_every_step_then_every_period() -> None:
    periods = [averaging_period(epoch, period=16, warmup_epochs=2) for epoch in range(4)]
    assert periods == [1, 1, 16, 16]
    assert averaging_period(0, period=8, warmup_epochs=0) == 8
