"""Rescue on peer loss: what the survivors agree on and save, and a restarted run that continues from it."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lightning_fedhog.epoch_indices import permutation
from lightning_fedhog.rescue import RescueError, RescueMeeting, gather_rescue
from lightning_fedhog.shared_counter import ResumedEpoch, SharedCounterSampler
from lightning_fedhog.work_budget import WorkBudget
from tests.conftest import APP, assert_one_model, free_port, run_app, run_in_threads, run_outcome
from tests.test_work_sharing import _batches, _train

# ----------------------------------------------------------------------------------------- the interrupted epoch


def _sampler(port: int, rank: int, world_size: int, resumed: ResumedEpoch | None = None) -> SharedCounterSampler:
    return SharedCounterSampler(
        lambda epoch: permutation(100, 5, epoch), 100, 10, dist.TCPStore("127.0.0.1", port, is_master=False),
        key="t", rank=rank, budget=WorkBudget(world_size=world_size), resumed=resumed, record=True,
    )


def test_a_resumed_epoch_trains_every_chunk_the_rescue_did_not_find_trained_exactly_once() -> None:
    """A run of 3 workers trains part of epoch 1 and stops; the rescue reads what was trained from the store, and
    a run of 2 workers resumed from it trains the rest: every index once over both runs."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    before = [_sampler(store.port, rank, 3) for rank in range(3)]
    trained_before: list[int] = []
    for sampler in before:
        sampler.set_epoch(1)
        batches = _batches(sampler)
        trained_before += _train(sampler, (next(batches) for _ in range(2)))  # two batches each, then "killed"
    chunks = before[0].trained_chunks(1)
    assert len(chunks) == 6 and chunks == before[2].trained_chunks(1)  # any survivor reads every worker's record

    again = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # a restarted run's store
    resumed = ResumedEpoch(epoch=1, chunks=10, trained=frozenset(chunks))
    after = [_sampler(again.port, rank, 2, resumed) for rank in range(2)]
    for sampler in after:
        sampler.set_epoch(1)
    trained_after = run_in_threads(lambda rank: _train(after[rank], _batches(after[rank]), 0.001), 2)
    assert sorted(trained_before + [i for part in trained_after for i in part]) == list(range(100))
    assert after[0].trained_chunks(1) == set(range(10))  # a second rescue would find the whole epoch trained
    for sampler in after:  # the next epoch is whole again
        sampler.set_epoch(2)
    next_epoch = run_in_threads(lambda rank: _train(after[rank], _batches(after[rank])), 2)
    assert sorted(i for part in next_epoch for i in part) == list(range(100))


def test_a_resumed_epoch_with_fewer_batches_left_than_workers_gives_each_worker_one() -> None:
    """Every worker must reach the epoch's end: with one batch left and two workers, one batch is trained twice."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    resumed = ResumedEpoch(epoch=0, chunks=10, trained=frozenset(range(9)))
    samplers = [_sampler(store.port, rank, 2, resumed) for rank in range(2)]
    trained = run_in_threads(lambda rank: _train(samplers[rank], _batches(samplers[rank])), 2)
    assert [len(part) for part in trained] == [10, 10]
    assert trained[0] == trained[1] == permutation(100, 5, 0)[90:]


def test_a_rescue_from_another_batch_size_trains_the_epoch_whole() -> None:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    with pytest.warns(UserWarning, match="trained whole"):
        sampler = _sampler(store.port, 0, 1, ResumedEpoch(epoch=0, chunks=20, trained=frozenset({0, 1})))
    assert sorted(_train(sampler, _batches(sampler))) == list(range(100))


def test_the_budget_counts_a_rescued_epochs_trained_chunks_only_if_it_resumes_in_it() -> None:
    saved = {"total": 100, "spent": 30, "epoch": 2, "current": 16}  # 30 before epoch 2; 5 of its 16 trained
    budget = WorkBudget(world_size=2, total=100)
    budget.load_state_dict(saved)
    budget.resumed_trained = 5
    assert budget.plan(2, 11) == (35, 11)
    assert budget.plan(3, 16) == (46, 16)  # resumed after it: the whole epoch counts, once
    assert budget.begin_epoch(2, 11) == (11, False) and budget.plan(3, 16) == (46, 16)


# ------------------------------------------------------------------------------------------------ the meeting


def _meeting(
    port: int, rank: int, device: int, gone: set[int], world_size: int = 3, wait: float = 10.0, timeout: float = 5.0
) -> RescueMeeting:
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    return RescueMeeting(
        store, "run/rescue", rank=rank, device=device, world_size=world_size, gone=lambda: set(gone),
        timeout=timedelta(seconds=timeout), wait=wait,
    )


def test_survivors_agree_on_themselves_and_average_one_copy_per_surviving_device() -> None:
    """Ranks 0 and 1 share device 0, rank 2 has device 1, rank 3 (device 1) is dead. Device 0's copy counts once."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    devices = [0, 0, 1, 1]
    copies = {0: torch.tensor([1.0, 2.0]), 1: torch.tensor([3.0, 6.0])}

    def survivor(rank: int) -> object:
        meeting = _meeting(server.port, rank, devices[rank], gone={3}, world_size=4)
        members = meeting.members()
        return members, gather_rescue(meeting.group(members), members, rank, copies[devices[rank]], {"rank": rank})

    results = run_in_threads(survivor, 3)
    assert all([m.rank for m in members] == [0, 1, 2] for members, _ in results)
    rescued = results[0][1]
    assert results[1][1] is None and results[2][1] is None  # the first member writes
    assert torch.equal(rescued.average, torch.tensor([2.0, 4.0]))
    assert rescued.optimizer_states == [{"rank": 0}, {"rank": 1}, {"rank": 2}]


