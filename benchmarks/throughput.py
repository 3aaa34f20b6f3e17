"""One timed training run; every rank writes its step times. Launched by ``python -m benchmarks``.

Lightning re-runs this script for each worker, so it is a program, not a function. Models, on synthetic
CIFAR-shaped batches: ``mlp`` (1.6M parameters, CPU), ``wide`` (9.5M parameters: communication-heavy, for the
thin-link benchmark) and ``resnet20`` (the paper's CIFAR ResNet-20, 0.27M parameters: the GPU benchmark).
Strategies: ``fedhog``, ``ddp``, ``post_local`` (DDP with post-local SGD: local steps, parameters averaged every
``--period`` steps) and ``single`` (one process, no communication: the runs the physical limit is summed from).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

import lightning_fedhog  # noqa: F401 - registers strategy names
from lightning_fedhog import FedHogStrategy
from lightning_fedhog.config import FedHogConfig
from recipes.models import resnet20


def make_model(name: str) -> nn.Module:
    if name == "resnet20":
        return resnet20(10)
    if name == "wide":
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3072), nn.ReLU(), nn.Linear(3072, 10))
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 512), nn.ReLU(), nn.Linear(512, 10))


def averaging_phase(now: float, seconds: float) -> tuple[int, bool]:
    """With ``--alternate``: the phase the moment ``now`` (``time.time()``) falls in, and whether it has rounds.

    Phases are ``seconds`` of the machine's clock, so every rank of one machine switches at the same moment: counted
    in batches, the ranks' phases would drift apart (nothing makes them wait for each other between consensus
    points), and a leader in a phase with rounds would wait in the collective for one in a phase without.
    """
    number = int(now // seconds)
    return number, number % 2 == 1


NO_ROUNDS = 10**9
"""The period of a phase without rounds: :data:`benchmarks.catalog.NO_ROUNDS`, which this program cannot import (it
runs as a script, where only installed packages are; tests/test_benchmarks.py checks that the two agree)."""


@dataclass(frozen=True, kw_only=True)
class AlternatingConfig(FedHogConfig):
    """fedhog's settings, with no round in every other phase of ``phase_s`` seconds (the period set out of reach)."""

    phase_s: float = 2.0

    @override
    def period_at(self, epoch: int) -> int | Literal["auto"]:
        with_rounds = averaging_phase(time.time(), self.phase_s)[1]
        return super().period_at(epoch) if with_rounds else NO_ROUNDS


