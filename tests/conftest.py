"""Test hygiene: every test leaves no shared-memory file, environment change or stray thread behind.

The benchmarks' smoke run (``tests/test_benchmarks.py``) starts when the suite starts, at the lowest CPU priority,
and its tests run last: it has no timing to disturb, and it uses the cores the other tests leave idle (a serial
suite spends much of its time waiting on processes and timeouts).

Runs of several ranks are forked from the session's zygote (:func:`forkserver`, ``tests/zygote.py``) unless the way
processes start is what a test is about.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_fedhog.engine import AveragingEngine
from lightning_fedhog.shared_buffer import SHM_DIR, SHM_PREFIX
from tests.forkserver import ForkServer

APP = Path(__file__).parent / "apps" / "train.py"
TIMEOUT = 4.0  # `timeout` in seconds of the runs that fail on purpose: short, so that a stuck peer is found quickly
MARGIN = 6.0  # start of the interpreter's teardown, the launcher's reaping, a loaded 2-core machine


def shm_files() -> set[str]:
    return {name for name in os.listdir(SHM_DIR) if name.startswith(SHM_PREFIX)}


def _held_by_another_live_process(name: str) -> bool:
    """A buffer file (``fedhog-<pid of its creator>-<id>``) whose creator still runs and is not this process: one
    of the background smoke run's, not a leak (yet)."""
    try:
        pid = int(name[len(SHM_PREFIX) :].split("-")[0])
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (ValueError, OSError, IndexError):
        return False
    return pid != os.getpid() and state != "Z"


@pytest.fixture(autouse=True)
def _hygiene() -> Iterator[None]:
    env = dict(os.environ)
    shm_before = shm_files()
    threads_before = set(threading.enumerate())
    yield
    os.environ.clear()
    os.environ.update(env)
    if dist.is_initialized():
        dist.destroy_process_group()
    # under pytest-xdist other tests' runs share /dev/shm at the same time: their files cannot be told apart
    leaked = set() if os.environ.get("PYTEST_XDIST_WORKER") else shm_files() - shm_before
    leaked = {name for name in leaked if not _held_by_another_live_process(name)}
    assert not leaked, f"shared-memory files left behind: {leaked}"
    stray = [t for t in set(threading.enumerate()) - threads_before if t.is_alive() and "fedhog" in t.name]
    assert not stray, f"threads left running: {stray}"


SMOKE_TESTS = ("test_smoke_mode_runs_every_benchmark_and_its_methods",
               "test_report_draws_every_plot_and_writes_the_readme_section")
_SMOKE: tuple[subprocess.Popen, Path] | None = None


@pytest.hookimpl(trylast=True)  # after `-m`/`-k` deselection: start the run only when its tests will run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    global _SMOKE
    smoke = [item for item in items if item.originalname in SMOKE_TESTS]
    if not smoke or _SMOKE is not None:
        return
    items[:] = [item for item in items if item not in smoke] + smoke
    out = Path(tempfile.mkdtemp(prefix="fedhog-smoke-"))
    log = (out / "smoke.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks", "--smoke", "--output", str(out)], cwd=Path(__file__).parents[1],
        env={**os.environ, "PYTHONWARNINGS": "ignore", "FEDHOG_ZYGOTE_LOGS": str(out)}, stdout=log,
        stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(19), start_new_session=True,
    )
    _SMOKE = (process, out)


