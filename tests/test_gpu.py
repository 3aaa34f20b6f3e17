"""The CUDA path: K workers sharing one GPU copy through IPC, device leaders averaging on a GPU. Skipped without CUDA.

One GPU is enough for all but the last test: two fedhog devices mapped to the same GPU (``--gpu-ids 0,0``) have
two leaders, which average over gloo (NCCL refuses two ranks on one GPU), so everything between devices runs:
the initial broadcast, background rounds, gossip, consensus points, checkpoints and resume.

Every run checks the two things that go wrong silently on CUDA: the workers' last steps landing before the exact
average is taken (``probe`` counts every step of every rank, so a lost step changes it), and every rank ending
with the same bits, equal to the checkpoint saved at the end.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.conftest import load_rank, run_app, thread_groups

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LR = 0.125  # the app's default: plain SGD moves probe[r] by -LR per step of rank r


def run_on_gpu(out: Path, *args: str) -> list[dict]:
    """The app on CUDA; a stuck collective fails within 30 s (naming the peers) instead of hanging the check."""
    return run_app(out, "--accelerator", "gpu", "--timeout", "30", *args, launcher=[sys.executable], timeout=150)


def _floating(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # integer buffers (BatchNorm's num_batches_tracked) are each worker's own: rank 0's is saved
    return {key: value for key, value in state.items() if value.is_floating_point()}


def assert_one_consensus_model(out: Path, world_size: int) -> dict[str, torch.Tensor]:
    """Every rank's final weights are the same bits, and the same as the checkpoint written at the end."""
    states = [_floating(load_rank(out, rank)["state_dict"]) for rank in range(world_size)]
    saved = _floating(torch.load(out / "ckpt" / "last.ckpt", weights_only=False, map_location="cpu")["state_dict"])
    assert states[0].keys() == saved.keys()
    for key, value in saved.items():
        assert torch.isfinite(value).all(), key
        for rank, state in enumerate(states):
            assert torch.equal(state[key], value), f"rank {rank} differs from the checkpoint in {key}"
    return saved


def assert_every_step_landed(saved: dict[str, torch.Tensor], reports: list[dict], devices: int) -> None:
    """probe[r] gets a gradient of exactly 1 from rank r only, so the consensus holds -LR * steps / devices."""
    steps = reports[0]["global_step"]
    expected = torch.full((len(reports),), -steps * LR / devices)
    assert torch.equal(saved["probe"], expected), saved["probe"]


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_k_workers_share_one_gpu_copy(tmp_path: Path, workers: int) -> None:
    reports = run_on_gpu(
        tmp_path, "--devices", "1", "--workers", str(workers), "--kind", "bn",
        "--epochs", "2",
    )
    assert [r["root_device"] for r in reports] == ["cuda:0"] * workers
    saved = assert_one_consensus_model(tmp_path, workers)
    assert_every_step_landed(saved, reports, devices=1)


@pytest.mark.parametrize(
    ("averaging", "extra"),
    [("allreduce", ()), ("gossip", ()), ("allreduce", ("--compression", "int8", "--blocks", "2", "--in-flight", "2"))],
    ids=["allreduce", "gossip", "int8-two-in-flight"],
)
def test_two_devices_on_one_gpu_average_over_gloo(tmp_path: Path, averaging: str, extra: tuple[str, ...]) -> None:
    # int8: the compressed rounds' CUDA payloads travel through host memory for gloo's all-gather
    reports = run_on_gpu(
        tmp_path, "--gpu-ids", "0,0", "--workers", "2", "--kind", "bn", "--epochs", "2",
        "--averaging", averaging, "--period", "1", *extra,
    )
    assert [r["root_device"] for r in reports] == ["cuda:0"] * 4
    assert {r["leader_backend"] for r in reports} == {"gloo"}
    saved = assert_one_consensus_model(tmp_path, 4)
    assert_every_step_landed(saved, reports, devices=2)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_on_one_gpu(tmp_path: Path, precision: str) -> None:
    """A GradScaler per worker (16-mixed) or autocast alone (bf16-mixed); the shared weights stay fp32."""
    reports = run_on_gpu(
        tmp_path, "--gpu-ids", "0,0", "--workers", "2", "--kind", "bn", "--epochs", "2",
        "--precision", precision,
    )
    saved = assert_one_consensus_model(tmp_path, 4)
    assert saved["net.0.weight"].dtype == torch.float32
    assert {r["global_step"] for r in reports} == {8}  # 2 epochs x 256 samples / 4 workers / batch 16
    assert reports[0]["metrics"]["val_acc"] > 0.5  # it learned something: the 4 classes are well separated


