"""Restarts and resuming: a torchrun restart after a killed worker, and a resumed run that matches a straight one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import TorchElasticEnvironment

from lightning_fedhog.rendezvous import restart_safe_store
from tests.conftest import APP, assert_one_model, free_port, load_rank, run_app

STEPS_PER_EPOCH = 8  # 256 samples, batches of 16, 2 workers


def test_restart_safe_store_gives_each_attempt_its_own_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    environment = TorchElasticEnvironment()
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert restart_safe_store(environment, timedelta(seconds=5)) == {}  # no agent store: torch makes its own
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    for attempt in ("0", "1"):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", attempt)
        restart_safe_store(environment, timedelta(seconds=5))["store"].set("rank0_address", f"attempt {attempt}")
    assert server.get("fedhog/attempt0/rank0_address") == b"attempt 0"
    assert server.get("fedhog/attempt1/rank0_address") == b"attempt 1"


@pytest.mark.slow
def test_torchrun_restart_resumes_from_the_survivors_rescue(tmp_path: Path) -> None:
    """Rank 1 (device 1's leader) is SIGKILLed in epoch 1; rank 0 saves a rescue and stops, torchrun restarts both
    workers once and ``ckpt_path="last"`` resumes from the rescue, the newer of it and ``last.ckpt``. (Two devices of
    one worker each: a restart is the same for any number of workers per device.)

    Before ``restart_safe_store`` the restarted workers read the dead workers' gloo addresses from the agent's
    store and never connected (the same happens to ``strategy="ddp"``).
    """
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=1",
        f"--master-port={free_port()}",
    ]
    reports = run_app(
        tmp_path, "--devices", "2", "--workers", "1", "--epochs", "3", "--kill-rank", "1", "--resume", "last",
        launcher=launcher, timeout=120,
    )
    rescue = torch.load(tmp_path / "ckpt" / "last-rescue.ckpt", weights_only=False)
    assert rescue["fedhog_rescue"]["lost"] == [1] and rescue["fedhog_work_sharing"] == "static"
    assert [r["rank"] for r in reports] == [0, 1]
    for report in reports:
        assert report["attempt"] == 1  # the reports come from the restarted workers
        # resumed from the rescue: rank 0's work in epoch 1 (one batch at least) is kept, not only epoch 0's (and
        # when rank 0 had trained its whole shard of epoch 1 before it noticed, the run goes on with epoch 2)
        assert report["started"]["epoch"] in (1, 2) and rescue["epoch"] == 1
        assert report["started"]["global_step"] == rescue["global_step"] > STEPS_PER_EPOCH
        assert report["current_epoch"] == 3  # and it finished the whole run
    assert_one_model(tmp_path, 2)
    saved = sorted(path.name for path in (tmp_path / "ckpt").glob("epoch=*.ckpt"))
    assert saved[0] == "epoch=0-step=8.ckpt" and saved[-1].startswith("epoch=2-")
    # from the kill's rescue to training again
    restarted_in = min(r["started"]["time"] for r in reports) - (tmp_path / "ckpt" / "last-rescue.ckpt").stat().st_mtime
    print(f"rescue written -> resumed training: {restarted_in:.1f} s")
    assert 0 < restarted_in < 60


@pytest.mark.slow
def test_an_elastic_run_that_loses_a_node_continues_alone_from_the_rescue(tmp_path: Path) -> None:
    """Two torchrun agents, ``--nnodes=1:2`` (c10d rendezvous on loopback). Node 1's worker and its agent are
    SIGKILLed in epoch 1, so the node never comes back; node 0's worker saves a rescue and fails, its agent starts
    it again, the rendezvous closes with node 0 alone, and the run continues with 1 device from the rescue."""
    # the rendezvous store lives in this test, so it outlives whichever node dies, and both agents start together:
    # the first round waits up to `last_call_timeout` for the second node, the round after the kill as long in vain
    rendezvous = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=1", "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{rendezvous.port}", "--rdzv-id=elastic", "--rdzv-conf=last_call_timeout=5",
        "--max-restarts=1", "--monitor-interval=0.5",
    ]
    args = ["--out", str(tmp_path), "--devices", "1", "--workers", "1", "--num-nodes", "0", "--probe-size", "2",
            "--epochs", "3", "--kill-rank", "1", "--kill-agent", "--sleep-rank", "0", "--sleep", "0.05",
            "--resume", "last", "--timeout", "30"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    agents = [
        subprocess.Popen([*launcher, str(APP), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        for _ in range(2)
    ]
    outputs = [agent.communicate(timeout=240)[0] for agent in agents]
    codes = sorted(agent.returncode for agent in agents)  # rank 1 is on whichever node joined second
    assert codes[0] < 0 and codes[1] == 0, "\n".join(output[-4000:] for output in outputs)  # one SIGKILLed, one done
    rescue = torch.load(tmp_path / "ckpt" / "last-rescue.ckpt", weights_only=False)
    assert rescue["fedhog_rescue"]["lost"] == [1] and rescue["epoch"] == 1
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert report["world_size"] == 1 and report["attempt"] == 1  # the restarted worker, alone
    assert report["started"]["epoch"] in (1, 2) and report["started"]["global_step"] == rescue["global_step"]
    assert report["current_epoch"] == 3


def test_resume_matches_uninterrupted_run_bitwise(tmp_path: Path) -> None:
    """2 epochs straight vs. resuming the second epoch from the straight run's epoch-0 checkpoint.

    One worker per device (no Hogwild! interleaving) and no background rounds (``averaging_period`` longer than
    the run): the devices mix only at consensus points, which happen at the same steps in both runs, so the
    resumed run is the same computation and must give the same bits: weights, Adam moments and LR schedule.
    """
    settings = ["--devices", "2", "--workers", "1", "--epochs", "2", "--period", "1000000", "--kind", "adam"]
    straight = run_app(tmp_path / "straight", *settings, timeout=120)
    checkpoint = tmp_path / "straight" / "ckpt" / "epoch=0-step=8.ckpt"
    resumed = run_app(tmp_path / "resumed", *settings, "--resume", str(checkpoint), timeout=120)

    assert [r["started"]["global_step"] for r in straight] == [0, 0]
    assert [r["started"]["global_step"] for r in resumed] == [8, 8]
    for first, second in zip(straight, resumed, strict=True):
        assert (second["current_epoch"], second["global_step"]) == (first["current_epoch"], first["global_step"])
        assert second["lrs"] == first["lrs"]
    for rank in range(2):
        a, b = load_rank(tmp_path / "straight", rank), load_rank(tmp_path / "resumed", rank)
        for key, value in a["state_dict"].items():
            assert torch.equal(b["state_dict"][key], value), key
        for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
            assert opt_a["state"].keys() == opt_b["state"].keys()
            for index, state in opt_a["state"].items():
                for name, value in state.items():
                    assert torch.equal(torch.as_tensor(opt_b["state"][index][name]), torch.as_tensor(value)), name
