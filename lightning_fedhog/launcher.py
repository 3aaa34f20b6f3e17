"""Lightning's subprocess-script launcher, told to start ``devices * K`` processes and to check the model first.

Each of the K workers of a device is a full Lightning rank, so the stock launcher fits once it is given the
right process count: it re-runs the user's script per local rank, and under torchrun or SLURM it only checks
that the external launcher started ``devices * K`` tasks per node. What it cannot know is the model: we look at
it here, in the launching process, so a model fedhog cannot share fails before anything is spawned.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import glob
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lightning_fedhog.checks import check_before_launch
from lightning_fedhog.config import FedHogConfig
from lightning_fedhog.internals import ScriptLauncher, set_num_threads_if_needed
from lightning_fedhog.interrupt import InterruptWatch
from lightning_fedhog.rendezvous import joining_default_group
from lightning_fedhog.shared_buffer import shm_path_prefix

if TYPE_CHECKING:
    import lightning.pytorch as pl


LAUNCHER_PID = "FEDHOG_LAUNCHER_PID"
"""Environment variable that tells the workers this launcher started which process started them."""

_PR_SET_PDEATHSIG = 1  # prctl(2)

_FAILURE_GRACE = 10.0
"""Seconds the workers get to stop on their own after a failure in the launching process, before they are killed."""


class FedHogLauncher(ScriptLauncher):
    """Starts ``num_processes = devices * workers_per_device`` ranks per node after validating the model."""

    def __init__(
        self,
        cluster_environment: ClusterEnvironment,
        num_processes: int,
        num_nodes: int,
        config: FedHogConfig,
        after_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        super().__init__(cluster_environment, num_processes, num_nodes)
        self._config = config
        self._after_failure = after_failure  # the strategy's part after a failure (a rescue), before workers end
        self._interrupt: InterruptWatch | None = None
        self._in_fit = threading.Event()  # the main thread is inside `launch` (a Ctrl-C ends it there)
        self._stopping = threading.Event()  # this process ends its workers on purpose: the observer keeps quiet
        self._stop_lock = threading.Lock()

    @override
    def launch(self, function: Callable, *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any) -> Any:
        if trainer is not None:
            check_before_launch(trainer, self._config)
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        self._in_fit.set()
        try:
            if not self.cluster_environment.creates_processes_externally:
                self._start_workers()
            set_num_threads_if_needed(num_processes=self.num_processes)
            try:
                return function(*args, **kwargs)
            except KeyboardInterrupt:  # Lightning's shutdown follows; the workers are ended first (no watch: here)
                self._stop_on_interrupt(startup=False)
                raise
            except BaseException as error:
                failed_at = time.monotonic()
                if self._after_failure is not None:  # Lightning's `on_exception` comes only after this returns
                    self._after_failure(error)
                timeout = self._config.timeout.total_seconds()
                # a stop on SIGTERM saves a checkpoint: the workers get all of `timeout` for it. After a failure
                # only a rescue is saved (above); a worker still blocked in a collective with this process (which
                # keeps its connections open while it waits here) would only give up after `timeout`, 30 minutes by
                # default. The grace counts from the failure: the workers stopped on their own during the rescue too
                grace = timeout if isinstance(error, SIGTERMException) else min(timeout, _FAILURE_GRACE)
                self._end_children(max(grace - (time.monotonic() - failed_at), 0.0))
                raise
        finally:
            self._in_fit.clear()

    def _start_workers(self) -> None:
        """Lightning's start of the workers, with fedhog's observer of them instead of Lightning's (`_Observer`)."""
        tie = threading.current_thread() is threading.main_thread()  # the workers die with this thread
        if tie:  # only the children's copy of the environment carries it: later processes must not
            os.environ[LAUNCHER_PID] = str(os.getpid())
            atexit.register(self._wait_for_children)
        if tie and self.num_processes > 1:  # a Ctrl-C to this process alone ends the workers at once
            self._interrupt = InterruptWatch.install(
                stop_workers=self._stop_on_interrupt, in_startup=joining_default_group, in_fit=self._in_fit.is_set
            )
        try:
            self._call_children_scripts()
        except KeyboardInterrupt:
            self._stop_on_interrupt(startup=False)
            raise
        finally:
            os.environ.pop(LAUNCHER_PID, None)
        if self.procs:  # one process in all: nobody to watch
            _Observer(self.procs, self._config.timeout.total_seconds(), self._stopping).start()

    def _stop_on_interrupt(self, startup: bool) -> None:
        """A Ctrl-C (SIGINT) reached this process: says so in one line and kills the workers it started, at once.

        Nothing is saved after an interrupt (as with DDP, whose workers Lightning kills), so there is nothing to
        wait for; a worker blocked in a collective with this process would otherwise wait for it up to `timeout`.
        Called from the :class:`~lightning_fedhog.interrupt.InterruptWatch` thread and from the main thread's
        ``KeyboardInterrupt`` (the only call where there is no watch); the first one prints.
        """
        with self._stop_lock:  # held while killing: the main thread's shutdown (it closes the store) waits for it
            first = not self._stopping.is_set()
            self._stopping.set()
            running = [proc for proc in self.procs if proc.poll() is None]  # a later call: any started since
            if first and running:
                pids = ", ".join(str(proc.pid) for proc in running)
                workers = f"{len(running)} worker process{'es' if len(running) > 1 else ''} (pid {pids})"
                if startup:
                    line = f"fedhog: interrupted (SIGINT) during start-up: stopping the {workers} and exiting."
                else:
                    line = (
                        f"fedhog: interrupted (SIGINT): stopping the {workers} now; nothing is saved (SIGTERM would"
                        " stop at the next consensus point with a checkpoint)."
                    )
                print(line, file=sys.stderr, flush=True)
            _kill(running)

    def _wait_for_children(self) -> None:
        """At this process's normal exit: the workers die with it (:func:`exit_with_launcher`), so it waits for them
        to finish first (at most `timeout`, then they are ended; at once on a Ctrl-C)."""
        try:
            self._end_children(self._config.timeout.total_seconds())
        except KeyboardInterrupt:
            self._stop_on_interrupt(startup=False)
        finally:
            if self._interrupt is not None:
                self._interrupt.close()
                self._interrupt = None

    def _end_children(self, grace: float) -> None:
        """After a failure (or SIGTERM) in this process: waits up to ``grace`` seconds for the workers it started
        to stop on their own (they notice within seconds and print why), then kills the ones still running, so
        that no worker outlives the run; a worker stuck in a long step would otherwise keep the devices busy.
        """
        deadline = time.monotonic() + grace
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
            if proc.poll() is None:
                _kill([proc])