def test_a_survivor_on_another_host_learns_who_is_dead_from_one_that_sees_it() -> None:
    """Rank 0 cannot see rank 2's process (another host); rank 1 can: rank 0 does not wait out its 60 s."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    seen = {0: set(), 1: {2}}
    members = run_in_threads(
        lambda rank: _meeting(server.port, rank, rank, gone=seen[rank], wait=60.0).members(), 2, timeout=20.0
    )
    assert [[m.rank for m in agreed] for agreed in members] == [[0, 1], [0, 1]]


def test_a_rank_that_joins_after_the_members_were_agreed_takes_no_part() -> None:
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    first = _meeting(server.port, 0, 0, gone=set(), world_size=2, wait=0.2)  # rank 1's fate is unknown
    assert [m.rank for m in first.members()] == [0]
    with pytest.raises(RescueError, match="before this worker joined"):
        _meeting(server.port, 1, 1, gone=set(), world_size=2).members()


def test_a_second_failure_during_the_rescue_fails_it_within_the_group_timeout() -> None:
    """Three members agreed; one dies before it sends its copy: the others' gather fails, no rescue."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    errors: dict[int, BaseException] = {}
    agreed = threading.Barrier(3)

    def member(rank: int) -> None:
        meeting = _meeting(server.port, rank, rank, gone=set(), timeout=2.0)
        members = meeting.members()
        group = meeting.group(members)
        agreed.wait()
        if rank == 2:
            return  # dies: never sends
        try:
            gather_rescue(group, members, rank, torch.ones(3), {})
        except RuntimeError as error:
            errors[rank] = error

    run_in_threads(member, 3)
    assert sorted(errors) == [0, 1]


# ---------------------------------------------------------------------------------------------- real processes


def _trained(out: Path, epoch: int) -> collections.Counter:
    """How often each sample index was trained in ``epoch``, over every run's and rank's trace."""
    seen: collections.Counter = collections.Counter()
    for path in out.glob("trace-*.jsonl"):
        for line in path.read_text().splitlines():
            traced_epoch, indices = json.loads(line)
            if traced_epoch == epoch:
                seen.update(indices)
    return seen


@pytest.mark.slow
def test_a_lost_device_costs_only_its_own_batches_and_a_smaller_run_continues_from_the_rescue(tmp_path: Path) -> None:
    """2 devices, dynamic sharing; device 1 is SIGKILLed early in epoch 1 (device 0 is slow, so most of the epoch is
    left). Device 0 saves a rescue and stops; the run restarted with 1 device of 2 workers resumes from the rescue
    (not from the epoch-0 checkpoint), trains the rest of epoch 1 with every sample once over both runs, and ends
    with every worker holding the same model."""
    common = ["--work-sharing", "dynamic", "--epochs", "3", "--resume", "last", "--timeout", "30"]
    outcome = run_outcome(
        tmp_path, "--devices", "2", *common, "--kill-rank", "1", "--sleep-rank", "0", "--sleep", "0.2",
        "--trace", "first", forked=True,
    )
    output = outcome.output
    assert outcome.returncode not in (0, 124), output[-4000:]
    assert "saved a rescue to" in output, output[-4000:]
    ckpt = tmp_path / "ckpt"
    rescue = torch.load(ckpt / "last-rescue.ckpt", weights_only=False)
    assert rescue["fedhog_rescue"]["lost"] == [1] and rescue["fedhog_rescue"]["survivors"] == [0]
    assert rescue["epoch"] == 1 and 0 < len(rescue["fedhog_rescue"]["trained"]["chunks_trained"]) < 16
    assert (ckpt / "last-rescue.ckpt").stat().st_mtime > (ckpt / "last.ckpt").stat().st_mtime

    reports = run_app(tmp_path, "--devices", "1", "--workers", "2", *common, "--trace", "second")
    for report in reports:
        assert report["started"]["epoch"] == 1 and report["started"]["global_step"] == rescue["global_step"]
        assert report["current_epoch"] == 3
    for epoch in (0, 1, 2):
        counts = _trained(tmp_path, epoch)
        assert sorted(counts) == list(range(256)) and set(counts.values()) == {1}, f"epoch {epoch}: {counts}"
    assert_one_model(tmp_path, 2)


