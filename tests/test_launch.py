"""The same program under torchrun (one node; two nodes on localhost) and as SLURM tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import APP, assert_one_model, free_port, load_rank, run_app

pytestmark = pytest.mark.slow


def test_torchrun_single_node(tmp_path: Path) -> None:
    # 2 devices x 1 worker; 2 workers sharing a device under torchrun: the two-node test below (the docs' 2 x 2
    # torchrun commands run as ranks forked the way torchrun starts them: tests/test_docs.py)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}"]
    reports = run_app(tmp_path, "--devices", "2", "--workers", "1", "--epochs", "1", launcher=launcher)
    assert [r["local_rank"] for r in reports] == [0, 1]
    assert len({r["pid"] for r in reports}) == 2
    assert {r["environment"] for r in reports} == {"TorchElasticEnvironment"}
    assert_one_model(tmp_path, 2)


def test_torchrun_two_nodes_on_localhost(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    agents = [
        subprocess.Popen(
            [
                sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={port}",
                str(APP), "--out", str(tmp_path), "--devices", "1", "--num-nodes", "2", "--workers", "2",
                "--epochs", "1",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in range(2)
    ]
    for agent in agents:
        output, _ = agent.communicate(timeout=240)
        assert agent.returncode == 0, output[-6000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert [(r["node_rank"], r["local_rank"]) for r in reports] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {r["environment"] for r in reports} == {"TorchElasticEnvironment"}
    assert_one_model(tmp_path, 4)
    # two devices (one per node) averaged their probes: each holds the mean of both
    probe = load_rank(tmp_path, 0)["state_dict"]["probe"]
    assert torch.equal(probe, probe.mean().expand(4))


def test_slurm_tasks(tmp_path: Path) -> None:
    """Two tasks of one SLURM step (``srun --ntasks-per-node=2``: 2 devices x 1 worker), started as srun does."""
    port = free_port()
    tasks = []
    for rank in range(2):
        env = {
            **os.environ,
            "PYTHONWARNINGS": "ignore",
            "SLURM_NTASKS": "2",
            "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_NNODES": "1",
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank),
            "SLURM_NODEID": "0",
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "fedhog-test",
            "SLURM_NODELIST": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        command = [sys.executable, str(APP), "--out", str(tmp_path), "--devices", "2", "--workers", "1"]
        command += ["--epochs", "1"]
        tasks.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for task in tasks:
        output, _ = task.communicate(timeout=240)
        assert task.returncode == 0, output[-6000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert {r["environment"] for r in reports} == {"SLURMEnvironment"}
    assert [r["root_device"] for r in reports] == ["cpu"] * 2
    assert_one_model(tmp_path, 2)

