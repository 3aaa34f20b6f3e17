"""Launching timed runs and turning their step times into figures: the parts every benchmark shares.

A benchmark is a set of *methods* (fedhog, DDP, ...), each a list of launches of ``benchmarks/throughput.py``
(or of a recipe). Methods are run interleaved - repeat 1 of every method, then repeat 2, ... - so that slow
drifts of the machine (thermal, page cache, other tenants) hit all of them alike; figures are medians over
repeats and the claims are ratios between methods of the same invocation.
"""

from __future__ import annotations

import atexit
import csv
import itertools
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.catalog import ROOT

if TYPE_CHECKING:
    from tests.forkserver import ForkServer

THROUGHPUT = ROOT / "benchmarks" / "throughput.py"
CPUS = os.cpu_count() or 1


def machine() -> dict[str, Any]:
    """What the figures were measured on: a ratio means little without it."""
    import lightning  # here, not at the top: the report reads results without importing torch or Lightning
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": CPUS,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
    }


def aggregate(ranks: Sequence[dict[str, Any]], skip: int = 3) -> float:
    """Samples/s of all ranks together, from the moment every rank has warmed up to the last rank's last step.

    The window ends with the *last* rank's last step, so time a fast rank spends idle behind a straggler
    (or parked at a consensus point) counts against the method, as it does for the user.
    """
    return _window_rate(ranks, skip, end=max(rank["times"][-1] for rank in ranks))


def aggregate_to_end(ranks: Sequence[dict[str, Any]], skip: int = 3) -> float | None:
    """Like :func:`aggregate`, but the window ends when the last rank has returned from ``fit``.

    That includes what a method does after the last step before the user has a model: fedhog's final consensus
    (the exact average of all devices' copies), DDP's and everyone's teardown. None for older rank files.
    """
    if not all("fit_end" in rank for rank in ranks):
        return None
    return _window_rate(ranks, skip, end=max(rank["fit_end"] for rank in ranks))


