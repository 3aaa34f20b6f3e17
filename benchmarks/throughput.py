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
    """Records a wall-clock time per step; ``slow_rank`` sleeps ``(slow_factor - 1)`` times its own step time."""

    def __init__(self, model: str, lr: float, slow_rank: int, slow_factor: float) -> None:
        super().__init__()
        self.net = make_model(model)
        self.lr = lr
        self.slow_rank, self.slow_factor = slow_rank, slow_factor
        self.times: list[float] = []
        self._step_time = 0.0
        self._slept = 0.0

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        now = time.time()
        if self.times:  # exponential average of this worker's own step time, without the injected sleep
            own = now - self.times[-1] - self._slept
            self._step_time = own if self._step_time == 0 else 0.9 * self._step_time + 0.1 * own
        self._slept = 0.0
        if self.global_rank == self.slow_rank and self._step_time > 0:
            self._slept = (self.slow_factor - 1) * self._step_time
            time.sleep(self._slept)
        self.times.append(time.time())
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

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
    parser.add_argument("--work-sharing", default="dynamic")
    parser.add_argument("--slow-rank", type=int, default=-1)
    parser.add_argument("--slow-factor", type=float, default=1.0)
    args = parser.parse_args()

    L.seed_everything(0)
    strategy = (
        FedHogStrategy(workers_per_device=args.workers, averaging_period=args.period, work_sharing=args.work_sharing)
        if args.strategy == "fedhog"
        else args.strategy
    )
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=args.devices, strategy=strategy, max_epochs=args.epochs,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    data = TensorDataset(torch.randn(args.samples, 3, 32, 32), torch.randint(0, 10, (args.samples,)))
    module = Timed(args.model, lr=0.05, slow_rank=args.slow_rank, slow_factor=args.slow_factor)
    trainer.fit(module, DataLoader(data, batch_size=args.batch, shuffle=True))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{trainer.global_rank}.json").write_text(
        json.dumps({"rank": trainer.global_rank, "batch": args.batch, "times": module.times})
    )


if __name__ == "__main__":
    main()
