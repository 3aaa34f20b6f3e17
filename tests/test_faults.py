"""Fault injection on real processes: a worker or a device leader killed, a stuck peer, a slow peer, NaN, SIGTERM.

Each scenario runs tests/apps/train.py as a program and asserts what a user relies on: the error names the
failed peer, the run ends within `timeout` plus a margin (measured from the injected event to the exit of the
last process, which closes the output pipe), the last checkpoint is intact and loads, and no process is left.
The shared-memory and thread hygiene of tests/conftest.py runs after every test.
"""

from __future__ import annotations

import subprocess
from functools import partial
from pathlib import Path

import pytest
import torch

from tests.conftest import MARGIN, TIMEOUT, run_outcome

_run = partial(run_outcome, timeout=TIMEOUT)

pytestmark = pytest.mark.slow


def _assert_nothing_left(out: Path) -> None:
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left running: {left}"


def _assert_intact(path: Path, epoch: int | None = None) -> dict:
    checkpoint = torch.load(path, weights_only=False)
    if epoch is not None:
        assert checkpoint["epoch"] == epoch
    values = [value for value in checkpoint["state_dict"].values() if value.is_floating_point()]
    assert values and all(torch.isfinite(value).all() for value in values), f"{path} is not finite"
    return checkpoint


# 256 samples, batch 16: 4 steps per epoch and worker with 4 workers, 8 with 2; the kill comes in epoch 1
@pytest.mark.parametrize(
    ("devices", "workers", "rank", "named"),
    [(2, 2, 1, "rank 1 (device 0 worker 1"), (2, 1, 1, "rank 1 (device 1 leader")],
    ids=["worker", "leader"],
)
def test_a_killed_peer_is_named_and_the_last_checkpoint_kept(
    tmp_path: Path, devices: int, workers: int, rank: int, named: str
) -> None:
    kill_step = 6 if workers == 2 else 10
    outcome = _run(
        tmp_path, "--devices", str(devices), "--workers", str(workers), "--epochs", "3",
        "--kill-rank", str(rank), "--kill-step", str(kill_step),
    )
    assert outcome.returncode != 0
    assert f"{named}, pid" in outcome.output and "is dead" in outcome.output, outcome.output[-3000:]
    assert 'ckpt_path="last"' in outcome.output  # ... and what to do
    assert outcome.seconds_after_event < TIMEOUT + MARGIN, outcome.seconds_after_event
    # epoch 0's checkpoint is the last good one: nothing was saved after the kill
    _assert_intact(tmp_path / "ckpt" / "last.ckpt", epoch=0)
    assert not list(tmp_path.glob("hpc_ckpt_*.ckpt"))
    _assert_nothing_left(tmp_path)


def test_a_stuck_peer_is_named_after_timeout_and_ended(tmp_path: Path) -> None:
    # rank 1 sleeps 30 s in its first step: alive but stuck. Rank 0 waits `timeout` at the epoch's consensus point,
    # fails naming rank 1, and the launcher ends rank 1 after a grace of min(`timeout`, 10 s).
    outcome = _run(tmp_path, "--devices", "2", "--samples", "128", "--sleep-rank", "1", "--sleep", "30")
    assert outcome.returncode != 0
    assert "rank 1 (device 1 leader" in outcome.output and "did not reach this consensus point" in outcome.output
    assert outcome.seconds_after_event < 2 * TIMEOUT + MARGIN, outcome.seconds_after_event
    _assert_nothing_left(tmp_path)


def test_a_slow_peer_only_slows_the_run(tmp_path: Path) -> None:
    outcome = _run(tmp_path, "--devices", "2", "--samples", "256", "--sleep-rank", "1", "--sleep", "0.05", forked=True)
    assert outcome.returncode == 0, outcome.output[-3000:]
    _assert_intact(tmp_path / "ckpt" / "last.ckpt", epoch=1)


def test_nan_in_one_device_stops_the_run_without_spreading_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    outcome = _run(tmp_path, "--devices", "2", "--epochs", "3", "--nan-rank", "1", forked=True)
    assert outcome.returncode != 0
    assert "non-finite values (NaN/Inf)" in outcome.output and "led by global rank(s) [1]" in outcome.output
    # the epoch-0 checkpoint was written before the corruption; last.ckpt was not overwritten by a non-finite model
    for name in ("epoch=0-step=8.ckpt", "last.ckpt"):
        _assert_intact(tmp_path / "ckpt" / name, epoch=0)


def test_sigterm_to_every_process_saves_a_checkpoint_that_resumes(tmp_path: Path) -> None:
    # as SLURM preempts: SIGTERM to every process at once, here from rank 1 in its step 10 (epoch 1); int8 rounds,
    # so the stop comes after a compressed consensus point (epoch 0's validation), which the stop makes exact
    first = tmp_path / "first"
    outcome = _run(
        first, "--devices", "2", "--epochs", "3", "--sigterm-rank", "1", "--sigterm-step", "10", "--sigterm-group",
        "--compression", "int8",
    )
    assert outcome.returncode == 0, outcome.output[-3000:]  # Lightning's SIGTERMException is a SystemExit
    assert "fedhog: stopped by SIGTERM at epoch 1" in outcome.output
    assert outcome.seconds_after_event < TIMEOUT + MARGIN, outcome.seconds_after_event
    saved = _assert_intact(first / "hpc_ckpt_1.ckpt", epoch=1)
    last = _assert_intact(first / "ckpt" / "last.ckpt", epoch=1)
    assert saved["global_step"] == last["global_step"] >= 10
    assert saved["fedhog"]["world_size"] == 2  # every worker's optimizer state is in it
    _assert_nothing_left(first)

    resumed = tmp_path / "resumed"
    again = _run(resumed, "--devices", "2", "--epochs", "3", "--resume", str(first / "hpc_ckpt_1.ckpt"),
                 "--compression", "int8", forked=True)
    assert again.returncode == 0, again.output[-3000:]
    assert _assert_intact(resumed / "ckpt" / "last.ckpt", epoch=2)["global_step"] == 3 * 8


def test_sigterm_to_one_worker_stops_every_worker(tmp_path: Path) -> None:
    # only rank 1 (device 1's leader, not the launching process) is signalled in epoch 1; it relays the stop
    outcome = _run(
        tmp_path, "--devices", "2", "--workers", "1", "--epochs", "3", "--sigterm-rank", "1", "--sigterm-step", "10"
    )
    assert outcome.returncode == 0, outcome.output[-3000:]
    assert outcome.seconds_after_event < TIMEOUT + MARGIN, outcome.seconds_after_event
    _assert_intact(tmp_path / "hpc_ckpt_1.ckpt", epoch=1)
    _assert_nothing_left(tmp_path)


def test_no_worker_outlives_a_killed_launching_process(tmp_path: Path) -> None:
    """SIGKILL to the launching process (rank 0, host of the rendezvous store), as a job time limit sends it: its
    workers die with it at once, wherever they are. Rank 1 is in a 30 s step, where no liveness check or broken
    collective can reach it (it used to finish the step first: 31 s); the kernel ends it with its parent."""
    outcome = _run(
        tmp_path, "--devices", "2", "--workers", "1", "--sleep-rank", "1", "--sleep", "30", "--kill-rank", "0",
        "--kill-step", "2",
    )
    assert outcome.returncode != 0
    assert outcome.seconds_after_event < 3.0, outcome.seconds_after_event
    _assert_nothing_left(tmp_path)