def _kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILLs the workers and reaps them; removes the shared-memory file a device leader among them may have
    created and not yet unlinked (it does so once every worker of its device has mapped it)."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    for proc in procs:
        proc.wait()
        for path in glob.glob(shm_path_prefix(proc.pid) + "*"):
            with contextlib.suppress(OSError):
                os.unlink(path)


def exit_with_launcher() -> None:
    """In a worker this launcher started: die with the launching process, however it ends.

    The launching process is rank 0 and hosts the rendezvous store. Killed from outside (SIGKILL, as a job time limit
    or the out-of-memory killer does), it cannot end its workers, and a worker that is not in a collective at that
    moment (a long step, a data loader, a user hook) would go on alone. The kernel sends the worker SIGKILL when its
    parent dies (Linux ``PR_SET_PDEATHSIG``); a parent already gone when this runs ends the worker here. Nothing
    happens elsewhere: under torchrun and SLURM the agent or ``srun`` ends the workers of a failed run.
    """
    launcher = os.environ.pop(LAUNCHER_PID, None)  # read once: processes this worker starts are not its workers
    if launcher is None or not sys.platform.startswith("linux") or os.getppid() != int(launcher):
        if launcher is not None and not _alive(int(launcher)):  # it died before this worker got here
            os.kill(os.getpid(), signal.SIGKILL)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # best effort: the liveness checks still find a dead launcher from the training loop
    if os.getppid() != int(launcher):  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Observer(threading.Thread):
    """Watches the workers this process started; names one that dies, and ends the run if it then hangs.

    Lightning's observer SIGKILLs every process, this one included, within 5 s of a worker's non-zero exit, so the
    survivors' errors (which name the dead rank and what to do) are often cut off. fedhog's workers notice a dead
    peer themselves within seconds; this observer only reports the death and gives them `timeout` (plus a margin)
    to stop before it kills what is left.
    """

    def __init__(self, procs: list[subprocess.Popen], timeout: float, stopping: threading.Event) -> None:
        super().__init__(daemon=True, name="fedhog-observer")
        self._procs = procs
        self._timeout = timeout
        self._stopping = stopping  # the launcher ends the workers itself (a Ctrl-C): nothing to report

    @override
    def run(self) -> None:
        while True:
            time.sleep(0.5)
            codes = [proc.poll() for proc in self._procs]
            if all(code == 0 for code in codes):
                return
            failed = [(rank, code) for rank, code in enumerate(codes, start=1) if code]
            if self._stopping.is_set():  # killed by the launcher since the look above
                return
            if failed:
                break
        for rank, code in failed:
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            print(f"fedhog: rank {rank} (pid {self._procs[rank - 1].pid}) {how}.", file=sys.stderr, flush=True)
        time.sleep(self._timeout + 5.0)
        for proc in self._procs:  # still here: something hangs; end it as Lightning's observer would
            if proc.poll() is None:
                proc.kill()
        os.kill(os.getpid(), signal.SIGKILL)
