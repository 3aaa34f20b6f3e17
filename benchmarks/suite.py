"""The benchmark suite: fedhog against DDP, post-local SGD and the physical limit, on this machine.

    python -m benchmarks                      # every benchmark, 5 interleaved repeats (P4: 3) -> benchmarks/results/
    python -m benchmarks --only p2 p3         # some of them
    python -m benchmarks --smoke --output /tmp/bench   # a few seconds each, for the test suite

Each benchmark writes ``<name>.json`` (medians, every repeat, ratios, the exact commands, settings, machine);
``python -m benchmarks.report`` then draws the PNGs and regenerates the tables of docs/benchmarks.md. The list of
benchmarks (titles, kinds, targets, smoke-run methods) is :data:`benchmarks.catalog.BENCHMARKS`; the throughput
benchmarks are defined here, the time-to-accuracy ones in :mod:`benchmarks.accuracy`, :mod:`benchmarks.lpp` and
:mod:`benchmarks.defaults`.

The benchmarks:

- ``p1_scaling``: samples/s of fedhog with 2 devices x 1 worker and 1 device x 2 workers, DDP, and the physical
  limit: as many single-process runs with no communication as there are processes, at the same time.
- ``p2_straggler``: one device made 2x slower by the harness (a fixed sleep of one step's compute); DDP, post-local
  SGD, fedhog with static and with dynamic work sharing.
- ``p3_thin_link``: a ~10M-parameter model in a network namespace whose loopback is capped at 100 Mbit/s.
- ``p7_thin_link_100mbit``, ``p7_thin_link_20mbit``: the MNIST-1D recipe with a wider CNN to 0.85 on a 100 or a 20
  Mbit/s link (a private network namespace): DDP, post-local SGD and fedhog, and fedhog with no rate limit.
- ``p9_mixing_per_byte``: P7 at 20 Mbit/s with fedhog's compressed rounds (bf16, int8) and self-paced period on
  and off, DDP, and fedhog with no rate limit.
- ``p8_straggler_accuracy``: the MNIST-1D recipe to 0.90 with device 1 about 2x slower (a fixed sleep per batch);
  DDP, post-local SGD, fedhog with static and with dynamic work sharing.
- ``p4_time_to_accuracy``: the MNIST-1D recipe to 0.90 test accuracy, fedhog vs DDP vs one process, wall-clock
  from the start of ``fit`` (validation included), and the final accuracy after the same epochs.
- ``p5_gpu``: ResNet-20 on CIFAR-shaped batches, K=1,2,4 workers sharing one GPU vs one process owning it, at
  batch 256 per worker (the paper's) and 64; and the time of one consensus of a ResNet-50-sized vector.
- ``p12_lpp_accuracy``, ``p12_lpp_time``: LPP-SGD (``"fedhog_lpp"``) against LAP-SGD at the same K: the recipe's
  final accuracy after 100 epochs, and the time to 0.85 with the wider CNN of P7 (with DDP).
- ``p10_defaults``: the defaults matrix: no hindrance, one device 2x slower from the start and from halfway, a
  20 Mbit/s link, each with DDP, post-local SGD, fedhog with no knobs and fedhog's best setting for it.
- ``p6_overhead``: the share of the workers' throughput fedhog's averaging takes at period 16 and with "auto",
  measured inside each run (phases with and without rounds alternate); the averager's rounds/s, bytes/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks import consensus, harness, throughput
from benchmarks.accuracy import summarize_seeds
from benchmarks.catalog import BENCHMARKS, FULL, NO_ROUNDS, RESULTS, SMOKE, Method, Scale, is_accuracy


def _common(scale: Scale, devices: int, samples: int | None = None, epochs: int | None = None) -> list[str]:
    return ["--devices", str(devices), "--samples", str(samples or scale.samples),
            "--epochs", str(epochs or scale.epochs), "--batch", "64"]


def _throughput(args: list[str], processes: int, prefix: list[str] | None = None) -> Method:
    return lambda out: harness.launch(args, out, processes, prefix or [])


def p1_scaling(scale: Scale, workdir: Path) -> dict[str, Any]:
    """P1: does fedhog use the machine as well as independent processes would?"""
    epochs = scale.scaling_epochs
    one = ["--model", "mlp", *_common(scale, 1, epochs=epochs)]
    two = ["--model", "mlp", *_common(scale, 2, epochs=epochs)]
    methods: dict[str, Method] = {
        "physical_limit": lambda out: harness.launch_independent(
            ["--model", "mlp", *_common(scale, 1, samples=scale.samples // 2, epochs=epochs)], out, copies=2
        ),
        "ddp": _throughput([*two, "--strategy", "ddp"], 2),
        "fedhog_2x1": _throughput([*two, "--strategy", "fedhog", "--workers", "1"], 2),
        # the same with the self-paced period: rounds may cost the workers 5% of their throughput
        "fedhog_2x1_auto": _throughput([*two, "--strategy", "fedhog", "--workers", "1", "--period", "auto", "--csv"],
                                       2),
        "fedhog_1x2": _throughput([*one, "--strategy", "fedhog", "--workers", "2"], 2),
        # the same 2 x 1 run exchanging a quarter of the vector per round: a quarter of the averaging traffic
        "fedhog_2x1_4blocks": _throughput([*two, "--strategy", "fedhog", "--workers", "1", "--blocks", "4"], 2),
    }
    return {"methods": methods, "baseline": "ddp", "limit": "physical_limit",
            "settings": {"model": "mlp (1.6M parameters)", "batch": 64, "processes": 2, "epochs": epochs,
                         "fedhog": "defaults: averaging_period=16, num_blocks=1, static work sharing",
                         "fedhog_2x1_auto": "averaging_period='auto' (rounds may cost 5% of the workers' throughput)"}}


def p2_straggler(scale: Scale, workdir: Path) -> dict[str, Any]:
    """P2: one device 2x slower by a fixed sleep per step (its compute time, measured once); who waits for it?

    The sleep does not depend on the method, so every method faces the same hindrance; each method also runs
    without the straggler, and its retention (straggler samples/s over its own straggler-free samples/s) says how
    much of its speed the slow device costs it.
    """
    compute = throughput.calibrate_step("mlp", 64)
    common = ["--model", "mlp", *_common(scale, 2)]
    slow = [*common, "--slow-rank", "1", "--slow-seconds", f"{compute:.6f}"]
    fedhog = ["--strategy", "fedhog", "--workers", "1"]
    post_local = ["--strategy", "post_local", "--period", "16"]
    methods: dict[str, Method] = {
        "ddp": _throughput([*slow, "--strategy", "ddp"], 2),
        "post_local_sgd": _throughput([*slow, *post_local], 2),
        "fedhog_static": _throughput([*slow, *fedhog, "--work-sharing", "static"], 2),
        "fedhog_dynamic": _throughput([*slow, *fedhog, "--work-sharing", "dynamic"], 2),
        "ddp_no_straggler": _throughput([*common, "--strategy", "ddp"], 2),
        "post_local_sgd_no_straggler": _throughput([*common, *post_local], 2),
        "fedhog_no_straggler": _throughput([*common, *fedhog], 2),
    }
    return {"methods": methods, "baseline": "ddp",
            "retention": {"ddp": "ddp_no_straggler", "post_local_sgd": "post_local_sgd_no_straggler",
                          "fedhog_static": "fedhog_no_straggler", "fedhog_dynamic": "fedhog_no_straggler"},
            "settings": {"model": "mlp (1.6M parameters)", "batch": 64, "slow_rank": 1,
                         "slow_seconds": round(compute, 6),
                         "slow": "rank 1 sleeps a fixed time per step: one step's compute on one thread, measured"
                         " once before the runs (2x slower for every method, whatever its communication)",
                         "averaging_period": 16, "fedhog_dynamic": "work_sharing='dynamic' (the docs' straggler"
                         " setting)",
                         "post_local_sgd": "torch's post_localSGD_hook from step 1, parameters averaged every 16 steps"
                         " (its hook installed on CPU too; Lightning installs it on CUDA only)"}}


def p3_thin_link(scale: Scale, workdir: Path) -> dict[str, Any]:
    """P3: a communication-heavy model on a 100 Mbit/s link: DDP all-reduces 38 MB of gradients per step."""
    prefix = harness.thin_link_prefix("100mbit")
    if prefix is None:
        return {"skipped": harness.thin_link_unavailable()}
    model = ["--model", scale.thin_model]
    ddp_samples = max(scale.thin_samples // 4, 2 * 64 * 6)  # a DDP step takes seconds here: fewer of them
    methods: dict[str, Method] = {
        "ddp": _throughput([*model, *_common(scale, 2, ddp_samples, 1), "--strategy", "ddp"], 2, prefix),
        "fedhog": _throughput(
            [*model, *_common(scale, 2, scale.thin_samples, 2), "--strategy", "fedhog", "--workers", "1",
             "--blocks", "4", "--csv"], 2, prefix,
        ),
    }
    return {"methods": methods, "baseline": "ddp",
            "settings": {"model": f"{scale.thin_model} ({'9.5M' if scale.thin_model == 'wide' else '1.6M'}"
                         " parameters)", "link": "loopback of a private netns, tc tbf 100mbit", "batch": 64,
                         "fedhog": "2 devices x 1 worker, 4 blocks, 2 epochs (one consensus in the window)"}}


def p5_gpu(scale: Scale, workdir: Path) -> dict[str, Any]:
    """P5: K Hogwild! workers sharing one GPU vs one process owning it, and the cost of a consensus point."""
    if not torch.cuda.is_available():
        return {"skipped": "skipped: no CUDA device on this machine (run it where `torch.cuda.is_available()`)"}
    methods: dict[str, Method] = {}
    baselines: dict[str, str] = {}
    for batch, samples in ((256, scale.gpu_samples), (64, scale.gpu_samples // 4)):
        common = ["--accelerator", "gpu", "--model", "resnet20", "--devices", "1", "--samples", str(samples),
                  "--epochs", str(scale.gpu_epochs), "--batch", str(batch)]
        one = f"one_process_b{batch}"
        methods[one] = _throughput([*common, "--strategy", "single"], 1)
        baselines[one] = one
        for workers in (1, 2, 4):
            name = f"fedhog_k{workers}_b{batch}"
            methods[name] = _throughput([*common, "--strategy", "fedhog", "--workers", str(workers), "--csv"], workers)
            baselines[name] = one
    return {"methods": methods, "baseline": "one_process_b256", "baselines": baselines,
            "once": {"consensus": lambda: consensus.measure_all(scale.consensus_elements)},
            "settings": {"model": "ResNet-20 (recipes.models.resnet20, 0.27M parameters)",
                         "batch_per_worker": [256, 64], "devices": 1, "data": "random CIFAR-shaped tensors in memory",
                         "fedhog": "K workers on one device: no leaders' group, consensus points at epoch ends",
                         "consensus": f"exact average of {scale.consensus_elements:,} fp32 elements between two"
                         " leaders (ResNet-50: 25,557,032)"}}


def p6_overhead(scale: Scale, workdir: Path) -> dict[str, Any]:
    """P6: what the background averaging costs the workers' throughput, and how much it moves.

    Runs minutes apart differ by more than the cost measured (the repeats of one method in ``p1_scaling.json`` and
    ``p6_overhead.json`` spread wider than the costs), so the cost is measured inside each run: phases with and
    without rounds alternate (``--alternate``), and each phase with rounds is compared with its neighbours
    (:func:`harness.paired_costs`).
    """
    # as long as P1's runs: "auto" needs a few probe cycles (each >= 96 device steps and 2 rounds) to measure costs
    fedhog = ["--model", "mlp", *_common(scale, 2, epochs=scale.scaling_epochs), "--strategy", "fedhog", "--workers",
              "1", "--csv"]
    phase_s = "2.0"  # long enough for a few rounds at period 16 after the start of a phase that is left out
    methods: dict[str, Method] = {
        # a period longer than the run: no rounds at all, only the consensus at epoch ends
        "averaging_off": _throughput([*fedhog, "--period", str(NO_ROUNDS)], 2),
        "alternating_16": _throughput([*fedhog, "--period", "16", "--alternate", phase_s], 2),
        "alternating_auto": _throughput([*fedhog, "--period", "auto", "--alternate", phase_s], 2),
    }
    return {"methods": methods, "baseline": "averaging_off",
            "settings": {"model": "mlp (1.6M parameters, 6.3 MB)", "devices": 2, "workers_per_device": 1,
                         "epochs": scale.scaling_epochs, "alternate": f"phases of {phase_s} s of the machine's clock,"
                         " every other one with no rounds (alternating_*: half of their steps average)",
                         "averaging_period": "16, or 'auto' (averaging may cost 5% of the workers' throughput)",
                         "num_blocks": 1}}


def _ratios(
    name: str, results: dict[str, dict[str, Any]], baseline: str, limit: str | None, baselines: dict[str, str]
) -> dict[str, float]:
    """Each method over its baseline (``baselines[method]`` where given, else ``baseline``) and the limit."""
    ratios: dict[str, float] = {}
    if is_accuracy(name):
        for method, r in results.items():
            for own in (baselines.get(method, baseline), limit):
                base = results.get(own or "")
                if base is None or method == own:
                    continue
                if r.get("seconds_to_target") and base.get("seconds_to_target"):
                    ratios[f"{method}_time_over_{own}"] = r["seconds_to_target"] / base["seconds_to_target"]
                if own != limit and r.get("final_accuracy") is not None and base.get("final_accuracy") is not None:
                    ratios[f"{method}_accuracy_minus_{own}"] = r["final_accuracy"] - base["final_accuracy"]
        return ratios
    for method, r in results.items():
        own = baselines.get(method, baseline)
        if method != own and own in results:
            ratios[f"{method}_over_{own}"] = r["samples_per_s"] / results[own]["samples_per_s"]
            to_end, base_to_end = r.get("samples_per_s_to_end"), results[own].get("samples_per_s_to_end")
            if to_end and base_to_end:
                ratios[f"{method}_to_end_over_{own}"] = to_end / base_to_end
        if limit and method != limit:
            ratios[f"{method}_over_{limit}"] = r["samples_per_s"] / results[limit]["samples_per_s"]
    return ratios


def run_benchmark(name: str, scale: Scale, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Runs one benchmark's methods interleaved and returns its report (not yet written)."""
    entry = BENCHMARKS[name]
    define: Callable[[Scale, Path], dict[str, Any]] = getattr(importlib.import_module(entry.module), name)
    spec = define(scale, workdir)
    report: dict[str, Any] = {"benchmark": name, "title": entry.title, "date": datetime.date.today().isoformat(),
                              "invocation": shlex.join(["python", "-m", "benchmarks", *sys.argv[1:]]),
                              "machine": harness.machine(), "scale": scale.name,
                              "repeats": scale.accuracy_repeats if is_accuracy(name) else scale.repeats}
    if "skipped" in spec:
        log(f"{name}: {spec['skipped']}")
        return {**report, "skipped": spec["skipped"]}
    if scale.name == "smoke" and entry.smoke_methods is not None:  # every code path once: a short test suite
        spec["methods"] = {m: call for m, call in spec["methods"].items() if m in entry.smoke_methods}
    log(f"{name}: {entry.title}")
    began = time.perf_counter()
    if is_accuracy(name):
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in spec["methods"]}
        for repeat in range(scale.accuracy_repeats):
            for method, call in spec["methods"].items():
                runs[method].append(call(workdir / f"{name}-{method}-{repeat}"))
                last = runs[method][-1]
                log(f"  {method} #{repeat + 1}: {last['seconds_to_target']} s to target,"
                    f" final {last['final_accuracy']}")
        results = {m: summarize_seeds(rs) for m, rs in runs.items()}
    else:
        results = harness.interleave(spec["methods"], scale.repeats, workdir / name, log)
    once = {}
    for what, call in spec.get("once", {}).items():
        log(f"  {what}")
        once[what] = call()
    return {
        **report,
        "settings": spec["settings"],
        "target": entry.target,
        "baseline": spec["baseline"],
        "baselines": spec.get("baselines", {}),
        "limit": spec.get("limit"),
        "results": results,
        "once": once,
        "ratios": {**_ratios(name, results, spec["baseline"], spec.get("limit"), spec.get("baselines", {})),
                   **{f"{method}_retention": results[method]["samples_per_s"] / results[alone]["samples_per_s"]
                      for method, alone in spec.get("retention", {}).items()
                      if method in results and alone in results}},
        "benchmark_wall_s": time.perf_counter() - began,
        "note": "medians over interleaved repeats; throughput = samples/s of all workers from warm-up to the"
        " last worker's last step (idle time behind stragglers and consensus points included)",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--smoke", action="store_true", help="a few seconds per benchmark (the test suite's mode)")
    parser.add_argument("--repeats", type=int, default=None, help="override the number of interleaved repeats")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the JSON files go")
    args = parser.parse_args(argv)
    scale = SMOKE if args.smoke else FULL
    if args.repeats is not None:
        scale = dataclasses.replace(scale, repeats=args.repeats, accuracy_repeats=args.repeats)
    if args.smoke:
        harness.fork_ranks()  # the smoke run checks the harness and every code path, not the start-up of programs

    def log(line: str) -> None:
        print(line, flush=True)

    with tempfile.TemporaryDirectory(prefix="fedhog-bench-") as tmp:
        for name in args.only:
            report = run_benchmark(name, scale, Path(tmp), log)
            harness.write(args.output / f"{name}.json", report)
            if report.get("ratios"):
                log("  " + ", ".join(f"{k}={v:.3f}" for k, v in report["ratios"].items()))
