"""Dynamic work sharing: the sampler alone (threads on a real TCPStore), then real runs with a straggler."""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import SubsetRandomSampler, WeightedRandomSampler

from lightning_fedhog.checks import dynamic_blocker, loader_blocker
from lightning_fedhog.epoch_indices import EpochIndices, draw, permutation
from lightning_fedhog.shared_counter import SharedCounterSampler
from lightning_fedhog.work_budget import WorkBudget, chunks_per_epoch
from tests.conftest import run_app, run_in_threads


def _samplers(
    num_workers: int,
    num_samples: int,
    chunk_size: int,
    total_chunks: int | None = None,
    limit: int | float = 1.0,
    drop_last: bool = False,
) -> tuple[dist.TCPStore, list[SharedCounterSampler]]:
    """One sampler per simulated worker, each with its own client of one TCPStore and budget (as in a real run)."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    samplers = [
        SharedCounterSampler(
            lambda epoch: permutation(num_samples, 5, epoch),
            num_samples,
            chunk_size,
            dist.TCPStore("127.0.0.1", store.port, is_master=False),
            key="t",
            rank=rank,
            budget=WorkBudget(world_size=num_workers, total=total_chunks),
            limit=limit,
            drop_last=drop_last,
        )
        for rank in range(num_workers)
    ]
    return store, samplers


def _batches(sampler: SharedCounterSampler) -> Iterator[list[int]]:
    """The sampler's indices in batches, as a `DataLoader` with its batch size groups them."""
    batch: list[int] = []
    for index in sampler:
        batch.append(index)
        if len(batch) == sampler.chunk_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _train(sampler: SharedCounterSampler, batches: Iterator[list[int]], delay: float = 0.0) -> list[int]:
    """Trains every batch of a pass: ``batch_trained`` as each starts, as the strategy calls it."""
    indices = []
    for batch in batches:
        sampler.batch_trained()
        indices.extend(batch)
        time.sleep(delay)
    return indices


def _run_epoch(samplers: list[SharedCounterSampler], epoch: int, delays: list[float]) -> list[list[int]]:
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return run_in_threads(lambda rank: _train(samplers[rank], _batches(samplers[rank]), delays[rank]), len(samplers))


def test_every_sample_once_per_epoch_and_faster_workers_take_more() -> None:
    _store, samplers = _samplers(3, num_samples=301, chunk_size=5)
    for epoch in range(2):
        seen = _run_epoch(samplers, epoch, delays=[0.002, 0.002, 0.008])
        union = sorted(i for indices in seen for i in indices)
        assert union == list(range(301)), "each sample exactly once per epoch"
        assert len(seen[0]) > 2 * len(seen[2]) and len(seen[1]) > 2 * len(seen[2])
    assert samplers[0].order(0) != samplers[0].order(1), "a new permutation every epoch"


