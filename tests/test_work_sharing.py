"""Dynamic work sharing: the sampler alone (threads on a real TCPStore), then real runs with a straggler."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from lightning_fedhog.work_sharing import SharedCounterSampler, WorkBudget, check_dynamic_compatible, chunks_per_epoch
from tests.conftest import run_app, run_in_threads


def _samplers(
    num_workers: int, num_samples: int, chunk_size: int, total_chunks: int | None = None, limit: int | float = 1.0
) -> tuple[dist.TCPStore, list[SharedCounterSampler]]:
    """One sampler per simulated worker, each with its own client of one TCPStore and budget (as in a real run)."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    samplers = [
        SharedCounterSampler(
            num_samples,
            chunk_size,
            dist.TCPStore("127.0.0.1", store.port, is_master=False),
            key="t",
            rank=rank,
            budget=WorkBudget(world_size=num_workers, total=total_chunks),
            seed=5,
            limit=limit,
        )
        for rank in range(num_workers)
    ]
    return store, samplers


def _run_epoch(samplers: list[SharedCounterSampler], epoch: int, delays: list[float]) -> list[list[int]]:
    for sampler in samplers:
        sampler.set_epoch(epoch)
        sampler.begin_epoch()  # what the strategy does at the first training batch of an epoch

    def consume(rank: int) -> list[int]:
        indices = []
        for index in samplers[rank]:
            indices.append(index)
            if len(indices) % samplers[rank].chunk_size == 0:
                time.sleep(delays[rank])
        return indices

    return run_in_threads(consume, len(samplers))


def test_every_sample_once_per_epoch_and_faster_workers_take_more() -> None:
    _store, samplers = _samplers(3, num_samples=301, chunk_size=5)
    for epoch in range(2):
        seen = _run_epoch(samplers, epoch, delays=[0.002, 0.002, 0.008])
        union = sorted(i for indices in seen for i in indices)
        assert union == list(range(301)), "each sample exactly once per epoch"
        assert len(seen[0]) > 2 * len(seen[2]) and len(seen[1]) > 2 * len(seen[2])
    assert len({tuple(s.order()) for s in samplers}) == 1, "one permutation per epoch, shared by all workers"
    first = samplers[0].order()
    samplers[0].set_epoch(7)
    assert samplers[0].order() != first, "a new permutation every epoch"


