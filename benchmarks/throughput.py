"""One timed training run; every rank writes its samples/s. Launched by ``benchmarks/compare.py``.

Lightning re-runs this script for each worker, so it is a program, not a function. The model is a
ResNet-20-like CNN on synthetic CIFAR-shaped data (the GPU smoke test) or a small MLP (CPU).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_fedhog  # noqa: F401 - registers strategy names
from lightning_fedhog import FedHogStrategy


def _block(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
    )


def make_model(name: str) -> nn.Module:
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), *[_block(32) for _ in range(3)],
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 512), nn.ReLU(), nn.Linear(512, 10))


class Timed(L.LightningModule):
    def __init__(self, model: str, lr: float) -> None:
        super().__init__()
        self.net = make_model(model)
        self.lr = lr
        self.times: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.times.append(time.perf_counter())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, nesterov=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--strategy", default="fedhog", help="fedhog, ddp, or any registered name")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--period", type=int, default=16)
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()

    L.seed_everything(0)
    strategy = (
        FedHogStrategy(workers_per_device=args.workers, averaging_period=args.period)
        if args.strategy == "fedhog"
        else args.strategy
    )
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=args.devices, strategy=strategy, max_epochs=args.epochs,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    data = TensorDataset(torch.randn(args.samples, 3, 32, 32), torch.randint(0, 10, (args.samples,)))
    module = Timed(args.model, lr=0.05)
    start = time.perf_counter()
    trainer.fit(module, DataLoader(data, batch_size=args.batch, shuffle=True))
    wall = time.perf_counter() - start
    steps = len(module.times)
    warm = module.times[min(5, steps - 1)]  # skip the first steps (allocation, first collectives)
    rate = (steps - 1 - min(5, steps - 1)) * args.batch / max(module.times[-1] - warm, 1e-9)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{trainer.global_rank}.json").write_text(
        json.dumps({"rank": trainer.global_rank, "steps": steps, "samples_per_s": rate, "wall_s": wall})
    )


if __name__ == "__main__":
    main()