def _window_rate(ranks: Sequence[dict[str, Any]], skip: int, end: float) -> float:
    """Samples of all ranks' steps after every rank's ``skip``-th step and up to ``end``, per second.

    A rank with few steps (a straggler in a short run) skips at most half of them, so the window cannot start
    after everybody's last step.
    """
    start = max(rank["times"][min(skip, len(rank["times"]) // 2)] for rank in ranks)
    samples = sum(sum(start < t <= end for t in rank["times"]) * rank["batch"] for rank in ranks)
    return samples / max(end - start, 1e-9)


def step_seconds(ranks: Sequence[dict[str, Any]], skip: int = 3) -> float:
    """Median seconds between two consecutive steps of one worker, over all ranks after warm-up."""
    gaps = [b - a for rank in ranks for a, b in itertools.pairwise(rank["times"][skip:])]
    return statistics.median(gaps) if gaps else float("nan")


def paired_costs(ranks: Sequence[dict[str, Any]], settle_s: float = 0.4) -> list[float]:
    """With ``--alternate``: the share of the throughput averaging took, once per phase with rounds, from its mean
    step time against the mean of the phases without rounds on either side of it, on the same rank (each rank's
    data holds its phases and their length in seconds, ``"alternate"``).

    Phases seconds apart share the machine's load, so a drift that would swamp a comparison between runs (the
    repeats of one method in ``p6_overhead.json`` spread wider than the costs) cancels, to first order where the
    phases on both sides are measured. A step's time is the gap to the rank's next step in the same phase and epoch;
    the first ``settle_s`` of a phase are left out (a round started just before a phase without rounds finishes
    there).
    """
    costs = []
    for rank in ranks:
        phase_s = rank.get("alternate", 0.0)
        gaps: dict[int, list[float]] = {}
        kinds: dict[int, bool] = {}
        steps = list(zip(rank.get("phases", []), rank["times"], strict=False))
        for ((number, on, epoch), began), ((next_number, _, next_epoch), ended) in itertools.pairwise(steps):
            kinds[number] = bool(on)
            if (number, epoch) == (next_number, next_epoch) and began >= number * phase_s + settle_s:
                gaps.setdefault(number, []).append(ended - began)
        means = {number: statistics.mean(times) for number, times in gaps.items() if len(times) >= 3}
        for number, mean in means.items():
            around = [means[other] for other in (number - 1, number + 1) if other in means and not kinds[other]]
            if kinds[number] and around:
                costs.append(1.0 - statistics.mean(around) / mean)
    return costs


def threads_env(processes: int) -> dict[str, str]:
    """One share of the cores per process, set explicitly so that every method gets the same split.

    Lightning sets this for DDP-like strategies only; a single-process run would otherwise take every core
    and two concurrent ones would oversubscribe.
    """
    threads = str(max(1, CPUS // processes))
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONWARNINGS": "ignore"}


_FORKS: ForkServer | None = None
"""With :func:`fork_ranks`: the zygote that forks the ranks of launches outside a namespace (smoke runs)."""


def fork_ranks() -> None:
    """From now on, launches without a prefix fork their ranks from one process that imported Lightning once (the
    test suite's zygote, ``tests/zygote.py``) instead of starting programs.

    The smoke run checks the harness and every code path, and importing Lightning is most of what a short run's
    processes do on a small machine (the README's testing section has the figure): forked ranks skip it. Measured
    runs never do this: a user's program pays its imports.
    """
    global _FORKS
    if _FORKS is None:
        from tests.forkserver import ForkServer

        _FORKS = ForkServer()
        atexit.register(_FORKS.close)


def run_ranks(
    command: Sequence[str], processes: int, env: dict[str, str], timeout: float = 1800, prefix: Sequence[str] = ()
) -> tuple[int, str]:
    """Runs every rank of one launch at once, as torchrun does, and returns (status, the ranks' stderr).

    Lightning's own launcher starts the other ranks only once rank 0 has imported everything and reached ``fit``,
    so a launch pays the import of Lightning twice in a row; started together (with the environment Lightning's
    launcher gives its children) the ranks import side by side. The first rank to fail ends the others.
    With one process the command simply runs. With a ``prefix`` (a network namespace), all ranks must share what
    it sets up, so ``python -m benchmarks.ranks`` runs inside it and starts them there.
    """
    if prefix:  # the runner inside applies its own time limit (the default), where it can end the ranks it started
        done = subprocess.run(ranks_command(command, processes, prefix), env=env, capture_output=True, text=True,
                              cwd=ROOT)
        return done.returncode, done.stderr
    if _FORKS is not None and command[0] == sys.executable:  # `python script ...` or `python -m module ...`
        if command[1] == "-m":
            return _FORKS.run(None, list(command[3:]), processes, env, ROOT, timeout, module=command[2])
        return _FORKS.run(Path(command[1]), list(command[2:]), processes, env, ROOT, timeout)
    env = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "NODE_RANK": "0",
           "WORLD_SIZE": str(processes)}
    with tempfile.TemporaryDirectory(prefix="fedhog-ranks-") as tmp:
        logs = [Path(tmp) / f"rank{rank}.err" for rank in range(processes)]
        running = []
        for rank, log in enumerate(logs):
            rank_env = {**env, "LOCAL_RANK": str(rank)} if processes > 1 else env
            with log.open("w") as err:
                running.append(subprocess.Popen(command, env=rank_env, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT))
        deadline = time.monotonic() + timeout
        status = 0
        while any(process.poll() is None for process in running):
            failed = [process.returncode for process in running if process.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                status = failed[0] if failed else 124
                for process in running:
                    if process.poll() is None:
                        process.kill()
                break
            time.sleep(0.05)
        for process in running:
            process.wait()
        status = status or next((process.returncode for process in running if process.returncode != 0), 0)
        return status, "\n".join(log.read_text()[-4000:] for log in logs)


def ranks_command(command: Sequence[str], processes: int, prefix: Sequence[str] = ()) -> list[str]:
    """The command line :func:`run_ranks` runs: ``command`` itself, or the namespace's runner of all its ranks."""
    if not prefix:
        return list(command)
    return [*prefix, sys.executable, "-m", "benchmarks.ranks", str(processes), *command]


def repeat_seed(out: Path) -> int:
    """The seed of the repeat whose run folder is ``out`` (its name ends in ``-<repeat>``), 0 without one."""
    tail = out.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def thin_link_prefix(rate: str) -> list[str] | None:
    """A command prefix that runs a program in a private network namespace whose loopback is rate-limited.

    ``tc ... tbf`` on the namespace's ``lo`` caps every byte the ranks exchange (TCPStore and gloo alike);
    the MTU is lowered so that one packet fits the token bucket. Returns None (and the caller skips, saying
    why) without root or without ``unshare``/``ip``/``tc``.
    """
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("unshare", "ip", "tc")):
        return None
    setup = (
        f"ip link set lo up && ip link set lo mtu 9000 && tc qdisc add dev lo root tbf rate {rate} burst 256kb"
        " latency 50ms && exec \"$@\""
    )
    return ["unshare", "--net", "sh", "-c", setup, "thin-link"]


def thin_link_unavailable() -> str:
    return (
        "skipped: the thin-link benchmark needs root and `unshare`, `ip`, `tc` (iproute2) to rate-limit the"
        f" loopback of a private network namespace (euid={os.geteuid()})"
    )


def launch(
    args: Sequence[str], out: Path, processes: int, prefix: Sequence[str] = (), program: Path = THROUGHPUT
) -> dict[str, Any]:
    """Runs one ``throughput.py`` launch (all its ranks) and returns its figures.

    Args:
        args: the program's arguments (without ``--out``).
        out: a fresh directory for the ranks' JSON files.
        processes: how many processes the launch makes (for the thread split).
        prefix: a command prefix, e.g. the thin-link namespace.
        program: the script to run.
    """
    command = [sys.executable, str(program), "--out", str(out), *args]
    began = time.perf_counter()
    status, errors = run_ranks(command, processes, threads_env(processes), prefix=prefix)
    command = ranks_command(command, processes, prefix)  # as reported: what ran, in which namespace
    if status != 0:
        raise RuntimeError(f"benchmark launch failed ({status}): {shlex.join(command)}\n{errors[-4000:]}")
    ranks = [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
    return {
        "command": shlex.join(command),
        "samples_per_s": aggregate(ranks),
        "samples_per_s_to_end": aggregate_to_end(ranks),
        "step_s": step_seconds(ranks),
        "steps_per_rank": [len(rank["times"]) for rank in ranks],
        "process_wall_s": time.perf_counter() - began,
        "fedhog": logged_figures(out / "logs"),
        "paired_costs": paired_costs(ranks),
    }


def launch_independent(args: Sequence[str], out: Path, copies: int) -> dict[str, Any]:
    """The physical limit: ``copies`` single-process runs at the same time, no communication; rates summed."""
    commands = [
        [sys.executable, str(THROUGHPUT), "--out", str(out / f"copy{i}"), "--strategy", "single", *args]
        for i in range(copies)
    ]
    began = time.perf_counter()
    running = [
        subprocess.Popen(c, env=threads_env(copies), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
        for c in commands
    ]
    for process, command in zip(running, commands, strict=True):
        _, err = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"benchmark launch failed: {shlex.join(command)}\n{err.decode()[-4000:]}")
    copies_ranks = [[json.loads((out / f"copy{i}" / "rank0.json").read_text())] for i in range(copies)]
    return {
        "command": " & ".join(shlex.join(c) for c in commands),
        "samples_per_s": sum(aggregate(ranks) for ranks in copies_ranks),
        "samples_per_s_to_end": _sum_or_none([aggregate_to_end(ranks) for ranks in copies_ranks]),
        "step_s": statistics.median(step_seconds(ranks) for ranks in copies_ranks),
        "steps_per_rank": [len(ranks[0]["times"]) for ranks in copies_ranks],
        "process_wall_s": time.perf_counter() - began,
        "fedhog": {},
    }


def _sum_or_none(values: list[float | None]) -> float | None:
    return None if any(value is None for value in values) else sum(values)  # type: ignore[misc]


def logged_figures(logs: Path) -> dict[str, float]:
    """fedhog's own averaging figures from a throughput run's CSVLogger file, each the mean over its consensus points.

    (A time-to-accuracy run derives more from the same log: :func:`benchmarks.accuracy.averaging_figures`.)
    """
    files = sorted(logs.glob("**/metrics.csv"))
    if not files:
        return {}
    with files[0].open() as handle:
        rows = list(csv.DictReader(handle))
    figures: dict[str, float] = {}
    keys = ("rounds_per_s", "bytes_per_s", "seconds_per_round", "samples_per_s", "parked_s", "period", "averaging_cost")
    for key in keys:
        values = [float(row[f"fedhog/{key}"]) for row in rows if row.get(f"fedhog/{key}")]
        if values:
            figures[key] = statistics.mean(values)
    return figures


def interleave(
    methods: dict[str, Callable[[Path], dict[str, Any]]], repeats: int, workdir: Path, log: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """Runs every method ``repeats`` times, interleaved, and summarizes each by the median over repeats."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in methods}
    for repeat in range(repeats):
        for name, method in methods.items():
            result = method(workdir / f"{name}-{repeat}")
            log(f"  {name} #{repeat + 1}: {result['samples_per_s']:,.0f} samples/s")
            runs[name].append(result)
    return {name: summarize_repeats(results) for name, results in runs.items()}


def summarize_repeats(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Median figures of one method's repeats, keeping every repeat's value and the exact command."""
    summary: dict[str, Any] = {
        "samples_per_s": statistics.median(r["samples_per_s"] for r in results),
        "all_samples_per_s": [r["samples_per_s"] for r in results],
        "samples_per_s_to_end": _median_or_none([r.get("samples_per_s_to_end") for r in results]),
        "step_s": statistics.median(r["step_s"] for r in results),
        "steps_per_rank": [r["steps_per_rank"] for r in results],
        "process_wall_s": statistics.median(r["process_wall_s"] for r in results),
        "command": results[0]["command"],
    }
    repeats = [statistics.mean(r["paired_costs"]) for r in results if r.get("paired_costs")]
    if len(repeats) > 1:  # pairs of one run share its ranks and moments: the standard error is over the repeats
        summary["paired_cost"] = {
            "mean": statistics.mean(repeats), "se": statistics.stdev(repeats) / len(repeats) ** 0.5,
            "repeats": repeats, "pairs": sum(len(r.get("paired_costs", [])) for r in results),
            "all": [cost for r in results for cost in r.get("paired_costs", [])],
        }
    if figures := median_figures(results):
        summary["fedhog"] = figures
    return summary


def median_figures(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """fedhog's figures of several runs, each the median over the runs that have it ("auto" reports its cost only
    once it has measured a cycle, which a short run may not reach)."""
    keys = set().union(*(r.get("fedhog", {}) for r in runs))
    return {key: statistics.median(r["fedhog"][key] for r in runs if key in r["fedhog"]) for key in sorted(keys)}


def _median_or_none(values: list[float | None]) -> float | None:
    return None if any(value is None for value in values) else statistics.median(values)  # type: ignore[type-var]


def write(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