def test_the_budget_ends_in_the_same_epoch_on_every_worker() -> None:
    _store, samplers = _samplers(2, num_samples=40, chunk_size=4, total_chunks=25)  # 10 chunks per epoch
    last_epoch = [[], []]
    for rank, sampler in enumerate(samplers):
        sampler.on_last_epoch = lambda rank=rank, sampler=sampler: last_epoch[rank].append(sampler.epoch)
    counts = []
    for epoch in range(3):
        seen = _run_epoch(samplers, epoch, delays=[0.0, 0.001])
        counts.append(sum(len(s) for s in seen) // 4)
    assert counts == [10, 10, 5]
    assert [sorted(set(epochs)) for epochs in last_epoch] == [[2], [2]], "the last epoch is known on every worker"


def test_every_worker_gets_a_batch_in_every_epoch_even_when_the_budget_has_fewer_left() -> None:
    """A worker without a batch would skip the epoch's collectives: the last epoch is rounded up to one each."""
    _store, samplers = _samplers(3, num_samples=40, chunk_size=4, total_chunks=21)  # 10, 10, then 1 left
    for epoch in range(3):
        seen = _run_epoch(samplers, epoch, delays=[0.0, 0.0, 0.05])
        assert all(seen), f"epoch {epoch}: a worker got no batch"
        if epoch == 2:
            assert [len(s) // 4 for s in seen] == [1, 1, 1]


def test_a_thrown_away_pass_gives_back_its_claims_and_every_index_trains_once() -> None:
    """Lightning built worker 0's iterator, which prefetched 3 batches, and threw it away; nothing may be lost."""
    _store, (first, second) = _samplers(2, num_samples=40, chunk_size=4)  # 10 chunks
    prefetched = list(itertools.islice(_batches(first), 3))  # its reserved chunk and two claims, never trained
    seen_second = _train(second, _batches(second))  # meanwhile the other worker drains the counter
    seen_first = _train(first, _batches(first))  # the new pass: the reserved chunk again, then the pool
    assert sorted(seen_first + seen_second) == list(range(40)) and len(seen_first) == 3 * 4
    assert sorted(map(sorted, prefetched)) == sorted(sorted(seen_first[i : i + 4]) for i in range(0, 12, 4))


def test_a_pass_thrown_away_half_trained_gives_back_only_the_untrained_chunks() -> None:
    _store, (first, second) = _samplers(2, num_samples=40, chunk_size=4)
    batches = _batches(first)
    trained = _train(first, itertools.islice(batches, 2))  # reserved + one claim trained
    next(batches)  # a third batch prefetched, never trained
    seen = [trained, _train(second, _batches(second)), _train(first, _batches(first))]
    union = sorted(i for indices in seen for i in indices)
    assert union == list(range(40)) and len(seen[2]) == 4, "exactly the one untrained chunk came back"


def test_the_short_last_chunk_is_the_last_batch_of_the_pass_that_claims_it() -> None:
    """42 samples in chunks of 4: chunk 10 holds 2; yielded mid-pass it would merge with the next batch."""
    _store, samplers = _samplers(2, num_samples=42, chunk_size=4)
    batches = run_in_threads(lambda rank: list(_batches(samplers[rank])), 2)
    for worker in batches:
        assert all(len(batch) == 4 for batch in worker[:-1]), worker
    assert sorted(i for worker in batches for batch in worker for i in batch) == list(range(42))


def test_progress_counts_the_previous_epoch_from_the_first_batch_of_the_next() -> None:
    """A per-step schedule follows `trained_through`: it must not stall at an epoch start, then jump."""
    _store, (sampler,) = _samplers(1, num_samples=40, chunk_size=4)
    _train(sampler, _batches(sampler))
    assert sampler.trained_through == 10
    sampler.set_epoch(1)
    batches = _batches(sampler)
    next(batches), next(batches)  # claimed ahead (a prefetching loader): progress moves only as batches train
    assert sampler.trained_through == 10
    sampler.batch_trained()
    assert sampler.trained_through == 11


def test_a_pass_begun_for_another_epoch_or_budget_is_stale() -> None:
    _store, (sampler,) = _samplers(1, num_samples=40, chunk_size=4, total_chunks=25)
    assert not sampler.current_pass_is_stale()  # no pass yet
    next(_batches(sampler))
    assert not sampler.current_pass_is_stale()
    sampler.set_epoch(2)  # a checkpoint's epoch, restored after the pass began
    assert sampler.current_pass_is_stale()
    sampler.set_epoch(0)
    sampler.budget.load_state_dict({"total": 25, "spent": 20, "epoch": 1, "current": 0})  # its spent budget
    assert sampler.current_pass_is_stale()


def test_workers_that_draw_different_index_lists_are_stopped() -> None:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    orders = [lambda epoch: list(range(8)), lambda epoch: list(range(8))[::-1]]
    samplers = [SharedCounterSampler(orders[rank], 8, 4, store, "t", rank=rank) for rank in range(2)]
    next(iter(samplers[0]))
    with pytest.raises(RuntimeError, match=r"rank 1's list for epoch 0 differs.*HINT"):
        next(iter(samplers[1]))


def test_a_users_sampler_is_drawn_alike_everywhere_and_its_random_streams_are_left_alone() -> None:
    generator = torch.Generator().manual_seed(3)
    weighted = WeightedRandomSampler([0.0, 1.0, 2.0, 3.0] * 5, num_samples=30, replacement=True, generator=generator)
    subset = SubsetRandomSampler(range(0, 20, 2))
    own_state, global_state = generator.get_state(), torch.get_rng_state()
    for sampler in (weighted, subset):
        assert draw(sampler, 7, 1) == draw(sampler, 7, 1), "the same seed and epoch give the same list"
        assert draw(sampler, 7, 1) != draw(sampler, 7, 2), "a new epoch gives a new list"
    assert torch.equal(generator.get_state(), own_state) and torch.equal(torch.get_rng_state(), global_state)
    drawn = draw(weighted, 7, 1)
    assert len(drawn) == 30 and 0 not in drawn[::4] and max(drawn.count(i) for i in set(drawn)) > 1
    assert sorted(draw(subset, 7, 1)) == list(range(0, 20, 2))
    lightning_like = EpochIndices(torch.utils.data.DistributedSampler(range(20), 2, 0, shuffle=True, seed=7), 20)
    assert lightning_like(3) == permutation(20, 7, 3), "Lightning's sampler over the whole data set: a permutation"


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


def test_settings_that_need_equal_step_counts_rule_dynamic_sharing_out() -> None:
    assert dynamic_blocker(1.0, []) is None
    assert re.search(r"`val_check_interval=0.5`.*HINT: .*work_sharing='static'", dynamic_blocker(0.5, []) or "")
    step_based = dynamic_blocker(1.0, ["ModelCheckpoint(every_n_train_steps=5)"]) or ""
    assert re.search(r"every N steps .*ModelCheckpoint\(every_n_train_steps=5\)", step_based)
    min_steps = dynamic_blocker(1.0, [], min_steps=100) or ""
    assert re.search(r"`Trainer\(min_steps=100\)`.*HINT: use `min_epochs`", min_steps)
    assert re.search(r"`dataloader_iter`.*HINT", dynamic_blocker(1.0, [], dataloader_iter=True) or "")
    assert re.search(r"`Trainer\(max_time=\.\.\.\)`.*HINT", dynamic_blocker(1.0, [], max_time=True) or "")


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


def test_loaders_that_rule_an_automatic_switch_out_are_named() -> None:
    """`work_sharing="auto"` decides during training, from the loader Lightning set up."""
    data = torch.utils.data.TensorDataset(torch.arange(8.0))
    distributed = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=0)
    shardable = torch.utils.data.DataLoader(data, batch_size=2, sampler=distributed)

    def blocker(loaders: object) -> str:
        return loader_blocker(SimpleNamespace(train_dataloader=loaders)) or ""  # type: ignore[arg-type]

    assert loader_blocker(SimpleNamespace(train_dataloader=shardable)) is None  # type: ignore[arg-type]
    assert "this run has 2" in blocker({"a": shardable, "b": shardable})
    assert "use_distributed_sampler=False" in blocker(torch.utils.data.DataLoader(data, batch_size=2))
    assert "map-style" in blocker(torch.utils.data.DataLoader(data, batch_sampler=[[0, 1]]))