def test_the_budget_ends_in_the_same_epoch_on_every_worker() -> None:
    _store, samplers = _samplers(2, num_samples=40, chunk_size=4, total_chunks=25)  # 10 chunks per epoch
    counts = []
    for epoch in range(3):
        seen = _run_epoch(samplers, epoch, delays=[0.0, 0.001])
        counts.append(sum(len(s) for s in seen) // 4)
        assert all(s.budget.begin_epoch(epoch, 10)[1] == (epoch == 2) for s in samplers), "last epoch: the same"
    assert counts == [10, 10, 5]


def test_every_worker_gets_a_batch_in_every_epoch_even_when_the_budget_has_fewer_left() -> None:
    """A worker without a batch would skip the epoch's collectives: the last epoch is rounded up to one each."""
    _store, samplers = _samplers(3, num_samples=40, chunk_size=4, total_chunks=21)  # 10, 10, then 1 left
    for epoch in range(3):
        seen = _run_epoch(samplers, epoch, delays=[0.0, 0.0, 0.05])
        assert all(seen), f"epoch {epoch}: a worker got no batch"
        if epoch == 2:
            assert [len(s) // 4 for s in seen] == [1, 1, 1]


def test_tiny_data_sets_wrap_so_every_worker_still_gets_a_batch() -> None:
    _store, samplers = _samplers(4, num_samples=8, chunk_size=4)  # 2 chunks, 4 workers
    seen = _run_epoch(samplers, 0, delays=[0.0] * 4)
    assert [len(s) for s in seen] == [4, 4, 4, 4]
    assert sorted(set(i for s in seen for i in s)) == list(range(8))


def test_limit_train_batches_is_a_per_worker_share_of_one_epoch_wide_count() -> None:
    assert chunks_per_epoch(100, 3, world_size=4) == 12
    assert chunks_per_epoch(100, 0.25, world_size=4) == 25
    assert chunks_per_epoch(100, 0.001, world_size=4) == 1
    assert chunks_per_epoch(10, 5, world_size=4) == 10


def test_a_resumed_budget_counts_the_saved_epoch_only_if_training_goes_on_after_it() -> None:
    saved = WorkBudget(world_size=2, total=50)
    saved.begin_epoch(0, 20)
    state = saved.state_dict()
    after_the_epoch, mid_epoch = WorkBudget(world_size=2, total=50), WorkBudget(world_size=2, total=50)
    after_the_epoch.load_state_dict(state)
    mid_epoch.load_state_dict(state)
    assert after_the_epoch.begin_epoch(1, 20) == (20, False) and after_the_epoch.spent == 20
    assert after_the_epoch.begin_epoch(2, 20) == (10, True)
    assert mid_epoch.begin_epoch(0, 20) == (20, False) and mid_epoch.spent == 0  # the epoch restarts whole


def test_settings_that_need_equal_step_counts_are_refused() -> None:
    check_dynamic_compatible(1.0, [])
    with pytest.raises(ValueError, match=r"`val_check_interval=0.5`.*HINT: .*work_sharing='static'"):
        check_dynamic_compatible(0.5, [])
    with pytest.raises(ValueError, match=r"every N steps .*ModelCheckpoint\(every_n_train_steps=5\)"):
        check_dynamic_compatible(1.0, ["ModelCheckpoint(every_n_train_steps=5)"])


def test_a_2x_slower_device_does_less_and_nobody_waits_at_the_epoch_end(tmp_path: Path) -> None:
    reports = run_app(
        tmp_path, "--devices", "2", "--work-sharing", "dynamic", "--samples", "960", "--epochs", "2",
        "--sleep-rank", "1", "--sleep", "0.03", "--period", "4",
    )
    fast, slow = reports
    for epoch in ("0", "1"):
        union = sorted(fast["seen"][epoch] + slow["seen"][epoch])
        assert union == list(range(960)), f"epoch {epoch}: every sample exactly once"
        ratio = len(fast["seen"][epoch]) / len(slow["seen"][epoch])
        assert ratio >= 1.6, f"epoch {epoch}: the fast device did only {ratio:.2f}x the slow one's batches"
    # at the end of the run the fast worker finished at most about one slow batch before the slow one
    slow_step = (slow["step_times"][-1] - slow["step_times"][0]) / (len(slow["step_times"]) - 1)
    idle = slow["step_times"][-1] - fast["step_times"][-1]
    assert idle <= 2.5 * slow_step, f"the fast worker idled {idle:.3f}s, {idle / slow_step:.1f} slow steps"
    assert fast["metrics"]["val_acc"] > 0.9


def test_max_steps_is_a_total_budget_that_stops_everyone_together(tmp_path: Path) -> None:
    reports = run_app(
        tmp_path, "--devices", "2", "--work-sharing", "dynamic", "--samples", "320", "--epochs", "5",
        "--max-steps", "15", "--sleep-rank", "1", "--sleep", "0.02",
    )
    steps = [r["global_step"] for r in reports]
    assert sum(steps) == 2 * 15, f"the run did {steps} steps, not 2 x max_steps in total"
    assert {r["current_epoch"] for r in reports} == {2}  # 10 batches per epoch: the budget ends in epoch 1
    assert json.loads((tmp_path / "rank0.json").read_text())["metrics"]["val_acc"] > 0.5


def test_limit_train_batches_caps_every_worker_without_a_hang(tmp_path: Path) -> None:
    reports = run_app(
        tmp_path, "--devices", "2", "--work-sharing", "dynamic", "--samples", "640", "--epochs", "2",
        "--limit-train", "6", "--sleep-rank", "1", "--sleep", "0.02",
    )
    # 6 batches per worker and epoch, as with static shards, but shared out dynamically: 12 per epoch in all
    assert sum(r["global_step"] for r in reports) == 2 * 12
    assert reports[0]["global_step"] > reports[1]["global_step"], "the fast worker took more of them"
    for epoch in ("0", "1"):
        seen = reports[0]["seen"][epoch] + reports[1]["seen"][epoch]
        assert len(seen) == len(set(seen)) == 2 * 6 * 16, "no sample twice within an epoch"
