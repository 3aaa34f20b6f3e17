"""Lightning's subprocess-script launcher, told to start ``devices * K`` processes and to check the model first.

Each of the K workers of a device is a full Lightning rank, so the stock launcher fits once it is given the
right process count: it re-runs the user's script per local rank, and under torchrun or SLURM it only checks
that the external launcher started ``devices * K`` tasks per node. What it cannot know is the model: we look at
it here, in the launching process, so a model fedhog cannot share fails before anything is spawned.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.callbacks import ModelCheckpoint, Timer
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.nn import Module
from typing_extensions import override

from lightning_fedhog.config import FedHogConfig
from lightning_fedhog.shared_buffer import FlatLayout, flat_layout
from lightning_fedhog.work_sharing import check_dynamic_compatible

if TYPE_CHECKING:
    import lightning.pytorch as pl


_FAILURE_GRACE = 10.0
"""Seconds the workers get to stop on their own after a failure in the launching process, before they are killed."""


class FedHogLauncher(_SubprocessScriptLauncher):
    """Starts ``num_processes = devices * workers_per_device`` ranks per node after validating the model."""

    def __init__(
        self, cluster_environment: ClusterEnvironment, num_processes: int, num_nodes: int, config: FedHogConfig
    ) -> None:
        super().__init__(cluster_environment, num_processes, num_nodes)
        self._config = config

    @override
    def launch(self, function: Callable, *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any) -> Any:
        if trainer is not None:
            self._check(trainer)
        # Lightning's launcher, with fedhog's observer of the workers instead of Lightning's (see `_Observer`)
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            _Observer(self.procs, self._config.timeout.total_seconds()).start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        try:
            return function(*args, **kwargs)
        except BaseException as error:
            timeout = self._config.timeout.total_seconds()
            # a stop on SIGTERM saves a checkpoint: the workers get all of `timeout` for it. After a failure nothing
            # is saved; a worker still blocked in a collective with this process (which keeps its connections
            # open while it waits here) would only give up after `timeout`, 30 minutes by default
            self._end_children(timeout if isinstance(error, SIGTERMException) else min(timeout, _FAILURE_GRACE))
            raise

    def _check(self, trainer: pl.Trainer) -> None:
        """Every check that can run before a worker exists: the model, then Trainer settings; warnings last."""
        module = trainer.lightning_module
        if module is not None and trainer.state.fn == TrainerFn.FITTING:
            checked_layout(self._config, module, built=not is_overridden("configure_model", module))
        check_no_time_based_validation(trainer)
        if self._config.work_sharing == "dynamic":
            step_based = [
                f"{type(callback).__name__}(every_n_train_steps={callback._every_n_train_steps})"
                if callback._every_n_train_steps
                else f"{type(callback).__name__}(train_time_interval={callback._train_time_interval})"
                for callback in trainer.checkpoint_callbacks
                if isinstance(callback, ModelCheckpoint)
                and (callback._every_n_train_steps or callback._train_time_interval is not None)
            ]
            check_dynamic_compatible(trainer.val_check_interval, step_based, max_time=_has_timer(trainer))
        for message in lockstep_hazards(trainer):
            rank_zero_warn(message)

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


def checked_layout(config: FedHogConfig, module: Module, *, built: bool = True) -> FlatLayout:
    """The module's flat layout, after every model-dependent check of ``config`` (dtypes, blocks, tensors).

    Args:
        built: the module has its layers. False in the launcher when the module builds them in
            ``configure_model`` (in each worker, after the launch): then a module with no parameters yet is fine.
    """
    parameters = list(module.parameters())
    integral = [name for name, parameter in module.named_parameters() if not parameter.is_floating_point()]
    if integral:
        raise ValueError(
            f"fedhog shares and averages floating parameters only, but {type(module).__name__} has non-floating"
            f" parameter(s) {integral}: each worker would keep its own copy and the devices would silently disagree."
            " HINT: make them floating, or register them with `register_buffer` (state each worker keeps as is)."
        )
    if built and not parameters:
        raise ValueError(
            f"fedhog trains a module's parameters, but {type(module).__name__} has none. HINT: create the layers in"
            " `__init__` or `configure_model`, or run a module without parameters with `Trainer(strategy='auto')`."
        )
    layout = flat_layout(module)
    config.validate_model(layout.num_elements, len(parameters))
    return layout


def lockstep_hazards(trainer: pl.Trainer) -> list[str]:
    """Trainer settings that put all workers back in lock-step every step (DESIGN.md section 6), with the cost and
    the alternative. fedhog's benefit comes from workers never waiting for each other between consensus points.
    """
    messages = []
    if _has_timer(trainer):
        messages.append(
            "fedhog: `Trainer(max_time=...)` (the `Timer` callback) broadcasts the elapsed time from rank 0 after every"
            " step, so every worker waits for the slowest each step. HINT: bound the run with `max_epochs` or"
            " `max_steps` instead."
        )
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback._train_time_interval is not None:
            messages.append(
                "fedhog: `ModelCheckpoint(train_time_interval=...)` decides with a broadcast after every step, so"
                " every worker waits for the slowest each step. HINT: use `every_n_epochs` (or `every_n_train_steps`"
                " with static work sharing)."
            )
    return messages


def _has_timer(trainer: pl.Trainer) -> bool:
    """Whether the Trainer has a ``Timer`` callback (``max_time=...``), which broadcasts after every step."""
    return any(isinstance(callback, Timer) for callback in trainer.callbacks)


def check_no_time_based_validation(trainer: pl.Trainer) -> None:
    """Refuses a time-based ``val_check_interval``: each worker decides it by its own clock, so workers would
    disagree on when to validate and wait for each other at the consensus point until ``timeout``.
    """
    interval = getattr(trainer, "_val_check_time_interval", None)
    if interval is not None:
        raise ValueError(
            f"fedhog: a time-based `val_check_interval` ({interval} s) is decided by each worker's own clock, so"
            " workers would disagree on when to validate and wait for each other at the consensus point until"
            " `timeout`. HINT: use a float fraction of the epoch or an int number of batches."
        )