@pytest.mark.slow
def test_a_second_failure_during_the_rescue_leaves_the_last_checkpoint_and_says_why(tmp_path: Path) -> None:
    """3 devices: rank 2 is killed in epoch 1, and rank 1 dies while the survivors gather their copies. Rank 0 says
    why no rescue was saved; `last.ckpt` (epoch 0) is untouched and resumes."""
    ckpt = tmp_path / "ckpt"
    outcome = run_outcome(
        tmp_path, "--devices", "3", "--work-sharing", "dynamic", "--epochs", "2", "--timeout", "30",
        "--kill-rank", "2", "--sleep-rank", "0", "--sleep", "0.2", "--die-in-rescue", "1", forked=True,
    )
    output = outcome.output
    assert outcome.returncode not in (0, 124), output[-4000:]
    assert "no rescue was saved" in output and "saved a rescue" not in output, output[-4000:]
    assert not (ckpt / "last-rescue.ckpt").exists() and not list(ckpt.glob("*.tmp"))
    last = torch.load(ckpt / "last.ckpt", weights_only=False)
    assert last["epoch"] == 0 and "fedhog_rescue" not in last
    reports = run_app(  # the same number of workers: the test module sizes a parameter by it
        tmp_path / "again", "--devices", "1", "--workers", "3", "--epochs", "2", "--resume", str(ckpt / "last.ckpt")
    )
    assert reports[0]["started"]["epoch"] == 1


def _slurm_step(out: Path, restart_count: int, *args: str) -> list[tuple[int, str]]:
    """Two tasks of one SLURM step on this host (2 devices x 1 worker), started as srun starts them; a requeued job
    runs the same step again with ``SLURM_RESTART_COUNT`` raised."""
    port, tasks = free_port(), []
    for rank in range(2):
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
               "SLURM_NNODES": "1", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0",
               "SLURM_JOB_ID": "4243", "SLURM_JOB_NAME": "fedhog-requeue", "SLURM_NODELIST": "127.0.0.1",
               "SLURM_RESTART_COUNT": str(restart_count), "MASTER_PORT": str(port)}
        command = [sys.executable, str(APP), "--out", str(out), "--devices", "2", "--workers", "1", *args]
        tasks.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return [(task.returncode, output) for task in tasks for output, _ in [task.communicate(timeout=240)]]


@pytest.mark.slow
def test_a_requeued_slurm_job_resumes_from_the_rescue(tmp_path: Path) -> None:
    """A SLURM job whose task 1 is SIGKILLed in epoch 1: task 0 saves a rescue and fails (SLURM would then requeue
    the job); the same step run again (``SLURM_RESTART_COUNT=1``) resumes from the rescue, not from epoch 0's
    checkpoint, and ends with both devices holding the same model."""
    args = ("--epochs", "2", "--resume", "last", "--timeout", "30", "--kill-rank", "1", "--sleep-rank", "0",
            "--sleep", "0.1")
    first = _slurm_step(tmp_path, 0, *args)
    assert first[0][0] != 0 and "saved a rescue to" in first[0][1], first[0][1][-4000:]
    rescue = torch.load(tmp_path / "ckpt" / "last-rescue.ckpt", weights_only=False)
    assert rescue["epoch"] == 1 and rescue["fedhog_rescue"]["lost"] == [1]
    again = _slurm_step(tmp_path, 1, *args)
    assert [code for code, _ in again] == [0, 0], again[0][1][-4000:] + again[1][1][-4000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for report in reports:
        assert report["environment"] == "SLURMEnvironment"
        # epoch 2 when task 0 had trained its whole shard of epoch 1 before it noticed (its step count says so)
        assert report["started"]["epoch"] in (1, 2) and report["started"]["global_step"] == rescue["global_step"]
        assert report["current_epoch"] == 2
    assert_one_model(tmp_path, 2)
