"""A training script the end-to-end tests launch as a real program (plain, under torchrun, or as SLURM tasks).

Lightning's subprocess launcher re-runs ``sys.argv`` for every extra local rank, so the tests cannot call
``Trainer.fit`` from inside pytest: they run this file. Every rank writes what it saw to ``--out``:
``rank{R}.json`` (counters, metrics, step times) and ``rank{R}.pt`` (final weights, optimizer states).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_fedhog
from lightning_fedhog import FedHogStrategy

NUM_FEATURES, NUM_CLASSES = 16, 4


def make_data(num_samples: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(NUM_CLASSES, NUM_FEATURES, generator=torch.Generator().manual_seed(0)) * 2
    labels = torch.randint(0, NUM_CLASSES, (num_samples,), generator=generator)
    features = centers[labels] + torch.randn(num_samples, NUM_FEATURES, generator=generator)
    return TensorDataset(features, labels, torch.arange(num_samples))


class Net(L.LightningModule):
    """One module, several shapes of "unchanged user code", picked by ``kind``."""

    def __init__(
        self,
        kind: str,
        world_size: int,
        lr: float,
        sleep_rank: int,
        sleep: float,
        crash_rank: int = -1,
        nan_rank: int = -1,
        kill_rank: int = -1,
        kill_step: int = -1,
        sigterm_rank: int = -1,
        sigterm_step: int = -1,
        sigterm_group: bool = False,
        schedule: str = "none",
        sigterm_epoch_end: int = -1,
        estimate_in_setup: bool = False,
        out: str = "",
        sleep_from_epoch: int = 0,
        trace: str = "",
        kill_agent: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Linear(NUM_FEATURES, 32)]
        self.automatic_optimization = kind != "manual"
        if kind == "bn":
            layers.append(nn.BatchNorm1d(32))
        layers += [nn.ReLU(), nn.Linear(32, NUM_CLASSES)]
        self.net = nn.Sequential(*layers)
        # probe[r] receives a gradient of exactly 1 from rank r only: plain SGD makes it count rank r's steps
        self.probe = nn.Parameter(torch.zeros(world_size))
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")
        self.step_times: list[float] = []
        self.seen: dict[int, list[int]] = {}  # epoch -> sample indices this worker trained on
        self.batches: dict[int, list[list[int]]] = {}  # epoch -> the sample indices of each batch, in order
        self.sched_steps: list[int] = []  # the per-step schedule's position (`last_epoch`) at every step
        self.setup_estimate: float | None = None  # trainer.estimated_stepping_batches, read in `setup()`
        self.sharing: dict[int, str] = {}  # epoch -> how its batches were shared out ("static" or "dynamic")
        self.started: dict[str, float] = {}
        self.estimated: float | None = None  # trainer.estimated_stepping_batches, read in configure_optimizers
        self.lr_trace: list[float] = []  # the LR of every step this worker took
        self.hook_sums: dict[str, list[float]] = {}  # what user hooks saw of the model (see ModelProbe)
        self.partial_steps: dict[int, int] = {}  # epoch -> steps run with some parameter not requiring gradients

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def setup(self, stage: str) -> None:
        if self.hparams.estimate_in_setup and stage == "fit":  # before Lightning restores a checkpoint
            self.setup_estimate = float(self.trainer.estimated_stepping_batches)

    def on_train_epoch_end(self) -> None:
        if self.global_rank == self.hparams.sigterm_rank and self.current_epoch == self.hparams.sigterm_epoch_end:
            print(f"SIGTERM rank {self.global_rank} at {time.time()}", flush=True)
            for pid_file in (Path(self.hparams.out) / "pids").iterdir():  # every rank, as SLURM does on preemption
                os.kill(int(pid_file.read_text()), signal.SIGTERM)

    def on_train_start(self) -> None:
        # where this attempt starts (epoch 0, step 0 when fresh; the checkpoint's epoch and step when resumed) and
        # when, on the wall clock, to compare with file times across restarts
        self.started = {"epoch": self.current_epoch, "global_step": self.global_step, "time": time.time()}
        pids = Path(self.hparams.out) / "pids"
        pids.mkdir(parents=True, exist_ok=True)
        (pids / str(self.global_rank)).write_text(str(os.getpid()))  # for a SIGTERM to every rank of this run

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        if self.hparams.trace:  # every batch as it starts, flushed: what a killed worker trained is known
            path = Path(self.hparams.out) / f"trace-{self.hparams.trace}-rank{self.global_rank}.jsonl"
            with path.open("a") as file:
                file.write(json.dumps([self.current_epoch, batch[2].tolist()]) + "\n")
        work = getattr(self.trainer.strategy, "work", None)
        self.sharing[self.current_epoch] = "dynamic" if work is not None and work.sampler is not None else "static"
        if self.global_rank == self.hparams.sleep_rank and self.current_epoch >= self.hparams.sleep_from_epoch:
            if batch_idx == 0 and self.current_epoch == self.hparams.sleep_from_epoch:
                print(f"SLEEP rank {self.global_rank} at {time.time()}", flush=True)
            time.sleep(self.hparams.sleep)
        if self.global_rank == self.hparams.crash_rank and self.global_step == 3:
            raise RuntimeError(f"injected failure on rank {self.global_rank}")
        restarts = (os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"), os.environ.get("SLURM_RESTART_COUNT", "0"))
        first_attempt = restarts == ("0", "0")  # torchrun's restart count, or a requeued SLURM job's
        kill_now = (
            self.global_step == self.hparams.kill_step
            if self.hparams.kill_step >= 0
            else self.current_epoch == 1 and batch_idx == 1
        )
        if self.global_rank == self.hparams.kill_rank and kill_now and first_attempt:
            print(f"KILLED rank {self.global_rank} at {time.time()}", flush=True)
            if self.hparams.kill_agent:  # the node is gone: its torchrun agent will not start it again
                os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)  # a worker dies without a word
        if self.global_rank == self.hparams.sigterm_rank and self.global_step == self.hparams.sigterm_step:
            print(f"SIGTERM rank {self.global_rank} at {time.time()}", flush=True)
            if self.hparams.sigterm_group:  # every process of the run at once, as SLURM does on preemption
                os.killpg(os.getpgid(0), signal.SIGTERM)
            else:  # this one rank only
                os.kill(os.getpid(), signal.SIGTERM)
        if self.global_rank == self.hparams.nan_rank and self.current_epoch == 1 and batch_idx == 1:
            print(f"NAN rank {self.global_rank} at {time.time()}", flush=True)
            with torch.no_grad():
                self.net[0].weight[0, 0] = float("nan")  # corrupt this device's shared copy
        if isinstance(batch, dict):  # several training loaders: record every loader's batch, train on the first
            for loader_batch in list(batch.values())[1:]:
                self.seen.setdefault(self.current_epoch, []).extend(loader_batch[2].tolist())
            batch = next(iter(batch.values()))
        x, y, index = batch
        partial = not all(parameter.requires_grad for parameter in self.parameters())
        self.partial_steps[self.current_epoch] = self.partial_steps.get(self.current_epoch, 0) + partial
        self.seen.setdefault(self.current_epoch, []).extend(index.tolist())
        self.batches.setdefault(self.current_epoch, []).append(index.tolist())
        if self.trainer.lr_scheduler_configs:
            self.sched_steps.append(int(self.trainer.lr_scheduler_configs[0].scheduler.last_epoch))
        loss = nn.functional.cross_entropy(self(x), y)
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(loss + self.probe[self.global_rank])
            optimizer.step()
        self.lr_trace.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log("train_loss", loss, sync_dist=True)
        self.log("train_loss_epoch_mean", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.step_times.append(time.monotonic())
        return loss + self.probe[self.global_rank]

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        x, y, _ = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc, on_epoch=True)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log("val_count", torch.tensor(float(len(y))), reduce_fx="sum", sync_dist=True, on_epoch=True)

    def on_validation_start(self) -> None:
        ModelProbe.record(self, "module.on_validation_start")

    def configure_optimizers(self):
        net_params = list(self.net.parameters())
        if self.hparams.schedule != "none":
            self.estimated = float(self.trainer.estimated_stepping_batches)
            optimizer = torch.optim.SGD(net_params + [self.probe], lr=self.hparams.lr)
            if self.hparams.schedule == "cosine":
                scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(self.estimated))
            else:
                scheduler = torch.optim.lr_scheduler.OneCycleLR(
                    optimizer, max_lr=self.hparams.lr, total_steps=int(self.estimated)
                )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        if self.hparams.kind == "adam":
            optimizer = torch.optim.Adam(
                [{"params": net_params}, {"params": [self.probe], "betas": (0.0, 0.0)}], lr=self.hparams.lr
            )
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
            return {"optimizer": optimizer, "lr_scheduler": scheduler}
        return torch.optim.SGD(
            [{"params": net_params, "momentum": 0.9}, {"params": [self.probe], "momentum": 0.0}], lr=self.hparams.lr
        )


class ModelProbe(L.Callback):
    """What a user's callback sees of the model where fedhog promises the consensus model (one number per hook)."""

    @staticmethod
    def record(module: L.LightningModule, hook: str) -> None:
        total = sum(float(p.detach().double().sum()) for p in module.net.parameters())
        module.hook_sums.setdefault(hook, []).append(total)

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.record(module, "callback.on_validation_start")

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.record(module, "callback.on_train_end")


