"""P11, chaos: what a killed device costs fedhog and DDP when torchrun restarts the run.

Two torchrun agents on this machine (``--nnodes=2``, one worker each, c10d rendezvous on loopback,
``--max-restarts``) train the MNIST-1D recipe for a fixed number of epochs with a checkpoint at every epoch end
(``ModelCheckpoint(save_last=True)``) and ``ckpt_path="last"``. In the runs with faults a driver SIGKILLs the worker
of global rank 1 after a random 1.5 to 2.5 epochs of its training (counted from each start), at most
:data:`FAULTS` times; its agent and the other one restart both workers, which resume from ``last``: for fedhog the
survivors' rescue when it is newer, for DDP the last epoch's checkpoint. Every method and fault setting trains the
same epochs on the same data, so a run with faults differs from the one without only by what the faults cost:

- goodput: the fault-free run's wall time over the faulted run's (the share of the faulted run's time whose work
  reaches the final model);
- per fault: time to detect (the kill to the surviving worker's failure), time to resume (the kill to the first
  training batch after the restart) and work lost (the surviving worker's global steps at the kill minus those it
  resumed from: what is trained again).

Both methods run under the same launcher settings (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, which DDP needs to
restart; docs/launching.md) and the same faults: the driver's random numbers are seeded by the repeat.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import harness
from benchmarks.catalog import ROOT, Method, Scale

FAULTS = 3
"""Kills per faulted run, at most (fewer when the run ends first)."""

EPOCHS = 4
SAMPLES = 1_000_000
"""800,000 training samples: on 2 idle cores an epoch takes about 35 s for fedhog and 60 s for DDP, so a fault every
~2 epochs comes every 1-2 minutes. What a fault costs fedhog is mostly a restart of both workers (about 7 s here,
for either method), so its goodput is about 1 - restart / time between faults: with 15-second epochs (400,000
samples, the run in ``benchmarks/results/variants/p11_chaos_400k.json``) it was 87%, with the 8-second epochs of
60,000 samples (the first P11 run) 71%; such figures say more about process start-up than about what a fault loses."""
TARGET = 0.90
BATCH = 32  # the recipe's batch per worker


class _Beacons:
    """Reads the workers' beacon files as they grow."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.events: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
        self._offsets = {0: 0, 1: 0}

    def read(self) -> None:
        for rank in self.events:
            path = self.folder / f"beacon-rank{rank}.jsonl"
            if not path.exists():
                continue
            with path.open() as file:
                file.seek(self._offsets[rank])
                text = file.read()
            complete = text[: text.rfind("\n") + 1]  # a line still being written waits for the next read
            self._offsets[rank] += len(complete)
            self.events[rank] += [json.loads(line) for line in complete.splitlines()]

    def last(self, rank: int, event: str) -> dict[str, Any] | None:
        return next((e for e in reversed(self.events[rank]) if e["event"] == event), None)


def _agent_command(strategy: list[str], out: Path, port: int, scale: Scale, data: Path, seed: int) -> list[str]:
    smoke = scale.name == "smoke"
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=p11-{out.name}", f"--max-restarts={FAULTS + 2}",
        "--monitor-interval=0.5", "-m", "recipes.mnist1d", "fit", *strategy, "--trainer.accelerator=cpu",
        "--trainer.devices=1", "--trainer.num_nodes=2", f"--trainer.max_epochs={2 if smoke else EPOCHS}",
        "--trainer.enable_progress_bar=false", "--trainer.logger=false", f"--trainer.default_root_dir={out}",
        "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={out / 'ckpt'}",
        "--trainer.callbacks.save_last=true", "--trainer.callbacks+=benchmarks.beacon.Beacon",
        f"--trainer.callbacks.folder={out}", f"--data.data_dir={data}",
        f"--data.num_samples={scale.mnist_samples if smoke else SAMPLES}", f"--seed_everything={seed}",
        "--ckpt_path=last",
    ]


def chaos_run(strategy: list[str], faults: int, scale: Scale, data: Path) -> Method:
    """One P11 run: two torchrun agents, and ``faults`` kills of rank 1's worker at random points."""

    def run(out: Path) -> dict[str, Any]:
        seed = harness.repeat_seed(out)
        out.mkdir(parents=True, exist_ok=True)
        command = _agent_command(strategy, out, harness.free_port(), scale, data, seed)
        env = {**harness.threads_env(2), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        logs = [(out / f"agent{i}.log").open("w") for i in range(2)]
        began = time.time()
        agents = [subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT) for log in logs]
        kills = _drive(agents, _Beacons(out), faults, random.Random(seed), scale)
        codes = [agent.wait() for agent in agents]
        wall = time.time() - began
        for log in logs:
            log.close()
        if any(codes):
            tail = (out / "agent0.log").read_text(errors="replace")[-4000:]
            raise RuntimeError(f"P11 run failed ({codes}): {' '.join(command)}\n{tail}")
        beacons = _Beacons(out)
        beacons.read()
        return {**_figures(beacons, kills, began, wall), "command": " ".join(command)}

    return run


