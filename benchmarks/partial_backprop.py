"""Backward time of a partial step (one worker's block) vs a full step, for both partial-backprop partitions.

    python benchmarks/partial_backprop.py --workers 4 --output benchmarks/results/partial_backprop.json

A small CIFAR-shaped CNN on random batches; each figure is the median over ``--repeats`` forward+backward passes
(forward included, since a partial step's forward also skips saving what the frozen tensors would need).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lightning_fedhog.partial import gradients_only_for, record_positions
from lightning_fedhog.partitions import partition_tensors, tensor_costs


def small_cnn() -> nn.Module:
    def stage(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *stage(3, 16), *stage(16, 16), nn.MaxPool2d(2), *stage(16, 32), *stage(32, 32), nn.MaxPool2d(2),
        *stage(32, 64), *stage(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 256), nn.ReLU(),
        nn.Linear(256, 10),
    )


def timed(model: nn.Module, x: torch.Tensor, y: torch.Tensor, keep: range | None, repeats: int) -> float:
    params = list(model.parameters())
    samples = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        if keep is None:
            loss = nn.functional.cross_entropy(model(x), y)
        else:
            with gradients_only_for(params, keep):
                loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/partial_backprop.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = small_cnn()
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    positions, remove = record_positions(model)
    model(x)
    remove()
    params = list(model.parameters())
    numels = [p.numel() for p in params]
    per_tensor = [positions.get(id(p), 1) for p in params]
    timed(model, x, y, None, 3)  # warm-up
    full = timed(model, x, y, None, args.repeats)
    report: dict = {"command": " ".join([sys.executable, *sys.argv]), "full_step_s": full, "partitions": {}}
    for partition in ("numel", "compute"):
        blocks = partition_tensors(tensor_costs(numels, per_tensor, partition), args.workers)
        rows = []
        for worker, block in enumerate(blocks):
            partial = timed(model, x, y, block, args.repeats)
            rows.append({
                "worker": worker,
                "tensors": [block.start, block.stop],
                "elements": sum(numels[i] for i in block),
                "partial_step_s": partial,
                "partial_over_full": partial / full,
            })
        report["partitions"][partition] = rows
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    for partition, rows in report["partitions"].items():
        ratios = ", ".join(f"w{r['worker']} {r['partial_over_full']:.2f}" for r in rows)
        print(f"{partition:8s} partial/full: {ratios}   (full step {full * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