def smoke_results(timeout: float) -> Path:
    """The folder of the background smoke run's results, once it has ended (it must have succeeded)."""
    assert _SMOKE is not None, "the smoke run starts at collection when its tests are selected"
    process, out = _SMOKE
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()
        raise
    output = (out / "smoke.log").read_text(errors="replace")
    assert process.returncode == 0, output[-6000:]
    return out


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _SMOKE is None:
        return
    if _SMOKE[0].poll() is None:  # the session was cut short: end the run and its ranks
        os.killpg(_SMOKE[0].pid, 9)
        _SMOKE[0].wait()
    shutil.rmtree(_SMOKE[1], ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def thread_groups(world_size: int, timeout: float = 20.0) -> tuple[dist.TCPStore, list[dist.ProcessGroup]]:
    """One gloo group per simulated rank on one ``TCPStore(port=0)``; ranks are threads of this process."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    groups: list[dist.ProcessGroup | None] = [None] * world_size

    def connect(rank: int) -> None:
        client = dist.TCPStore("127.0.0.1", store.port, is_master=False)
        prefixed = dist.PrefixStore("pg", client)
        groups[rank] = dist.ProcessGroupGloo(prefixed, rank, world_size, timedelta(seconds=timeout))

    threads = [threading.Thread(target=connect, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return store, groups  # type: ignore[return-value]


def run_in_threads(fn, world_size: int, timeout: float = 60.0) -> list:
    """Runs ``fn(rank)`` in one thread per rank and returns the results, re-raising the first error."""
    results: list = [None] * world_size
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=target, args=(rank,), name=f"rank{rank}") for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), f"{thread.name} hung"
    if errors:
        raise errors[0]
    return results


_FORKSERVER: ForkServer | None = None
_WORKERS_OF_PRESET = {"fedhog": 2, "fedhog_k4": 4, "fedhog_lpp": 4, "fedhog_gossip": 2, "fedhog_single_worker": 1,
                      "ddp": 1}
"""Processes per device the tests start for a registered name. "fedhog" and "fedhog_gossip" leave
`workers_per_device="auto"`, which, under a launcher that starts the processes itself (these forked ranks, as
torchrun's), takes that launcher's processes per device: 2 here."""


@pytest.fixture(autouse=True, scope="session")
def _close_forkserver() -> Iterator[None]:
    yield
    if _FORKSERVER is not None:
        _FORKSERVER.close()


def forkserver() -> ForkServer:
    """The session's zygote (``tests/zygote.py``), started at first use."""
    global _FORKSERVER
    _FORKSERVER = _FORKSERVER or ForkServer()
    return _FORKSERVER


def processes_of(app_args: tuple[str, ...]) -> int:
    """How many ranks a run of the app with these arguments has (one node): devices x workers per device."""
    def value(flag: str, default: str) -> str:
        return app_args[app_args.index(flag) + 1] if flag in app_args else default

    devices = len(value("--gpu-ids", "").split(",")) if "--gpu-ids" in app_args else int(value("--devices", "2"))
    strategy = value("--strategy", "object")
    workers = int(value("--workers", "1")) if strategy == "object" else _WORKERS_OF_PRESET[strategy]
    return devices * workers * int(value("--num-nodes", "1"))


def run_app(out: Path, *app_args: str, launcher: list[str] | None = None, env: dict | None = None,
            timeout: float = 240.0) -> list[dict]:
    """Runs tests/apps/train.py and returns every rank's report, ordered by rank.

    Without ``launcher`` the ranks are forked from the session's zygote (``tests/zygote.py``), which imported
    Lightning once: a run then costs its training, not each process's import of Lightning. With a ``launcher``
    (e.g. ``[sys.executable]`` for Lightning's own launcher, or torchrun) it is a real program start.
    """
    out.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    full_env.pop("PL_GLOBAL_SEED", None)
    if launcher is None:
        returncode, output = forkserver().run(
            APP, ["--out", str(out), *app_args], processes_of(app_args), full_env, Path.cwd(), timeout
        )
        if returncode != 0:
            raise AssertionError(f"{shlex.join(app_args)} failed ({returncode}):\n{output[-8000:]}")
    else:
        command = [*launcher, str(APP), "--out", str(out), *app_args]
        proc = subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"{command} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr}")
    reports = [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
    return sorted(reports, key=lambda report: report["rank"])


def load_rank(out: Path, rank: int) -> dict:
    return torch.load(out / f"rank{rank}.pt", weights_only=False)


def assert_one_model(out: Path, world_size: int) -> None:
    """Every rank of the app's run ended with the same weights (the consensus model)."""
    states = [load_rank(out, rank)["state_dict"] for rank in range(world_size)]
    for key, value in states[0].items():
        assert all(torch.equal(state[key], value) for state in states), f"{key} differs between ranks"


def trained_in_epoch(reports: list[dict], epoch: int | str) -> list[int]:
    """The sample indices every rank of the app's run trained in ``epoch``, together."""
    return [index for report in reports for index in report["seen"].get(str(epoch), [])]


@dataclass
class Outcome:
    """How a run of the app that may fail ended."""

    returncode: int
    output: str
    event: float | None  # when the fault was injected (time.time() printed by the app)
    ended: float  # when the last process of the run had exited

    @property
    def seconds_after_event(self) -> float:
        assert self.event is not None, "the fault was never injected"
        return self.ended - self.event


def run_outcome(out: Path, *args: str, timeout: float = TIMEOUT, forked: bool = False) -> Outcome:
    """Runs the app in its own session (so a process-group SIGTERM stays inside it) and waits for every process.

    Unlike :func:`run_app` a failure is an outcome to look at, not an error: stdout and stderr come back together.
    ``forked``: the ranks are forks of the session's zygote (see :func:`run_app`), for runs whose outcome does not
    depend on how the processes were started.
    """
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("PL_GLOBAL_SEED", None)
    app_args = ["--out", str(out), "--timeout", str(timeout), *args]
    if forked:
        returncode, output = forkserver().run(APP, app_args, processes_of(args), env, Path.cwd(), 120)
    else:
        proc = subprocess.Popen(
            [sys.executable, str(APP), *app_args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )
        output, _ = proc.communicate(timeout=120)  # the pipe closes when the last child holding it has exited
        returncode = proc.returncode
    ended = time.time()
    event = re.search(r"(?:KILLED|SIGTERM|SLEEP|NAN) rank \d+ at ([\d.]+)", output)
    if event:  # shown with `pytest -s`: the figures of docs/troubleshooting.md
        print(f"\n{out.name}: last process ended {ended - float(event.group(1)):.1f} s after the fault")
    return Outcome(returncode, output, float(event.group(1)) if event else None, ended)


def fit_refused(model, message: str, strategy=None, **trainer_kwargs) -> None:
    """``fit`` fails with ``message`` in the launching process, before any worker process is spawned."""
    import lightning as L

    from lightning_fedhog import FedHogStrategy

    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy or FedHogStrategy(), logger=False, max_steps=1,
        **trainer_kwargs,
    )
    with pytest.raises(ValueError, match=message):
        trainer.fit(model)
    assert trainer.strategy.launcher.procs == [], "a worker process was spawned before the error"


_engines: list[AveragingEngine] = []  # started by `engine_fleet`, stopped after each test


@pytest.fixture(autouse=True)
def _stop_engines() -> Iterator[None]:
    """A failing test must not leave engine threads behind: abandon whatever is still running."""
    yield
    while _engines:
        _engines.pop().stop()


def engine_fleet(world_size: int, numel: int, num_blocks: int, period: int, **engine_kwargs: Any) -> tuple[Any, ...]:
    """One averaging engine per simulated device leader over :func:`thread_groups`, each on a random vector and a step
    counter the test advances. Returns ``(store, vectors, steps, engines)``; the engines are stopped after the test."""
    store, groups = thread_groups(world_size)
    vectors = [torch.randn(numel, generator=torch.Generator().manual_seed(10 + rank)) for rank in range(world_size)]
    steps = [[0] for _ in range(world_size)]
    engines = [
        AveragingEngine(
            vectors[rank],
            lambda rank=rank: steps[rank][0],
            groups[rank],
            list(range(world_size)),
            num_blocks=num_blocks,
            period=period,
            timeout=timedelta(seconds=20),
            poll_interval=0.0002,
            **engine_kwargs,
        )
        for rank in range(world_size)
    ]
    _engines.extend(engines)
    return store, vectors, steps, engines
