"""What the benchmarks are, without running any: their scales, titles, kinds, targets and smoke-run methods.

Every benchmark module imports this one, and it imports none of them (nor torch, nor Lightning): the report reads
the results with it alone, and the modules that define benchmarks share :class:`Scale` and :data:`Method` without
importing the suite that runs them.

A benchmark is a function named like its entry in :data:`BENCHMARKS`, defined in that entry's ``module``; it takes
the :class:`Scale` and a scratch folder and returns its *spec*: ``methods`` (name -> :data:`Method`), ``baseline``,
``settings`` and optionally ``limit``, ``baselines``, ``retention`` and ``once`` (see :mod:`benchmarks.suite`), or
``{"skipped": why}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parent.parent
"""The repository: the working directory of every launch."""
RESULTS = ROOT / "benchmarks" / "results"
"""Where ``python -m benchmarks`` writes its JSON files and ``python -m benchmarks.report`` reads them."""

Method = Callable[[Path], dict[str, Any]]
"""One method of a benchmark: runs once into a fresh folder and returns that run's figures."""

NO_ROUNDS = 10**9
"""An averaging period no run reaches: fedhog then averages only at consensus points (epoch ends)."""


@dataclass(frozen=True)
class Scale:
    """How long the runs are: the real measurement, or a few seconds each to keep the harness from rotting."""

    name: str
    samples: int  # per launch and epoch, all processes together
    epochs: int
    scaling_epochs: int  # P1: long enough that a repeat's rate does not hinge on start-up and the machine's moods
    repeats: int
    accuracy_repeats: int  # a time-to-accuracy run trains a recipe to its target, each seed: fewer of them
    thin_samples: int  # fedhog's samples in the thin-link benchmark (DDP gets a quarter: its steps wait on the link)
    thin_model: str
    mnist_epochs: int
    mnist_samples: int
    straggler_epochs: int  # P8: long enough to pass 0.90 with a straggler
    thin_accuracy_epochs: int  # P7: long enough for every method to pass 0.85 on a 20 Mbit/s link
    gpu_samples: int  # P5 at batch 256 per worker (batch 64: a quarter), all workers together, per epoch
    gpu_epochs: int
    consensus_elements: int


FULL = Scale(name="full", samples=12288, epochs=3, scaling_epochs=12, repeats=5, accuracy_repeats=3, thin_samples=4096,
             thin_model="wide", mnist_epochs=100, mnist_samples=5000, straggler_epochs=30, thin_accuracy_epochs=5,
             gpu_samples=16384, gpu_epochs=2, consensus_elements=25_557_032)