def _drive(agents: list[subprocess.Popen], beacons: _Beacons, faults: int, rng: random.Random,
           scale: Scale) -> list[dict[str, Any]]:
    """Kills rank 1's worker ``faults`` times, each after a random 1.5-2.5 epochs of its training since it started."""
    per_epoch = (scale.mnist_samples if scale.name == "smoke" else SAMPLES) * 0.8 / (2 * BATCH)
    kills: list[dict[str, Any]] = []
    after = rng.uniform(0.25, 0.5) * per_epoch if scale.name == "smoke" else rng.uniform(1.5, 2.5) * per_epoch
    while any(agent.poll() is None for agent in agents):
        time.sleep(0.05)
        if len(kills) >= faults:
            continue
        beacons.read()
        start, latest = beacons.last(1, "start"), beacons.last(1, "batch")
        if start is None or latest is None or latest["t"] < start["t"] or start["pid"] in {k["pid"] for k in kills}:
            continue
        if latest["step"] - start["step"] >= after:
            survivor = beacons.last(0, "batch")
            os.kill(start["pid"], signal.SIGKILL)
            kills.append({"t": time.time(), "pid": start["pid"], "attempt": start["attempt"],
                          "survivor_step": survivor["step"] if survivor else 0})
            after = rng.uniform(1.5, 2.5) * per_epoch
    return kills


def _figures(beacons: _Beacons, kills: list[dict[str, Any]], began: float, wall: float) -> dict[str, Any]:
    """A run's figures from the beacons: accuracy per validation, and per kill the time to detect and to resume and
    the survivor's steps trained again."""
    vals = [e for e in beacons.events[0] if e["event"] == "val"]
    curve = [(e["t"] - began, e["accuracy"]) for e in vals]
    reached = next((seconds for seconds, accuracy in curve if accuracy >= TARGET), None)
    faults = []
    for kill in kills:
        failed = next((e for e in beacons.events[0] if e["event"] == "exception" and e["t"] > kill["t"]), None)
        restart = next((e for e in beacons.events[0] if e["event"] == "start" and e["t"] > kill["t"]), None)
        first = None if restart is None else next(
            (e for e in beacons.events[0] if e["event"] == "batch" and e["t"] > restart["t"]), None
        )
        faults.append({
            "detect_s": None if failed is None else failed["t"] - kill["t"],
            "resume_s": None if first is None else first["t"] - kill["t"],
            "steps_lost": None if restart is None else max(0, kill["survivor_step"] - restart["step"]),
        })
    return {"seconds_to_target": reached, "epochs_to_target": None, "final_accuracy": curve[-1][1] if curve else None,
            "train_s": wall, "process_wall_s": wall, "curve": curve, "faults": faults}


def p11_chaos(scale: Scale, workdir: Path) -> dict[str, Any]:
    """P11: fedhog (no knobs) and DDP, each with and without faults, interleaved over seeds."""
    data = workdir / "mnist1d-data"
    smoke = scale.name == "smoke"
    faults = 1 if smoke else FAULTS
    from recipes.mnist1d import MNIST1DDataModule  # here: the report imports this module without Lightning

    # generated once before any run: the first run would otherwise count the generation in its wall time
    MNIST1DDataModule(str(data), num_samples=scale.mnist_samples if smoke else SAMPLES).prepare_data()
    strategies = {"ddp": ["--trainer.strategy=ddp"], "fedhog": ["--trainer.strategy=fedhog"]}
    methods: dict[str, Method] = {}
    for name, how in strategies.items():
        methods[name] = chaos_run(how, 0, scale, data)
        methods[f"{name}_faults"] = chaos_run(how, faults, scale, data)
    return {"methods": methods, "baseline": "ddp",
            "baselines": {"ddp_faults": "ddp", "fedhog_faults": "fedhog", "fedhog": "ddp"},
            "settings": {"launcher": "two torchrun agents on one machine: --nnodes=2 --nproc-per-node=1"
                         " --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:PORT --max-restarts=5,"
                         " TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (both methods)",
                         "recipe": "python -m recipes.mnist1d fit, ModelCheckpoint(save_last=True) every epoch,"
                         " --ckpt_path=last", "epochs": 2 if smoke else EPOCHS,
                         "samples": scale.mnist_samples if smoke else SAMPLES, "batch_per_process": BATCH,
                         "faults": f"up to {faults} SIGKILLs of rank 1's worker, each after a random 1.5-2.5 epochs"
                         " of its training since its start (seeded by the repeat)",
                         "fedhog": "--trainer.strategy=fedhog: no knob set (1 worker per CPU device under torchrun)",
                         "ddp": "--trainer.strategy=ddp", "target_accuracy": TARGET,
                         "seeds": "repeat i uses seed_everything=i and fault seed i"}}


def chaos_lines(report: dict[str, Any]) -> list[str]:
    """P11's table: per method, the wall times with and without faults, goodput, and the faults' median figures."""
    results = report["results"]
    lines = ["| method | wall, no faults | wall, faults | goodput | faults | detect | resume | steps lost per fault"
             " | final accuracy (faults) |", "|---|---|---|---|---|---|---|---|---|"]
    for method, title in (("fedhog", "fedhog, no knobs"), ("ddp", "DDP, checkpoint every epoch")):
        clean, faulted = results.get(method), results.get(f"{method}_faults")
        if clean is None or faulted is None:
            continue
        figures = faulted.get("fault_medians", {})
        lines.append(
            f"| {title} | {clean['process_wall_s']:.1f} s | {faulted['process_wall_s']:.1f} s |"
            f" {clean['process_wall_s'] / faulted['process_wall_s']:.0%} | {figures.get('count', 0)} |"
            f" {_seconds(figures.get('detect_s'))} | {_seconds(figures.get('resume_s'))} |"
            f" {figures.get('steps_lost', '-')} | {faulted['final_accuracy']:.3f} |"
        )
    return lines


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"
