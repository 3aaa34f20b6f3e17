"""The benchmark harness does not rot: every benchmark runs for a few seconds and writes a complete report.

No timing is asserted here (a loaded 2-core test machine says nothing about speed); the figures come from
``python -m benchmarks`` and live in ``benchmarks/results/``. What is asserted: every method of every benchmark
ran and produced figures, the JSON has what a reader needs to trust it (command, settings, machine), the report
turns it into tables and plots, and docs/benchmarks.md shows exactly what the committed JSON holds.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook
from torch.nn.parallel import DistributedDataParallel

from benchmarks import lpp, report, throughput
from benchmarks.accuracy import median_reached, summarize_seeds
from benchmarks.catalog import BENCHMARKS, NO_ROUNDS, RESULTS, is_accuracy
from benchmarks.harness import aggregate, paired_costs
from tests.conftest import free_port, smoke_results

ROOT = Path(__file__).resolve().parent.parent


def test_aggregate_counts_idle_time_behind_a_straggler() -> None:
    # two ranks of batch 10: the fast one is done at t=4, the slow one keeps going until t=10
    fast = {"batch": 10, "times": [0, 1, 2, 3, 4]}
    slow = {"batch": 10, "times": [0, 2.5, 5, 7.5, 10]}
    # window from the last warm-up step (t=2.5 with skip=1) to the last step of anyone (t=10)
    assert aggregate([fast, slow], skip=1) == pytest.approx((2 * 10 + 3 * 10) / 7.5)


PHASE_S = 10.0


def _alternating_rank(phases: list[tuple[int, float]]) -> dict[str, Any]:
    """One rank's step times and phases as ``throughput.py --alternate 10`` writes them: phase ``k`` (of ``phases``:
    with rounds?, seconds per step) starts at ``10 k`` s with two 0.3 s steps (a round's spill-over: inside the
    0.4 s the measurement leaves out), then steps at its rate until the phase ends."""
    times: list[float] = []
    marks: list[list[int]] = []
    for number, (on, step) in enumerate(phases):
        start = number * PHASE_S
        times += [start, start + 0.3] + [start + 0.6 + index * step for index in range(int((PHASE_S - 0.6) / step))]
        marks += [[number, on, 0]] * (len(times) - len(marks))
    return {"times": times, "phases": marks, "batch": 1, "alternate": PHASE_S}


def test_paired_costs_compare_each_phase_with_rounds_with_its_neighbours_on_the_same_rank() -> None:
    # the machine slows from 1.0 to 1.5 s per step around a phase with rounds at 1.5: against the neighbours' mean
    # (1.25 s) it lost a sixth of its throughput; against the phase before it alone it would seem to lose a third
    assert paired_costs([_alternating_rank([(0, 1.0), (1, 1.5), (0, 1.5)])]) == [pytest.approx(1 / 6)]
    costs = paired_costs(
        [_alternating_rank([(1, 1.0), (0, 1.25), (1, 1.5)]), _alternating_rank([(0, 2.0), (1, 2.0)])]
    )
    assert costs == [pytest.approx(-0.25), pytest.approx(1 / 6), pytest.approx(0.0)], "each pair, on its own rank"
    assert paired_costs([_alternating_rank([(1, 1.0)])]) == [], "no phase without rounds next to it"
    assert paired_costs([{"times": [0.0, 1.0, 2.0], "batch": 1}]) == [], "a run without phases"


def test_paired_costs_leave_out_the_gaps_between_epochs() -> None:
    rank = _alternating_rank([(0, 1.0), (1, 1.0), (0, 1.0)])
    middle = [index for index, (number, _, _) in enumerate(rank["phases"]) if number == 1]
    for index in middle[3:]:  # an epoch ends in the middle phase, after 0.5 s at a consensus point
        rank["times"][index] += 0.5
        rank["phases"][index] = [rank["phases"][index][0], rank["phases"][index][1], 1]
    assert paired_costs([rank]) == [pytest.approx(0.0)]


def test_a_figure_some_seeds_lack_is_summarized_over_the_others() -> None:
    # "auto" reports its cost only once it has measured a cycle: a short seed may end before that (P9 stopped here)
    run = {"seconds_to_target": 7.0, "epochs_to_target": 4, "final_accuracy": 0.9, "train_s": 9.0,
           "process_wall_s": 20.0, "curve": [], "command": "c"}
    runs = [{**run, "fedhog": {"period": 16.0}}, {**run, "fedhog": {"period": 24.0, "averaging_cost": 0.04}}]
    assert summarize_seeds(runs)["fedhog"] == {"period": 20.0, "averaging_cost": 0.04}


def test_alternating_runs_switch_the_period_on_the_machines_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    config = throughput.AlternatingConfig(averaging_period=16, phase_s=2.0)
    assert throughput.NO_ROUNDS == NO_ROUNDS  # the program cannot import the catalog: the same value twice
    for now, period in [(100.0, NO_ROUNDS), (101.9, NO_ROUNDS), (102.0, 16), (103.99, 16), (104.5, NO_ROUNDS)]:
        monkeypatch.setattr(throughput.time, "time", lambda now=now: now)
        assert config.period_at(3) == period, now
    assert throughput.averaging_phase(102.5, 2.0) == (51, True)


def test_a_seed_that_never_reached_the_target_counts_as_the_slowest() -> None:
    assert median_reached([5.0, None, 3.0]) == 5.0  # two of three reached it: the median seed took 5 s
    assert median_reached([None, None, 3.0]) is None  # the median seed never reached it
    assert median_reached([4.0, 2.0]) == 3.0


def test_every_benchmark_of_the_catalog_is_defined_where_it_says() -> None:
    for name, entry in BENCHMARKS.items():
        assert callable(getattr(importlib.import_module(entry.module), name, None)), (name, entry.module)
    assert f"time to {lpp.TIME_TARGET} " in BENCHMARKS["p12_lpp_time"].title


def test_the_report_reads_results_without_torch_or_lightning() -> None:
    code = "import sys, benchmarks.report; print(sorted({'torch', 'lightning'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", "benchmarks.report imports torch or Lightning again (through what?)"


def test_post_local_sgd_registers_its_hook_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # Lightning registers DDP communication hooks on CUDA only: on CPU, DDP with post-local SGD would all-reduce
    # every gradient and average the parameters too
    registered = []
    monkeypatch.setattr(DistributedDataParallel, "register_comm_hook",
                        lambda module, state, hook: registered.append((state, hook)))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    state = PostLocalSGDState(process_group=None, subgroup=None, start_localSGD_iter=1,
                              post_local_gradient_allreduce=False)
    strategy = throughput.PostLocalSGDOnCPU(model_averaging_period=16, ddp_comm_state=state,
                                            ddp_comm_hook=post_localSGD_hook, parallel_devices=[torch.device("cpu")])
    strategy.model = throughput.Timed("mlp", lr=0.01, slow_rank=-1, slow_factor=1.0)
    strategy.configure_ddp()
    assert isinstance(strategy.model, DistributedDataParallel)
    assert registered == [(state, post_localSGD_hook)]


@pytest.fixture(scope="module")
def smoke() -> Path:
    """``python -m benchmarks --smoke``, started in the background when the suite started (tests/conftest.py)."""
    return smoke_results(timeout=600)


@pytest.mark.slow
@pytest.mark.timeout(900)  # the smoke run is this test's set-up: about 2 minutes alone on 2 cores
def test_smoke_mode_runs_every_benchmark_and_its_methods(smoke: Path) -> None:
    assert sorted(path.stem for path in smoke.glob("*.json")) == sorted(BENCHMARKS)
    for name in BENCHMARKS:
        result = json.loads((smoke / f"{name}.json").read_text())
        assert result["scale"] == "smoke" and result["machine"]["cpus"] >= 1
        assert "python" in result["invocation"] and "--smoke" in result["invocation"]
        if result.get("skipped"):
            # only the GPU benchmark without CUDA, and the thin links without root, may skip, saying why
            assert name in ("p5_gpu", "p3_thin_link", "p7_thin_link_100mbit", "p7_thin_link_20mbit",
                            "p9_mixing_per_byte")
            assert result["skipped"].startswith("skipped: ")
            continue
        assert result["settings"]
        if (kept := BENCHMARKS[name].smoke_methods) is not None:
            assert sorted(result["results"]) == sorted(kept)
        else:
            assert result["baseline"] in result["results"]
        for method, figures in result["results"].items():
            assert figures["command"], method
            if is_accuracy(name):
                assert 0.0 < figures["final_accuracy"] <= 1.0, (method, figures)
                if name == "p11_chaos":  # an epoch whose training a kill ended is not validated after the restart
                    assert 1 <= len(figures["curve"]) <= 2 and len(figures["all_faults"][0]) == 1, figures
                else:
                    assert len(figures["curve"]) == 2, "one (seconds, accuracy) point per epoch"
            else:
                assert figures["samples_per_s"] > 0 and figures["step_s"] > 0, (method, figures)
                assert all(steps >= 4 for run in figures["steps_per_rank"] for steps in run), (method, figures)
        if result["baseline"] in result["results"] and len(result["results"]) > 1:
            assert result["ratios"], name
    overhead = json.loads((smoke / "p6_overhead.json").read_text())
    assert overhead["results"]["alternating_16"]["fedhog"]["rounds_per_s"] > 0  # fedhog's own figures were read


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_report_draws_every_plot_and_writes_the_readme_section(smoke: Path, tmp_path: Path) -> None:
    """The tables of docs/benchmarks.md (once the README's section; conftest.SMOKE_TESTS knows this name)."""
    page = tmp_path / "benchmarks.md"
    first = next(iter(BENCHMARKS))
    page.write_text(f"# title\n\n{report.begin(first)}\nold\n{report.end(first)}\n\nprose\n")
    with pytest.raises(SystemExit):  # the page does not show the results yet
        report.main(["--results", str(smoke), "--page", str(page), "--check"])
    report.main(["--results", str(smoke), "--page", str(page)])
    text = page.read_text()
    assert "old" not in text and text.index(report.end(first)) < text.index("prose")  # replaced where it was
    for name in BENCHMARKS:  # the others are appended, each between its own markers
        result = json.loads((smoke / f"{name}.json").read_text())
        assert result["title"] in text and report.begin(name) in text and report.end(name) in text
        if not result.get("skipped"):
            assert (smoke / f"{name}.png").read_bytes().startswith(b"\x89PNG")
            assert f"]({Path(os.path.relpath(smoke / f'{name}.png', tmp_path)).as_posix()})" in text  # its plot
    report.main(["--results", str(smoke), "--page", str(page), "--check"])
    page.write_text(text.replace("| method |", "| methods |", 1))  # a generated table edited by hand
    with pytest.raises(SystemExit):
        report.main(["--results", str(smoke), "--page", str(page), "--check"])


def test_the_benchmarks_page_shows_what_the_committed_results_hold() -> None:
    assert (RESULTS / "p1_scaling.json").exists(), "run `python -m benchmarks` and commit benchmarks/results/"
    report.main(["--check"])  # exits non-zero when a table of docs/benchmarks.md differs from the JSON