class Alternating(FedHogStrategy):
    """fedhog with :class:`AlternatingConfig`: one run measures steps with and without averaging seconds apart, under
    the same load on the machine (:func:`benchmarks.harness.paired_costs`). The strategy sets the engine's period at
    every batch start from ``period_at``, once. A round in flight when a phase without rounds begins still finishes:
    the measurement leaves out the start of each phase."""

    def __init__(self, phase_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        given = {field.name: getattr(self.config, field.name) for field in dataclasses.fields(FedHogConfig)}
        self.config = AlternatingConfig(**given, phase_s=phase_s)


def make_strategy(args: argparse.Namespace) -> Any:
    if args.strategy == "fedhog" and args.alternate:
        return Alternating(
            args.alternate, workers_per_device=args.workers, averaging_period=args.period, num_blocks=args.blocks,
            work_sharing=args.work_sharing,
        )
    if args.strategy == "fedhog":
        return FedHogStrategy(
            workers_per_device=args.workers,
            averaging_period=args.period,
            num_blocks=args.blocks,
            work_sharing=args.work_sharing,
        )
    if args.strategy == "post_local":
        # torch's post-local SGD (Lin et al., 2020): after `start_localSGD_iter` steps no gradient all-reduce
        # (post_local_gradient_allreduce=False: per device, not per node), parameters averaged every `period`
        return PostLocalSGDOnCPU(
            model_averaging_period=args.period,
            ddp_comm_state=PostLocalSGDState(
                process_group=None, subgroup=None, start_localSGD_iter=1, post_local_gradient_allreduce=False
            ),
            ddp_comm_hook=post_localSGD_hook,
        )
    if args.strategy == "single":
        return "auto"
    return args.strategy


class PostLocalSGDOnCPU(DDPStrategy):
    """Lightning's post-local SGD, with its DDP communication hook installed on CPU too.

    Lightning registers ``ddp_comm_hook`` only for CUDA devices, so on CPU its post-local SGD all-reduces every
    gradient *and* averages the parameters: slower than DDP, not the baseline the paper compares with. torch's
    hook itself works with gloo, so on other devices this strategy registers it on the
    :class:`~torch.nn.parallel.DistributedDataParallel` module itself (public torch API) once Lightning has wrapped
    the model. Lightning's parameter averaging (``model_averaging_period``, from the state's
    ``start_localSGD_iter`` on) is unchanged.

    Args:
        ddp_comm_state: the hook's state (:class:`~torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook.
            PostLocalSGDState` for post-local SGD).
        ddp_comm_hook: the hook (``post_localSGD_hook``).
        **kwargs: the rest of :class:`~lightning.pytorch.strategies.DDPStrategy`'s arguments
            (``model_averaging_period``, ...).
    """

    def __init__(self, ddp_comm_state: object | None = None, ddp_comm_hook: Callable | None = None,
                 **kwargs: Any) -> None:
        super().__init__(ddp_comm_state=ddp_comm_state, ddp_comm_hook=ddp_comm_hook, **kwargs)
        self.comm_state, self.comm_hook = ddp_comm_state, ddp_comm_hook

    @override
    def configure_ddp(self) -> None:
        super().configure_ddp()  # wraps the model; registers the hook on CUDA devices
        if self.comm_hook is not None and self.root_device.type != "cuda":
            assert isinstance(self.model, DistributedDataParallel)
            self.model.register_comm_hook(state=self.comm_state, hook=self.comm_hook)


def calibrate_step(model: str, batch: int, steps: int = 20) -> float:
    """Median seconds of one training step's compute (forward, backward, SGD) on one thread, as each of 2 workers runs.

    A straggler that sleeps this long per step is 2x slower whatever the method's communication costs, so every
    method faces the same hindrance (a sleep proportional to a method's own step time would punish a method whose
    steps include communication, e.g. DDP's all-reduce, more).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = make_model(model)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        x, y = torch.randn(batch, 3, 32, 32) / 32, torch.randint(0, 10, (batch,))
        seconds = []
        for step in range(steps + 5):  # 5 warm-up steps
            began = time.perf_counter()
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
            if step >= 5:
                seconds.append(time.perf_counter() - began)
        return statistics.median(seconds)
    finally:
        torch.set_num_threads(threads)


class Timed(L.LightningModule):
    """Records a wall-clock time per step; ``slow_rank`` sleeps ``slow_seconds`` per step, or ``(slow_factor - 1)``
    times its own step time."""

    def __init__(
        self, model: str, lr: float, slow_rank: int, slow_factor: float, slow_seconds: float = 0.0,
        alternate: float = 0.0,
    ) -> None:
        super().__init__()
        self.net = make_model(model)
        self.lr = lr
        self.slow_rank, self.slow_factor, self.slow_seconds = slow_rank, slow_factor, slow_seconds
        self.times: list[float] = []
        self.alternate = alternate
        self.phases: list[list[int]] = []  # with --alternate: per step, [phase number, 1 if with rounds, epoch]
        self._step_time = 0.0
        self._slept = 0.0

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        now = time.time()
        if self.times:  # exponential average of this worker's own step time, without the injected sleep
            own = now - self.times[-1] - self._slept
            self._step_time = own if self._step_time == 0 else 0.9 * self._step_time + 0.1 * own
        self._slept = 0.0
        if self.global_rank == self.slow_rank and self.slow_seconds > 0:
            self._slept = self.slow_seconds
            time.sleep(self._slept)
        elif self.global_rank == self.slow_rank and self._step_time > 0:
            self._slept = (self.slow_factor - 1) * self._step_time
            time.sleep(self._slept)
        self.times.append(time.time())
        if self.alternate:
            number, with_rounds = averaging_phase(self.times[-1], self.alternate)
            self.phases.append([number, int(with_rounds), self.current_epoch])
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, nesterov=True)


def _period(value: str) -> int | str:
    return value if value == "auto" else int(value)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--strategy", default="fedhog", help="fedhog, ddp, post_local, single, or a registered name")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--period", type=_period, default=16, help="device steps between rounds, or 'auto' (fedhog)")
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--model", default="mlp", choices=["mlp", "wide", "resnet20"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--work-sharing", default="static", choices=["static", "dynamic"])
    parser.add_argument("--slow-rank", type=int, default=-1)
    parser.add_argument("--slow-factor", type=float, default=1.0)
    parser.add_argument("--slow-seconds", type=float, default=0.0, help="a fixed sleep per step of --slow-rank")
    parser.add_argument("--alternate", type=float, default=0.0,
                        help="fedhog: no rounds in every other phase of this many seconds (P6's paired measurement)")
    parser.add_argument("--csv", action="store_true", help="log to a CSVLogger under OUT/logs (fedhog's figures)")
    args = parser.parse_args()

    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=1 if args.strategy == "single" else args.devices,
        strategy=make_strategy(args), max_epochs=args.epochs,
        logger=L.pytorch.loggers.CSVLogger(args.out / "logs", name="run") if args.csv else False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    # inputs of norm ~1.7 (not ~55): plain SGD on random labels stays finite at this learning rate
    data = TensorDataset(torch.randn(args.samples, 3, 32, 32) / 32, torch.randint(0, 10, (args.samples,)))
    module = Timed(args.model, lr=0.01, slow_rank=args.slow_rank, slow_factor=args.slow_factor,
                   slow_seconds=args.slow_seconds, alternate=args.alternate)
    trainer.fit(module, DataLoader(data, batch_size=args.batch, shuffle=True))
    if torch.cuda.is_available() and args.accelerator == "gpu":
        torch.cuda.synchronize()  # the queued kernels are part of the run
    fit_end = time.time()  # after fedhog's final consensus (the exact average): work the user waits for too
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{trainer.global_rank}.json").write_text(
        json.dumps({"rank": trainer.global_rank, "batch": args.batch, "times": module.times, "pid": os.getpid(),
                    "fit_end": fit_end, "phases": module.phases, "alternate": args.alternate})
    )


if __name__ == "__main__":
    main()