def test_resume_on_gpu_continues_bit_exactly(tmp_path: Path) -> None:
    """2 epochs straight vs. the second epoch resumed from the first's checkpoint, two devices on one GPU.

    One worker per device and no background rounds (the devices mix only at consensus points, at the same steps
    in both runs): the same computation, so the same bits, Adam moments and LR schedule included.
    """
    settings = ["--gpu-ids", "0,0", "--workers", "1", "--epochs", "2",
                "--period", "1000000", "--kind", "adam"]
    straight = run_on_gpu(tmp_path / "straight", *settings)
    checkpoint = tmp_path / "straight" / "ckpt" / "epoch=0-step=8.ckpt"
    resumed = run_on_gpu(tmp_path / "resumed", *settings, "--resume", str(checkpoint))
    assert [r["started"]["global_step"] for r in resumed] == [8, 8]
    for first, second in zip(straight, resumed, strict=True):
        assert (second["current_epoch"], second["global_step"], second["lrs"]) == (
            first["current_epoch"], first["global_step"], first["lrs"]
        )
    assert_one_consensus_model(tmp_path / "resumed", 2)
    for rank in range(2):
        a, b = load_rank(tmp_path / "straight", rank), load_rank(tmp_path / "resumed", rank)
        for key, value in a["state_dict"].items():
            assert torch.equal(b["state_dict"][key], value), key
        for index, state in a["optimizer_states"][0]["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(b["optimizer_states"][0]["state"][index][name]).cpu(),
                                   torch.as_tensor(value).cpu()), name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between leaders needs two GPUs")
@pytest.mark.parametrize("averaging", ["allreduce", "gossip"])
def test_nccl_leaders_on_two_gpus(tmp_path: Path, averaging: str) -> None:
    reports = run_on_gpu(
        tmp_path, "--devices", "2", "--workers", "2", "--kind", "bn", "--epochs", "2",
        "--averaging", averaging, "--period", "1",
    )
    assert {r["root_device"] for r in reports} == {"cuda:0", "cuda:1"}
    assert {r["leader_backend"] for r in reports} == {"nccl"}
    saved = assert_one_consensus_model(tmp_path, 4)
    assert_every_step_landed(saved, reports, devices=2)


@pytest.mark.parametrize("codec", ["int8", "bf16"])
def test_compressed_rounds_and_consensus_on_cuda_stay_within_their_memory_bound(codec: str) -> None:
    """A compressed round of a 256 MiB block on CUDA (one leader: a gloo group of one, its messages staged
    through host memory) raises the GPU's peak by at most one fp32 copy of the block plus a fixed workspace; a
    compressed consensus point by that plus its residual (one fp32 copy, kept until training resumes). The copy
    ends as the reference, the same bits, and adding the residual back gives the copy before the point."""
    from lightning_fedhog.compression import PIECE, SharedReference
    from lightning_fedhog.consensus_average import consensus_compressed_, restore_residual_

    numel, device, workspace = 1 << 26, torch.device("cuda", 0), 16 * PIECE * 4
    _store, (group,) = thread_groups(1, timeout=60.0)
    live = torch.randn(numel, device=device, generator=torch.Generator(device).manual_seed(0))
    shared = SharedReference(numel, 1, device)
    shared.values.copy_(live).mul_(0.5)
    shared.tracked(0)
    control = torch.zeros(4, device=device)
    shared.start_(live[:PIECE], (0, PIECE), group, 1, control, codec)(accept=lambda summed: True, stats={})

    def extra(work: Callable[[], object]) -> tuple[int, object]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = work()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, result

    round_extra, _ = extra(lambda: shared.start_(live, (0, numel), group, 1, control, codec)(
        accept=lambda summed: True, stats={}))
    snapshot = live.clone()
    consensus_extra, residual = extra(lambda: consensus_compressed_(live, shared.values, group, 1, codec))
    print(f"{codec}: a round of {numel * 4 / 2**20:.0f} MiB raised the peak by {round_extra / 2**20:.0f} MiB,"
          f" a consensus point by {consensus_extra / 2**20:.0f} MiB (its residual: {numel * 4 / 2**20:.0f} MiB)")
    assert round_extra <= 4 * numel + workspace, f"{round_extra / 2**20:.0f} MiB"
    assert consensus_extra <= 8 * numel + workspace, f"{consensus_extra / 2**20:.0f} MiB"
    assert torch.equal(live, shared.values)
    restore_residual_(live, residual)
    torch.testing.assert_close(live, snapshot, rtol=0, atol=1e-5)
