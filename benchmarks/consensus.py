"""Time of one consensus point's exact average of a ResNet-50-sized vector between two device leaders.

    python -m benchmarks.consensus                 # CUDA if available (both leaders on GPU 0: gloo), else CPU

A consensus point (validation, checkpoint, end of ``fit``) replaces every device's copy with the exact average of
all copies; its cost is what a user waits for at each of them. Two processes, each holding a 25.6M-element fp32
vector (ResNet-50's parameter count), average it the way the averaging engine does at a consensus point
(:func:`~lightning_fedhog.averaging.exchange_average_` with ``exact=True``), and the wall-clock of each exchange
is taken after the device has finished it. With one GPU both leaders live on it, so the group is gloo (through
host memory, what fedhog uses when a GPU hosts several devices); with two GPUs NCCL is timed too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_fedhog.averaging import exchange_average_

RESNET50_ELEMENTS = 25_557_032


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _leader(rank: int, store_path: str, backend: str, devices: list[str], elements: int, repeats: int,
            out: str) -> None:
    device = torch.device(devices[rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.FileStore(store_path, 2)
    dist.init_process_group(backend, store=store, rank=rank, world_size=2, timeout=timedelta(minutes=2))
    try:
        generator = torch.Generator().manual_seed(rank)
        flat = torch.randn(elements, generator=generator).to(device)
        flag = torch.ones(1, device=device)
        seconds = []
        for _ in range(repeats + 1):  # the first exchange sets up connections and buffers: not counted
            dist.barrier()
            _synchronize(device)
            began = time.perf_counter()
            exchange_average_(flat, None, 2, flag, exact=True)
            _synchronize(device)
            seconds.append(time.perf_counter() - began)
        if rank == 0:
            Path(out).write_text(json.dumps(seconds[1:]))
    finally:
        dist.destroy_process_group()


def measure(backend: str, devices: list[str], elements: int = RESNET50_ELEMENTS, repeats: int = 5) -> dict[str, Any]:
    """Median seconds of one exact average of ``elements`` fp32 values between two leaders on ``devices``."""
    with tempfile.TemporaryDirectory(prefix="fedhog-consensus-") as tmp:
        out = Path(tmp) / "seconds.json"
        mp.spawn(_leader, args=(str(Path(tmp) / "store"), backend, devices, elements, repeats, str(out)), nprocs=2)
        seconds = json.loads(out.read_text())
    return {
        "backend": backend,
        "devices": devices,
        "elements": elements,
        "megabytes": elements * 4 / 1e6,
        "seconds": statistics.median(seconds),
        "all_seconds": seconds,
    }


def measure_all(elements: int = RESNET50_ELEMENTS, repeats: int = 5) -> dict[str, dict[str, Any]]:
    """Every leader placement this machine has: two GPUs over NCCL, one GPU over gloo, else CPU over gloo."""
    results: dict[str, dict[str, Any]] = {}
    if torch.cuda.device_count() >= 2:
        results["nccl_two_gpus"] = measure("nccl", ["cuda:0", "cuda:1"], elements, repeats)
    if torch.cuda.is_available():
        results["gloo_one_gpu"] = measure("gloo", ["cuda:0", "cuda:0"], elements, repeats)
    else:
        results["gloo_cpu"] = measure("gloo", ["cpu", "cpu"], elements, repeats)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.consensus", description=__doc__.split("\n")[0])
    parser.add_argument("--elements", type=int, default=RESNET50_ELEMENTS)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(measure_all(args.elements, args.repeats), indent=2))


if __name__ == "__main__":
    main()
