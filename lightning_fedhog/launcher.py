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
        self, cluster_environment: ClusterEnvironment, num_processes: int, num_nodes: int, config: FedHogConfig
    ) -> None:
        super().__init__(cluster_environment, num_processes, num_nodes)
        self._config = config

    @override
    def launch(self, function: Callable, *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any) -> Any:
        if trainer is not None:
            check_before_launch(trainer, self._config)
        # Lightning's launcher, with fedhog's observer of the workers instead of Lightning's (see `_Observer`)
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            tie = threading.current_thread() is threading.main_thread()  # the workers die with this thread
            if tie:  # only the children's copy of the environment carries it: later processes must not
                os.environ[LAUNCHER_PID] = str(os.getpid())
                atexit.register(self._wait_for_children)
            try:
                self._call_children_scripts()
            finally:
                os.environ.pop(LAUNCHER_PID, None)
            if self.procs:  # one process in all: nobody to watch
                _Observer(self.procs, self._config.timeout.total_seconds()).start()
        set_num_threads_if_needed(num_processes=self.num_processes)
        try:
            return function(*args, **kwargs)
        except BaseException as error:
            timeout = self._config.timeout.total_seconds()
            # a stop on SIGTERM saves a checkpoint: the workers get all of `timeout` for it. After a failure nothing
            # is saved; a worker still blocked in a collective with this process (which keeps its connections
            # open while it waits here) would only give up after `timeout`, 30 minutes by default
            self._end_children(timeout if isinstance(error, SIGTERMException) else min(timeout, _FAILURE_GRACE))
            raise

    def _wait_for_children(self) -> None:
        """At this process's normal exit: the workers die with it (:func:`exit_with_launcher`), so it waits for them
        to finish first (at most `timeout`, then they are ended)."""
        self._end_children(self._config.timeout.total_seconds())

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
                proc.kill()
                proc.wait()


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

    def __init__(self, procs: list[subprocess.Popen], timeout: float) -> None:
        super().__init__(daemon=True, name="fedhog-observer")
        self._procs = procs
        self._timeout = timeout

    @override
    def run(self) -> None:
        while True:
            time.sleep(0.5)
            codes = [proc.poll() for proc in self._procs]
            if all(code == 0 for code in codes):
                return
            failed = [(rank, code) for rank, code in enumerate(codes, start=1) if code]
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