class _InOrder(torch.utils.data.Sampler[int]):
    """A user's own sequential sampler (not torch's ``SequentialSampler``, which Lightning replaces for DDP)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __iter__(self):
        return iter(range(self.size))

    def __len__(self) -> int:
        return self.size


class _Stream(torch.utils.data.IterableDataset):
    """The samples of a data set as a stream with no length, as a user's IterableDataset would give them."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __iter__(self):
        return (self.data[index] for index in range(len(self.data)))


class _Interrupt(L.Callback):
    """Rank 0 (the launching process) sends itself SIGINT at a global step: a Ctrl-C to it alone."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_rank == 0 and trainer.global_step == self.step:
            print(f"SIGINT rank 0 at {time.time()}", flush=True)
            os.kill(os.getpid(), signal.SIGINT)


def _interrupt_in_join() -> None:
    """A thread of the launching process: SIGINT to it while it waits for the workers to join the default group."""
    from lightning_fedhog.rendezvous import joining_default_group

    while not joining_default_group():
        time.sleep(0.01)
    time.sleep(0.3)  # in the native wait
    print(f"SIGINT rank 0 at {time.time()}", flush=True)
    os.kill(os.getpid(), signal.SIGINT)


_TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                       "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


class _ForkedWorker:
    """What Lightning's launcher uses of the `subprocess.Popen` of a worker it started, for a forked worker."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._lock = threading.Lock()  # the launcher's threads poll too: one `waitpid` reaps the worker

    def poll(self) -> int | None:
        with self._lock:
            if self.returncode is None:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
            time.sleep(0.01)
        return code

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _fork_workers(out: Path, delay: float) -> None:
    """In a process forked from the test session's zygote: run as a plain script, whose workers Lightning's launcher
    starts, except that they are forks of this process instead of new interpreters (no ~10 s of imports each).

    The zygote gives its ranks torchrun's environment, which is dropped here, so Lightning picks its own
    environment and fedhog's launcher; each worker is this script's `main()` again in a fork, with the environment
    the launcher gives it, after `delay` seconds (a slow start). The launching process's pid and the workers' are
    written to ``out/pids.txt``.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # a worker, or a real program start
        return
    for name in _TORCHRUN_VARIABLES:
        os.environ.pop(name, None)
    torch.set_num_threads(1)  # before any op: no OpenMP thread pool, whose copy would hang a forked worker
    out.mkdir(parents=True, exist_ok=True)
    pids = out / "pids.txt"
    pids.write_text(f"{os.getpid()}\n")

    def popen(command: list[str], env: dict[str, str], cwd: str | None = None) -> _ForkedWorker:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: no orphan, whatever happens
                wakeup = signal.set_wakeup_fd(-1)  # the launcher's Ctrl-C watch belongs to the launching process
                if wakeup != -1:
                    os.close(wakeup)
                os.environ.clear()
                os.environ.update(env)
                time.sleep(delay)
                main()
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        with pids.open("a") as file:
            file.write(f"{pid}\n")
        return _ForkedWorker(pid)

    import lightning.pytorch.strategies.launchers.subprocess_script as script_launcher

    script_launcher.subprocess = types.SimpleNamespace(Popen=popen)  # type: ignore[assignment]


def _die_in_rescue(rank: int) -> None:
    """A second failure during a rescue: ``rank`` dies as it is about to send its copy to the other survivors."""
    import lightning_fedhog.strategy as fedhog_strategy

    gather = fedhog_strategy.gather_rescue

    def dying(group, members, me, *args, **kwargs):
        if me == rank:
            print(f"KILLED rank {rank} in the rescue at {time.time()}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return gather(group, members, me, *args, **kwargs)

    fedhog_strategy.gather_rescue = dying


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kind", default="minimal", choices=["minimal", "bn", "adam", "manual"])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--gpu-ids", default=None,
                        help="comma-separated CUDA device of each fedhog device, e.g. 0,0: two devices on GPU 0")
    parser.add_argument("--averaging-backend", default="auto")
    parser.add_argument("--num-nodes", type=int, default=1,
                        help="0: as many as the launcher started (torchrun's elastic --nnodes=MIN:MAX)")
    parser.add_argument("--probe-size", type=int, default=0, help="the probe's length (0: the world size)")
    parser.add_argument("--kill-agent", action="store_true", help="with --kill-rank: SIGKILL its torchrun agent too")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--period", type=lambda value: value if value == "auto" else int(value), default=2)
    parser.add_argument("--compression", default="none", choices=["none", "bf16", "int8"])
    parser.add_argument("--in-flight", type=int, default=1, help="rounds_in_flight")
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.125)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--sleep-rank", type=int, default=-1)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--sleep-from-epoch", type=int, default=0, help="--sleep-rank sleeps from this epoch on")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--averaging", default="allreduce")
    parser.add_argument("--topology", default="exponential")
    parser.add_argument("--block-rule", default="round_robin")
    parser.add_argument(  # an epoch number, or a share of the epochs ("0.5")
        "--partial-backprop", type=lambda value: float(value) if "." in value else int(value), default=None
    )
    parser.add_argument("--partition", default="numel")
    parser.add_argument("--rotate", action="store_true")
    parser.add_argument("--work-sharing", default="static")
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--num-workers", type=int, default=0, help="the training DataLoader's num_workers")
    parser.add_argument("--persistent", action="store_true", help="persistent_workers=True (with --num-workers)")
    parser.add_argument("--reload", type=int, default=0, help="reload_dataloaders_every_n_epochs")
    parser.add_argument("--schedule", default="none", choices=["none", "cosine", "onecycle"],
                        help="an LR schedule per step, sized by trainer.estimated_stepping_batches")
    parser.add_argument("--csv", action="store_true", help="log to a CSVLogger under OUT/logs")
    parser.add_argument("--crash-rank", type=int, default=-1)
    parser.add_argument("--nan-rank", type=int, default=-1, help="corrupt this rank's device copy in epoch 1")
    parser.add_argument("--kill-rank", type=int, default=-1, help="SIGKILL this rank in epoch 1 (first attempt only)")
    parser.add_argument("--kill-step", type=int, default=-1, help="with --kill-rank: die at this global step instead")
    parser.add_argument("--die-in-rescue", type=int, default=-1,
                        help="this rank is SIGKILLed when it is about to send its copy in a rescue")
    parser.add_argument("--trace", default="", help="append each training batch's epoch and indices to"
                        " OUT/trace-TRACE-rank{R}.jsonl as it starts")
    parser.add_argument("--sigterm-rank", type=int, default=-1, help="this rank sends itself SIGTERM at --sigterm-step")
    parser.add_argument("--sigterm-step", type=int, default=-1)
    parser.add_argument("--sigterm-group", action="store_true", help="SIGTERM the whole process group instead")
    parser.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    parser.add_argument("--data", default="map", choices=["map", "iterable", "uneven"],
                        help="iterable: an IterableDataset without length; uneven: rank 0 gets one batch more")
    parser.add_argument("--max-time", default=None, help="Trainer(max_time=...), e.g. 00:00:10:00")
    parser.add_argument("--resume", default=None, help="a checkpoint path, or 'last'")
    parser.add_argument("--sampler", default="default", choices=["default", "subset", "weighted", "in_order"],
                        help="the training loader's sampler: subset (the even indices, shuffled), weighted (even"
                        " indices only, with replacement, half the data set's size), in_order (a custom sequential)")
    parser.add_argument("--no-val", action="store_true", help="no validation loader")
    parser.add_argument("--no-checkpoint", action="store_true", help="no ModelCheckpoint")
    parser.add_argument("--val-check", type=float, default=1.0, help="val_check_interval")
    parser.add_argument("--loaders", type=int, default=1, help="training loaders, as a dict")
    parser.add_argument("--estimate-in-setup", action="store_true",
                        help="read trainer.estimated_stepping_batches in the module's setup()")
    parser.add_argument("--refit-max-steps", type=int, default=None,
                        help="after fit, raise max_steps to this and fit again with the same Trainer")
    parser.add_argument("--sigterm-epoch-end", type=int, default=-1,
                        help="--sigterm-rank SIGTERMs every process at the end of this epoch (on_train_epoch_end)")
    parser.add_argument("--strategy", default="object", help="'object', or a registered name")
    parser.add_argument("--sigint-step", type=int, default=-1, help="rank 0 sends itself SIGINT at this global step")
    parser.add_argument("--sigint-in-join", action="store_true",
                        help="rank 0 sends itself SIGINT while it waits for the workers to join the default group")
    parser.add_argument("--fork-workers", action="store_true",
                        help="forked from the zygote: a plain script whose workers are forks (see _fork_workers)")
    parser.add_argument("--worker-delay", type=float, default=0.0, help="with --fork-workers: seconds they wait")
    args = parser.parse_args()
    if args.fork_workers:
        _fork_workers(args.out, args.worker_delay)
    if args.sigint_in_join and "LOCAL_RANK" not in os.environ:  # the launching process of a plain start
        threading.Thread(target=_interrupt_in_join, daemon=True).start()
    if args.gpu_ids:
        args.devices = len(args.gpu_ids.split(","))
    if args.die_in_rescue >= 0:
        _die_in_rescue(args.die_in_rescue)

    L.seed_everything(1234)
    if args.num_nodes == 0:  # elastic: the nodes of this attempt's rendezvous
        args.num_nodes = int(os.environ["WORLD_SIZE"]) // int(os.environ["LOCAL_WORLD_SIZE"])
    world_size = args.probe_size or args.devices * args.num_nodes * args.workers
    model = Net(
        args.kind, world_size, args.lr, args.sleep_rank, args.sleep, args.crash_rank, args.nan_rank, args.kill_rank,
        args.kill_step, args.sigterm_rank, args.sigterm_step, args.sigterm_group, args.schedule,
        args.sigterm_epoch_end, args.estimate_in_setup, str(args.out),
        args.sleep_from_epoch, args.trace, args.kill_agent,
    )
    strategy = (
        FedHogStrategy(
            workers_per_device=args.workers,
            averaging_period=args.period,
            compression=args.compression,
            rounds_in_flight=args.in_flight,
            averaging_warmup_epochs=args.warmup,
            num_blocks=args.blocks,
            timeout=timedelta(seconds=args.timeout),
            averaging=args.averaging,
            topology=args.topology,
            block_rule=args.block_rule,
            partial_backprop=args.partial_backprop,
            partition=args.partition,
            rotate_ownership=args.rotate,
            work_sharing=args.work_sharing,
            averaging_backend=args.averaging_backend,
            parallel_devices=(
                [torch.device("cuda", int(index)) for index in args.gpu_ids.split(",")] if args.gpu_ids else None
            ),
        )
        if args.strategy == "object"
        else args.strategy
    )
    checkpoint = ModelCheckpoint(dirpath=args.out / "ckpt", save_last=True, save_top_k=-1)
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices="auto" if args.gpu_ids else args.devices,
        num_nodes=args.num_nodes,
        strategy=strategy,
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        max_time=args.max_time,
        limit_train_batches=args.limit_train,
        precision=args.precision,
        callbacks=[
            ModelProbe(), *([] if args.no_checkpoint else [checkpoint]),
            *([_Interrupt(args.sigint_step)] if args.sigint_step >= 0 else []),
        ],
        enable_checkpointing=not args.no_checkpoint,
        logger=L.pytorch.loggers.CSVLogger(args.out / "logs", name="run") if args.csv else False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.out,
        log_every_n_steps=1,
        accumulate_grad_batches=args.accumulate,
        use_distributed_sampler=args.data != "uneven",
        reload_dataloaders_every_n_epochs=args.reload,
        val_check_interval=args.val_check,
    )
    dataset = make_data(args.samples, seed=1)
    sampler = None
    if args.sampler == "subset":
        sampler = torch.utils.data.SubsetRandomSampler(range(0, args.samples, 2))
    elif args.sampler == "weighted":
        weights = torch.tensor([float(i % 2 == 0) * (1 + i % 7) for i in range(args.samples)])
        sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=args.samples // 2, replacement=True)
    elif args.sampler == "in_order":
        sampler = _InOrder(args.samples)
    data = DataLoader(
        dataset, batch_size=args.batch, shuffle=sampler is None, sampler=sampler, num_workers=args.num_workers,
        persistent_workers=args.num_workers > 0 and args.persistent,
    )
    if args.data == "iterable":
        data = DataLoader(_Stream(make_data(args.samples, seed=1)), batch_size=args.batch)
    elif args.data == "uneven":  # each rank reads its own shard; rank 0's is one batch longer
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        shard = torch.utils.data.Subset(make_data(args.samples, seed=1), range(args.batch * (4 + (rank == 0))))
        data = DataLoader(shard, batch_size=args.batch)
    if args.loaders > 1:
        data = {f"loader{i}": data for i in range(args.loaders)}
    val = None if args.no_val else DataLoader(make_data(100, seed=2), batch_size=10)
    trainer.fit(model, data, val, ckpt_path=args.resume)
    if args.refit_max_steps is not None:
        trainer.fit_loop.epoch_loop.max_steps = args.refit_max_steps
        trainer.fit(model, data, val)

    rank = trainer.global_rank
    optimizer_states = [opt.state_dict() for opt in trainer.optimizers]
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "optimizer_states": optimizer_states}, args.out / f"rank{rank}.pt")
    report = {
        "rank": rank,
        "world_size": trainer.world_size,
        "local_rank": trainer.local_rank,
        "node_rank": trainer.node_rank,
        "pid": os.getpid(),
        "global_step": trainer.global_step,
        "current_epoch": trainer.current_epoch,
        "step_times": model.step_times,
        "started": model.started,
        "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        "seen": model.seen,
        "batches": model.batches,
        "sched_steps": model.sched_steps,
        "setup_estimate": model.setup_estimate,
        "sharing": model.sharing,
        "reload_dataloaders_every_n_epochs": trainer.reload_dataloaders_every_n_epochs,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "lrs": [group["lr"] for opt in trainer.optimizers for group in opt.param_groups],
        "estimated": model.estimated,
        "lr_trace": model.lr_trace,
        "hook_sums": model.hook_sums,
        "partial_steps": model.partial_steps,
        "strategy": type(trainer.strategy).__name__,
        "environment": type(trainer.strategy.cluster_environment).__name__,
        "workers_per_device": getattr(trainer.strategy, "workers_per_device", 1),
        "root_device": str(trainer.strategy.root_device),
        "leader_backend": getattr(trainer.strategy, "leader_backend", None),
        "registered": "fedhog" in L.pytorch.strategies.StrategyRegistry,
        "version": lightning_fedhog.__version__,
    }
    (args.out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
