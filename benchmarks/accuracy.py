"""Time-to-accuracy benchmarks: the MNIST-1D recipe trained by each method, timed to a test accuracy.

Every run is ``python -m recipes.mnist1d fit`` with a CSV logger and :class:`~lightning_fedhog.WallClock`: the
consensus model's test accuracy after every epoch against wall-clock seconds since training started (validation
included). Repeat ``i`` of a method uses ``seed_everything=i``, so the methods of one repeat start from the same
weights and see the same data order.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import harness
from benchmarks.catalog import Method, Scale

POST_LOCAL_YAML = """\
trainer:
  strategy:
    class_path: benchmarks.throughput.PostLocalSGDOnCPU
    init_args:
      model_averaging_period: 16
      ddp_comm_state:
        class_path: torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook.PostLocalSGDState
        init_args:
          process_group: null
          subgroup: null
          start_localSGD_iter: 1
          post_local_gradient_allreduce: false
      ddp_comm_hook: torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook.post_localSGD_hook
"""


_BLOCKS = "--trainer.strategy.num_blocks="


def mnist1d(
    strategy: Sequence[str],
    processes: int,
    scale: Scale,
    data_dir: Path,
    epochs: int | None = None,
    *,
    target: float = 0.90,
    prefix: Sequence[str] = (),
) -> Method:
    """One run of the MNIST-1D recipe; its seed is the repeat's number (the last part of ``out``'s name).

    Args:
        strategy: the recipe's command-line settings that make the method (strategy, model, callbacks).
        processes: processes of the launch (one share of the cores each).
        prefix: a command prefix, e.g. the thin-link namespace; every rank then starts inside it.
    """

    def run(out: Path) -> dict[str, Any]:
        seed = harness.repeat_seed(out)
        command = [
            sys.executable, "-m", "recipes.mnist1d", "fit", *strategy,
            f"--trainer.max_epochs={epochs or scale.mnist_epochs}", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={out}", "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={out}",
            "--trainer.callbacks+=lightning_fedhog.WallClock", f"--data.data_dir={data_dir}",
            f"--data.num_samples={scale.mnist_samples}", f"--seed_everything={seed}",
        ]
        began = time.perf_counter()
        status, errors = harness.run_ranks(command, processes, harness.threads_env(processes), prefix=prefix)
        command = harness.ranks_command(command, processes, prefix)  # as reported: what ran, in which namespace
        if status != 0:
            raise RuntimeError(f"MNIST-1D run failed ({status}): {shlex.join(command)}\n{errors[-4000:]}")
        blocks = next((int(arg.split("=")[1]) for arg in strategy if arg.startswith(_BLOCKS)), 1)
        return {**accuracy_curve(out, target, blocks), "command": shlex.join(command),
                "process_wall_s": time.perf_counter() - began}

    return run


def accuracy_curve(out: Path, target: float = 0.90, blocks: int = 1) -> dict[str, Any]:
    """Per-epoch (wall-clock seconds, test accuracy) from a run's CSV log, and fedhog's own figures if it logged any.

    Validation runs at the end of each epoch, before ``WallClock`` logs the epoch's time (one step later, so
    steps do not match): the n-th accuracy pairs with the n-th time, which includes that validation.
    """
    with next(out.glob("**/metrics.csv")).open() as handle:
        rows = list(csv.DictReader(handle))
    clock = [float(row["wall_time_s"]) for row in rows if row.get("wall_time_s")]
    accuracy = [float(row["val_acc"]) for row in rows if row.get("val_acc")]
    curve = list(zip(clock, accuracy, strict=False))
    reached = next((seconds for seconds, accuracy in curve if accuracy >= target), None)
    epochs = next((epoch for epoch, (_, accuracy) in enumerate(curve, 1) if accuracy >= target), None)
    result = {"curve": curve, "seconds_to_target": reached, "epochs_to_target": epochs,
              "final_accuracy": curve[-1][1] if curve else None, "train_s": curve[-1][0] if curve else None}
    figures = averaging_figures(rows, blocks=blocks)
    return {**result, "fedhog": figures} if figures else result


def averaging_figures(rows: list[dict[str, str]], batch: int = 32, blocks: int = 1) -> dict[str, float]:
    """What fedhog's averaging did during a run, from the figures it logged at each consensus point.

    ``effective_period`` is the device steps between two exchanges of the same element: what the configured
    ``averaging_period`` becomes when rounds take longer than the steps between them (one round exchanges one of
    ``blocks`` blocks). ``consensus_s`` sums the time workers waited at consensus points; ``round_busy`` is the
    share of time a leader spent in background rounds (overlapped with the workers' steps; with several rounds in
    flight it can pass 1).
    """
    logged = [row for row in rows if row.get("fedhog/rounds_per_s")]
    if not logged:
        return {}

    def mean(key: str) -> float:
        return statistics.mean(float(row[key]) for row in logged if row.get(key))

    devices = sorted({key for key in logged[0] if key.startswith("fedhog/device") and key.endswith("/samples_per_s")})
    device_steps = statistics.mean(float(row[key]) / batch for row in logged for key in devices if row.get(key))
    rounds = mean("fedhog/rounds_per_s")
    return {
        "rounds_per_s": rounds,
        "bytes_per_s": mean("fedhog/bytes_per_s"),
        "seconds_per_round": mean("fedhog/seconds_per_round"),
        "round_busy": rounds * mean("fedhog/seconds_per_round"),
        "effective_period": blocks * device_steps / rounds if rounds else float("inf"),
        "consensus_distance": mean("fedhog/consensus_distance"),
        "consensus_s": sum(float(row["fedhog/parked_s"]) for row in logged),
        "samples_per_s": mean("fedhog/samples_per_s"),
        **({"period": mean("fedhog/period")} if any(row.get("fedhog/period") for row in logged) else {}),
        **({"averaging_cost": mean(cost)} if any(row.get(cost := "fedhog/averaging_cost") for row in logged) else {}),
    }


def summarize_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over one method's seeds, with every seed's figures and one curve to plot."""
    epochs = [r.get("epochs_to_target") for r in runs]
    summary = {
        "seconds_to_target": median_reached([r["seconds_to_target"] for r in runs]),
        "all_seconds_to_target": [r["seconds_to_target"] for r in runs],
        "all_epochs_to_target": epochs,
        "final_accuracy": statistics.median(r["final_accuracy"] for r in runs),
        "all_final_accuracy": [r["final_accuracy"] for r in runs],
        "train_s": statistics.median(r["train_s"] for r in runs),
        "process_wall_s": statistics.median(r["process_wall_s"] for r in runs),
        "curve": runs[len(runs) // 2]["curve"],  # one run's curve, for the plot
        "command": runs[0]["command"],
    }
    if all(r.get("fedhog") for r in runs):
        summary["fedhog"] = harness.median_figures(runs)
    if any("faults" in r for r in runs):  # P11: every fault of every seed, and their medians
        summary["all_process_wall_s"] = [r["process_wall_s"] for r in runs]
        summary["all_faults"] = [r.get("faults", []) for r in runs]
        summary["fault_medians"] = fault_medians(summary["all_faults"])
    return summary


def fault_medians(per_run: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """The median number of faults per run, and each fault figure's median over every fault of every run."""
    faults = [fault for run in per_run for fault in run]
    medians: dict[str, Any] = {"count": statistics.median(len(run) for run in per_run) if per_run else 0}
    for key in ("detect_s", "resume_s", "steps_lost"):
        values = [fault[key] for fault in faults if fault.get(key) is not None]
        medians[key] = statistics.median(values) if values else None
    return medians


def median_reached(seconds: Sequence[float | None]) -> float | None:
    """The median time to target over seeds, a seed that never reached it counting as slower than any that did;
    None when the median seed did not reach it."""
    ordered = sorted(seconds, key=lambda value: math.inf if value is None else value)
    middle = ordered[(len(ordered) - 1) // 2 : len(ordered) // 2 + 1]
    if not middle or any(value is None for value in middle):
        return None
    return statistics.mean(middle)  # type: ignore[arg-type]


def straggler_options(seconds: float, from_epoch: int | None = None) -> list[str]:
    """The recipe's settings that make rank 1 sleep ``seconds`` before every training batch
    (:class:`benchmarks.straggler.Straggler`), from epoch ``from_epoch`` on where given."""
    options = ["--trainer.callbacks+=benchmarks.straggler.Straggler", "--trainer.callbacks.slow_ranks=[1]",
               f"--trainer.callbacks.seconds={seconds:.6f}"]
    return options if from_epoch is None else [*options, f"--trainer.callbacks.from_epoch={from_epoch}"]


def recipe_step_seconds(scale: Scale, data_dir: Path, workdir: Path) -> float:
    """The median training step of the MNIST-1D recipe in one process with one thread (as each of 2 workers)."""
    out = workdir / "calibration"
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "recipes.mnist1d", "fit", "--trainer.devices=1", "--trainer.strategy=auto",
        "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={out}",
        "--trainer.callbacks+=benchmarks.straggler.StepTimer", f"--trainer.callbacks.path={out / 'step.json'}",
        f"--data.data_dir={data_dir}", f"--data.num_samples={scale.mnist_samples}",
    ]
    status, errors = harness.run_ranks(command, 1, harness.threads_env(2))
    if status != 0:
        raise RuntimeError(f"calibration failed: {shlex.join(command)}\n{errors[-4000:]}")
    return float(json.loads((out / "step.json").read_text())["median_step_s"])


def p4_time_to_accuracy(scale: Scale, workdir: Path) -> dict[str, Any]:
    """P4: wall-clock to 0.90 MNIST-1D test accuracy (consensus model), and accuracy after equal epochs."""
    data = workdir / "mnist1d-data"
    methods: dict[str, Method] = {
        "single_process": mnist1d(["--trainer.devices=1", "--trainer.strategy=auto"], 1, scale, data),
        "ddp": mnist1d(["--trainer.strategy=ddp"], 2, scale, data),
        "fedhog": mnist1d([], 4, scale, data),  # the recipe's default: 2 devices x 2 workers
        "fedhog_2x1": mnist1d(["--trainer.strategy.workers_per_device=1"], 2, scale, data),  # DDP's 2 processes
    }
    return {"methods": methods, "baseline": "ddp",
            "settings": {"target_accuracy": 0.90, "epochs": scale.mnist_epochs, "batch_per_process": 32,
                         "samples": scale.mnist_samples, "recipe": "python -m recipes.mnist1d fit",
                         "fedhog": "2 devices x 2 workers (the recipe's default)", "fedhog_2x1": "2 devices x 1 worker",
                         "ddp": "2 processes", "single_process": "1 process"}}


def p13_period_auto(scale: Scale, workdir: Path) -> dict[str, Any]:
    """P13: the recipe to 0.90 with no hindrance, averaging every 16 device steps against ``averaging_period="auto"``.

    Whether ``"auto"`` can be the default: on an unlimited link it may average more often than 16 (rounds cost the
    workers little) or less (a busy machine), and what counts is the time to an accuracy. One worker per device (the
    default on CPU); DDP in the same run for scale.
    """
    data = workdir / "mnist1d-data"
    one = "--trainer.strategy.workers_per_device=1"
    methods: dict[str, Method] = {
        "ddp": mnist1d(["--trainer.strategy=ddp"], 2, scale, data),
        "fedhog_period_16": mnist1d([one], 2, scale, data),
        "fedhog_period_auto": mnist1d([one, "--trainer.strategy.averaging_period=auto"], 2, scale, data),
    }
    return {"methods": methods, "baseline": "ddp", "baselines": {"fedhog_period_auto": "fedhog_period_16"},
            "settings": {"target_accuracy": 0.90, "epochs": scale.mnist_epochs, "batch_per_process": 32,
                         "samples": scale.mnist_samples, "recipe": "python -m recipes.mnist1d fit",
                         "fedhog_period_16": "2 devices x 1 worker, averaging_period=16",
                         "fedhog_period_auto": "2 devices x 1 worker, averaging_period='auto' (rounds may cost the"
                         " workers 5% of their throughput)", "ddp": "2 processes",
                         "seeds": "repeat i uses seed_everything=i"}}


def p7_thin_link(rate: str, scale: Scale, workdir: Path) -> dict[str, Any]:
    """P7: wall-clock to 0.85 MNIST-1D test accuracy when the two devices share a link of ``rate`` (tc syntax).

    A wider CNN (128 channels, 105,738 parameters, 423 kB in fp32) makes DDP's per-step gradient all-reduce
    link-bound; post-local SGD averages the parameters every 16 steps; fedhog (2 devices x 1 worker, whole-vector
    fp32 all-reduce every 16 device steps in the background: the defaults before ``compression="auto"``) never
    waits for the link between consensus points. fedhog also runs with no rate limit: the time a thin-link run can
    approach.
    """
    data = workdir / "mnist1d-data"
    prefix = _link(rate, scale)
    if prefix is None:
        return {"skipped": harness.thin_link_unavailable()}
    post_local = workdir / "post_local_sgd.yaml"
    post_local.write_text(POST_LOCAL_YAML)
    wide = [f"--model.channels={P7_CHANNELS}"]
    fedhog = [*wide, "--trainer.strategy.workers_per_device=1", "--trainer.strategy.compression=none"]
    epochs = scale.thin_accuracy_epochs
    thin = {"target": P7_TARGET, "prefix": prefix}
    methods: dict[str, Method] = {
        "ddp": mnist1d([*wide, "--trainer.strategy=ddp"], 2, scale, data, epochs, **thin),
        "post_local_sgd": mnist1d([*wide, f"--config={post_local}"], 2, scale, data, epochs, **thin),
        "fedhog": mnist1d(fedhog, 2, scale, data, epochs, **thin),
        "fedhog_unlimited": mnist1d(fedhog, 2, scale, data, epochs, target=P7_TARGET),
    }
    return {"methods": methods, "baseline": "ddp", "limit": "fedhog_unlimited",
            "settings": {"target_accuracy": P7_TARGET, "epochs": epochs, "batch_per_process": 32,
                         "samples": scale.mnist_samples, "model": f"ConvNet1D, channels={P7_CHANNELS} (105,738"
                         " parameters, 423 kB in fp32)", "recipe": "python -m recipes.mnist1d fit --model.channels=128",
                         "link": f"loopback of a private netns, tc tbf rate {rate} (all ranks' traffic shares it);"
                         " fedhog_unlimited: the same run without the namespace",
                         "fedhog": "2 devices x 1 worker, averaging_period=16, num_blocks=1, fp32 rounds (the"
                         " defaults before compression='auto'; P9 has today's)",
                         "post_local_sgd": "torch's post_localSGD_hook from step 1, parameters averaged every 16 steps",
                         "ddp": "2 processes", "seeds": "repeat i uses seed_everything=i",
                         "granularity": "accuracy is measured at every epoch end: a time to target is the end of the"
                         " first epoch whose validation reached it"}}


def _link(rate: str, scale: Scale) -> list[str] | None:
    """The thin link's command prefix; none in a smoke run, whose ranks are forked (P3's smoke run starts its ranks
    inside a namespace, through the same runner)."""
    return [] if scale.name == "smoke" else harness.thin_link_prefix(rate)


def p7_thin_link_100mbit(scale: Scale, workdir: Path) -> dict[str, Any]:
    """P7 at 100 Mbit/s."""
    return p7_thin_link("100mbit", scale, workdir)


def p7_thin_link_20mbit(scale: Scale, workdir: Path) -> dict[str, Any]:
    """P7 at 20 Mbit/s."""
    return p7_thin_link("20mbit", scale, workdir)


P7_CHANNELS = 128
P7_TARGET = 0.85


def p9_mixing_per_byte(scale: Scale, workdir: Path) -> dict[str, Any]:
    """P9: P7's 20 Mbit/s run with each of fedhog's link options on and off, in one run.

    fedhog as in P7 (fp32 rounds every 16 device steps), then with compressed rounds (bf16, int8), with the
    self-paced period (``averaging_period="auto"``), with both, and with both in two blocks one round at a time
    and two rounds in flight (``rounds_in_flight=2``); DDP on the same link, and fedhog with its defaults and no
    rate limit (the time a thin-link run can approach).
    """
    data = workdir / "mnist1d-data"
    prefix = _link("20mbit", scale)
    if prefix is None:
        return {"skipped": harness.thin_link_unavailable()}
    wide = [f"--model.channels={P7_CHANNELS}"]
    fedhog = [*wide, "--trainer.strategy.workers_per_device=1", "--trainer.strategy.compression=none"]
    no_knobs = [*wide, "--trainer.strategy=fedhog"]
    auto = "--trainer.strategy.averaging_period=auto"
    two_blocks = ["--trainer.strategy.num_blocks=2"]
    epochs = scale.thin_accuracy_epochs
    thin = {"target": P7_TARGET, "prefix": prefix}

    def on_link(*options: str) -> Method:
        return mnist1d([*fedhog, *options], 2, scale, data, epochs, **thin)

    methods: dict[str, Method] = {
        "ddp": mnist1d([*wide, "--trainer.strategy=ddp"], 2, scale, data, epochs, **thin),
        "fedhog": on_link(),
        "fedhog_defaults": mnist1d(no_knobs, 2, scale, data, epochs, **thin),
        "fedhog_bf16": on_link("--trainer.strategy.compression=bf16"),
        "fedhog_int8": on_link("--trainer.strategy.compression=int8"),
        "fedhog_auto": on_link(auto),
        "fedhog_int8_auto": on_link("--trainer.strategy.compression=int8", auto),
        # the same in 2 blocks, one round at a time and two in flight: what overlap adds on a bandwidth-bound link
        "fedhog_int8_auto_2blocks": on_link("--trainer.strategy.compression=int8", auto, *two_blocks),
        "fedhog_int8_auto_overlap": on_link(
            "--trainer.strategy.compression=int8", auto, *two_blocks, "--trainer.strategy.rounds_in_flight=2"
        ),
        "fedhog_unlimited": mnist1d(no_knobs, 2, scale, data, epochs, target=P7_TARGET),
    }
    return {"methods": methods, "baseline": "ddp", "limit": "fedhog_unlimited",
            "settings": {"target_accuracy": P7_TARGET, "epochs": epochs, "batch_per_process": 32,
                         "samples": scale.mnist_samples, "model": f"ConvNet1D, channels={P7_CHANNELS} (105,738"
                         " parameters, 423 kB in fp32)", "recipe": "python -m recipes.mnist1d fit --model.channels=128",
                         "link": "loopback of a private netns, tc tbf rate 20mbit (all ranks' traffic shares it);"
                         " fedhog_unlimited: fedhog_defaults without the namespace",
                         "fedhog": "2 devices x 1 worker, averaging_period=16, num_blocks=1, fp32 rounds"
                         " (compression='none': the defaults before compression='auto')",
                         "fedhog_defaults": "--trainer.strategy=fedhog, no knob set (compression='auto', 1 worker"
                         " per CPU device)",
                         "fedhog_bf16/int8": "compression='bf16'/'int8': rounds send the difference from the shared"
                         " reference; consensus points send it too (exact at the end of fit)",
                         "fedhog_auto": "averaging_period='auto' (averaging may cost 5% of the workers' throughput)",
                         "fedhog_int8_auto_2blocks/overlap": "num_blocks=2, rounds_in_flight=1 / 2",
                         "ddp": "2 processes", "seeds": "repeat i uses seed_everything=i",
                         "granularity": "accuracy is measured at every epoch end: a time to target is the end of the"
                         " first epoch whose validation reached it"}}


def p8_straggler_accuracy(scale: Scale, workdir: Path) -> dict[str, Any]:
    """P8: wall-clock to 0.90 MNIST-1D test accuracy when one of two devices is 2x slower.

    Device 1 sleeps before every batch as long as one process's step takes alone (measured once before the runs),
    whatever the method: DDP waits for it every step, post-local SGD at every averaging, fedhog with static shards
    at every epoch end, and fedhog with dynamic work sharing (the docs' straggler setting) lets device 0 take more
    batches instead.
    """
    data = workdir / "mnist1d-data"
    step = recipe_step_seconds(scale, data, workdir)
    slow = straggler_options(step)
    fedhog = ["--trainer.strategy.workers_per_device=1", *slow]
    post_local = workdir / "post_local_sgd.yaml"
    post_local.write_text(POST_LOCAL_YAML)
    epochs = scale.straggler_epochs
    methods: dict[str, Method] = {
        "ddp": mnist1d(["--trainer.strategy=ddp", *slow], 2, scale, data, epochs),
        "post_local_sgd": mnist1d([f"--config={post_local}", *slow], 2, scale, data, epochs),
        "fedhog_static": mnist1d(fedhog, 2, scale, data, epochs),
        "fedhog_dynamic": mnist1d([*fedhog, "--trainer.strategy.work_sharing=dynamic"], 2, scale, data, epochs),
    }
    return {"methods": methods, "baseline": "ddp",
            "settings": {"target_accuracy": 0.90, "epochs": epochs, "batch_per_process": 32,
                         "samples": scale.mnist_samples, "recipe": "python -m recipes.mnist1d fit",
                         "slow_rank": 1, "slow_seconds": round(step, 6),
                         "slow": "rank 1 sleeps before every batch as long as one process's training step takes alone"
                         " (measured once before the runs): about 2x slower, the same for every method",
                         "fedhog_static": "2 devices x 1 worker, static shards",
                         "fedhog_dynamic": "2 devices x 1 worker, work_sharing='dynamic' (the docs' straggler setting)",
                         "post_local_sgd": "torch's post_localSGD_hook from step 1, parameters averaged every 16 steps",
                         "seeds": "repeat i uses seed_everything=i"}}
