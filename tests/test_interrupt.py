"""Ctrl-C (SIGINT) to the launching process only: every worker stops at once, and one line says so.

The watch itself runs in this process (a SIGINT to pytest, caught as the ``KeyboardInterrupt`` it raises); the
end-to-end runs use Lightning's own launcher in a process forked from the session's zygote, whose workers are forks
of it rather than new interpreters (``--fork-workers`` in tests/apps/train.py): a run costs about a second.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from lightning_fedhog.interrupt import InterruptWatch
from tests.conftest import APP, forkserver

BOUND = 8.0
"""Seconds from the SIGINT to the end of the last process: ~1-2 s with the watch (most of it the interpreter's
exit, as with DDP); the launcher's failure path it replaces waited 10 s before it killed the workers."""


class _Recorder:
    def __init__(self) -> None:
        self.stops: list[bool] = []
        self.exits = 0
        self.stopped = threading.Event()
        self.exited = threading.Event()

    def stop_workers(self, startup: bool) -> None:
        self.stops.append(startup)
        self.stopped.set()

    def exit(self) -> None:
        self.exits += 1
        self.exited.set()


def _watch(recorder: _Recorder, *, startup: bool = False, in_fit: bool = False, grace: float = 5.0) -> InterruptWatch:
    watch = InterruptWatch.install(
        stop_workers=recorder.stop_workers, in_startup=lambda: startup, in_fit=lambda: in_fit, grace=grace,
        exit=recorder.exit,
    )
    assert watch is not None
    return watch


def _interrupt_self() -> None:
    with pytest.raises(KeyboardInterrupt):  # Python's own handler still runs in the main thread
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)


def test_a_sigint_stops_the_workers_from_the_watch_thread() -> None:
    recorder = _Recorder()
    watch = _watch(recorder)
    try:
        _interrupt_self()
        assert recorder.stopped.wait(5)
        assert recorder.stops == [False] and recorder.exits == 0  # the main thread is out of `fit`: no exit
    finally:
        watch.close()
    assert not watch.is_alive()
    assert signal.set_wakeup_fd(-1) == -1  # uninstalled


def test_during_start_up_the_process_ends_at_once() -> None:
    recorder = _Recorder()
    watch = _watch(recorder, startup=True)
    try:
        _interrupt_self()
        assert recorder.exited.wait(5)
        assert recorder.stops == [True]
    finally:
        watch.close()


def test_a_main_thread_still_in_fit_after_the_grace_ends_the_process(capfd: pytest.CaptureFixture[str]) -> None:
    recorder = _Recorder()
    watch = _watch(recorder, in_fit=True, grace=0.2)
    try:
        _interrupt_self()
        assert recorder.exited.wait(5)
        assert recorder.stops == [False]
    finally:
        watch.close()
    assert "still blocked (in native code)" in capfd.readouterr().err


def test_a_sigint_that_raises_no_keyboard_interrupt_is_left_alone() -> None:
    recorder = _Recorder()
    watch = _watch(recorder)
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.3)
        assert received == [signal.SIGINT] and recorder.stops == []
    finally:
        signal.signal(signal.SIGINT, previous)
        watch.close()


def test_nothing_is_installed_where_the_wakeup_fd_is_taken() -> None:
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd)
    try:
        assert InterruptWatch.install(
            stop_workers=lambda startup: None, in_startup=lambda: False, in_fit=lambda: False
        ) is None
        assert signal.set_wakeup_fd(write_fd) == write_fd  # left as it was
    finally:
        signal.set_wakeup_fd(-1)
        os.close(read_fd)
        os.close(write_fd)


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def _interrupted_run(out: Path, *args: str) -> tuple[int, str, float, list[int]]:
    """A plain start of the app (2 devices x 2 workers) that rank 0 interrupts; returns its status, its output, the
    seconds from the SIGINT to the end of the launching process, and every process's pid (the launcher's first)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("PL_GLOBAL_SEED", None)
    app_args = ["--out", str(out), "--devices", "2", "--workers", "2", "--epochs", "100", "--no-checkpoint",
                "--no-val", "--timeout", "30", "--fork-workers", *args]
    status, output = forkserver().run(APP, app_args, 1, env, Path.cwd(), 120)
    ended = time.time()
    sent = re.search(r"SIGINT rank 0 at ([\d.]+)", output)
    assert sent, output[-3000:]
    pids = [int(line) for line in (out / "pids.txt").read_text().split()]
    return status, output, ended - float(sent.group(1)), pids


def _assert_quiet_and_fast(output: str, seconds: float, pids: list[int], line: str) -> None:
    assert output.count("fedhog: interrupted (SIGINT)") == 1, output[-3000:]
    assert line in output and "3 worker processes (pid " in output, output[-3000:]
    for noise in ("DistNetworkError", "frame #", "Traceback", "was killed by", "exited with status"):
        assert noise not in output, output[-3000:]
    assert seconds < BOUND, seconds
    assert len(pids) == 4
    left = [pid for pid in pids if not _gone(pid)]
    assert not left, f"processes left running: {left}"


@pytest.mark.slow
def test_sigint_to_the_launching_process_alone_stops_every_worker_at_once(tmp_path: Path) -> None:
    status, output, seconds, pids = _interrupted_run(tmp_path, "--sigint-step", "4")
    print(f"\nSIGINT mid-training: last process ended {seconds:.1f} s after it")
    assert status == 1, output[-3000:]  # Lightning's exit after a KeyboardInterrupt
    _assert_quiet_and_fast(output, seconds, pids, "now; nothing is saved")
    assert "Detected KeyboardInterrupt, attempting graceful shutdown" in output  # Lightning's shutdown still runs


@pytest.mark.slow
def test_sigint_while_the_workers_join_ends_the_run_at_once(tmp_path: Path) -> None:
    # the workers take 4 s to start (as imports would), so the launching process waits for them in the default
    # group's rendezvous, a native wait Python's handler cannot interrupt: it used to raise KeyboardInterrupt only
    # once every worker had arrived, and they then printed C++ traces from the closed store
    status, output, seconds, pids = _interrupted_run(tmp_path, "--sigint-in-join", "--worker-delay", "4")
    print(f"\nSIGINT in start-up: last process ended {seconds:.1f} s after it")
    assert status == 130, output[-3000:]
    _assert_quiet_and_fast(output, seconds, pids, "during start-up: stopping the")
