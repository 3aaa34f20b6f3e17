"""GPU paths: CUDA IPC sharing between the K workers of a GPU and NCCL between leaders. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import load_rank, run_app

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_k_workers_share_one_gpu_copy(tmp_path: Path) -> None:
    devices = min(torch.cuda.device_count(), 2)
    reports = run_app(
        tmp_path, "--accelerator", "gpu", "--devices", str(devices), "--workers", "2", "--kind", "bn", "--epochs", "2"
    )
    assert {r["root_device"] for r in reports} == {f"cuda:{d}" for d in range(devices)}
    states = [load_rank(tmp_path, rank)["state_dict"] for rank in range(2 * devices)]
    for key, value in states[0].items():
        assert all(torch.equal(state[key], value) for state in states), key
    steps = reports[0]["global_step"]
    # probe[r] counts rank r's steps; shared by IPC on a device, averaged across devices by NCCL
    assert torch.equal(states[0]["probe"].cpu(), torch.full((2 * devices,), -steps * 0.125 / devices))