SMOKE = Scale(name="smoke", samples=1024, epochs=1, scaling_epochs=1, repeats=1, accuracy_repeats=1, thin_samples=1024,
              thin_model="mlp", mnist_epochs=2, mnist_samples=1000, straggler_epochs=2, thin_accuracy_epochs=2,
              gpu_samples=2048, gpu_epochs=1, consensus_elements=1_000_000)


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of the suite.

    Attributes:
        title: the heading of its table in the README and of its plot.
        module: the module that defines the function named like the benchmark.
        kind: ``"throughput"`` (launches of ``benchmarks/throughput.py``, samples/s over interleaved repeats) or
            ``"accuracy"`` (recipe runs timed to a test accuracy, one seed per repeat).
        target: what the figures should show, in words (``None``: no target set).
        smoke_methods: the methods a smoke run keeps (``None``: all of them). Each launch costs the test suite a
            training run and its ranks' start, so a method left out runs the same code as one kept somewhere, with
            other settings (DDP's throughput path in p1 and p2, the recipe's DDP in p4/p8's code, post-local SGD's
            strategy class in p8, fedhog's throughput path in p2, p3 and p6, the thin-link namespace in p3 and p7).
    """

    title: str
    module: str
    kind: Literal["throughput", "accuracy"]
    target: str | None = None
    smoke_methods: tuple[str, ...] | None = None


_SUITE, _ACCURACY = "benchmarks.suite", "benchmarks.accuracy"

BENCHMARKS: dict[str, Benchmark] = {  # in the order they run and the README shows them
    "p1_scaling": Benchmark(
        "P1 scaling on 2 CPU cores", _SUITE, "throughput",
        "fedhog >= 0.95 of the physical limit and above DDP",
        ("physical_limit", "ddp"),
    ),
    "p2_straggler": Benchmark(
        "P2 one device 2x slower", _SUITE, "throughput", "fedhog >= 1.4x DDP", ("ddp", "fedhog_dynamic"),
    ),
    "p3_thin_link": Benchmark(
        "P3 100 Mbit/s link", _SUITE, "throughput", "fedhog >= 2x DDP", ("fedhog",),
    ),
    "p4_time_to_accuracy": Benchmark(
        "P4 MNIST-1D time to 0.90", _ACCURACY, "accuracy",
        "fedhog <= 0.8x DDP's time, final accuracy within 1 point", ("fedhog_2x1",),
    ),
    "p5_gpu": Benchmark(
        "P5 one GPU", _SUITE, "throughput", "fedhog K=4 >= 1.3x one process on ResNet-20",
        ("one_process_b256", "fedhog_k2_b256"),
    ),
    "p6_overhead": Benchmark("P6 averaging overhead", _SUITE, "throughput"),
    "p7_thin_link_100mbit": Benchmark(
        "P7 MNIST-1D time to 0.85 on a 100 Mbit/s link", _ACCURACY, "accuracy",
        "fedhog <= 0.5x DDP's time, and within 2x of its own time on an unlimited link", ("fedhog",),
    ),
    "p7_thin_link_20mbit": Benchmark(
        "P7 MNIST-1D time to 0.85 on a 20 Mbit/s link", _ACCURACY, "accuracy",
        "fedhog within 2x of its own time on an unlimited link", ("fedhog",),
    ),
    "p8_straggler_accuracy": Benchmark(
        "P8 MNIST-1D time to 0.90 with one device 2x slower", _ACCURACY, "accuracy",
        "fedhog with the straggler setting <= 0.75x DDP's time to 0.90", ("post_local_sgd", "fedhog_dynamic"),
    ),
    "p9_mixing_per_byte": Benchmark(
        "P9 MNIST-1D time to 0.85 on a 20 Mbit/s link, fedhog's link options", _ACCURACY, "accuracy",
        "fedhog with no knob set within 1.5x of its own time on an unlimited link and <= 0.15x DDP's; the best"
        " option within 1.2x; the time int8 spends at consensus points <= 1.5x the unlimited link's",
        ("fedhog_int8_auto_overlap",),
    ),
    "p12_lpp_accuracy": Benchmark(
        "P12a MNIST-1D recipe accuracy with LPP-SGD (partial backprop)", "benchmarks.lpp", "accuracy",
        "fedhog_lpp's final accuracy within 1 point of fedhog's (median of 3 seeds)", ("fedhog_lpp",),
    ),
    "p12_lpp_time": Benchmark(  # the title's target is lpp.TIME_TARGET (tests/test_benchmarks.py checks)
        "P12b MNIST-1D time to 0.85 with a backward-heavy CNN: LPP-SGD vs LAP-SGD vs DDP", "benchmarks.lpp",
        "accuracy", "none set: says whether partial steps reach the target sooner than full steps at the same K",
        (),  # the measurement of one partial step still runs
    ),
    "p13_period_auto": Benchmark(
        "P13 MNIST-1D time to 0.90 with averaging_period 16 and 'auto'", _ACCURACY, "accuracy",
        "'auto' no slower than period 16 to 0.90 (it becomes the default only then)", ("fedhog_period_auto",),
    ),
    "p10_defaults": Benchmark(
        "P10 the defaults matrix: no hindrance, a straggler, one from halfway, a 20 Mbit/s link", "benchmarks.defaults",
        "accuracy",
        "fedhog with no knobs within 1.15x of its best setting's time and ahead of DDP and post-local SGD in every"
        " scenario; <= 0.9x DDP's time with no hindrance, <= 0.75x with a straggler, <= 0.85x with one from halfway",
        ("halfway_fedhog",),  # no knobs, a straggler from epoch 1, the early stop
    ),
    "p11_chaos": Benchmark(
        "P11 chaos: rank 1's worker SIGKILLed every ~2 epochs, torchrun restarts the run", "benchmarks.chaos",
        "accuracy",
        "fedhog's goodput >= 90% with a fault every ~2 epochs (DDP's beside it); work lost per fault no more than"
        " about one averaging period of the dead device",
        ("fedhog_faults",),  # two agents, one kill, the rescue and the restart
    ),
}


def is_accuracy(name: str) -> bool:
    """Whether benchmark ``name`` times recipe runs to an accuracy (else it measures samples/s)."""
    return BENCHMARKS[name].kind == "accuracy"
