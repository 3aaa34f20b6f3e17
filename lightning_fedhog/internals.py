"""Every private Lightning and torch name the repo touches, in one place, each behind a small function.

Lightning exposes no public hook for some of what a strategy with several processes per device needs; each such
touch is a liability, because a Lightning or torch release can move the name silently. So no other file of the
repository (package, benchmarks, recipes, tests) spells a private Lightning or torch name: they call the functions
here, except for the override points in :data:`OVERRIDE_POINTS`, which a subclass must spell to override or call
(the strategy and the launcher). ``tests/test_internals.py`` holds a sub-second canary per name that fails with the
name and what uses it when an upgrade moves it, and ``tests/test_fence.py`` scans the repository for private names
used anywhere else.

The list (what, and why no public API does it):

- ``_init_dist_connection``, ``_sync_ddp_if_available``, ``_optimizer_to_device``, ``_optimizers_to_device``,
  ``_sync_module_states``, ``_update_dataloader``, ``_set_num_threads_if_needed``, ``_SubprocessScriptLauncher``,
  ``_StrategyRegistry``, ``_PATH``: the helpers Lightning's own ``DDPStrategy`` and launcher are made of; fedhog
  reuses them instead of copying them.
- ``DDPStrategy._configure_launcher``, ``_layer_sync``, ``_launcher`` and
  ``_SubprocessScriptLauncher._call_children_scripts``: the override points (:data:`OVERRIDE_POINTS`).
- ``DDPStrategy.setup`` and ``_SubprocessScriptLauncher.launch``: fedhog's versions follow their bodies; the canary
  compares a fingerprint of Lightning's source, so a change upstream is reviewed, not inherited blindly.
- ``_TrainingEpochLoop._broadcast_sigterm_tensor``: a broadcast before every training batch that would put all
  workers in lock-step; replaced per Trainer by a local check.
- ``trainer._signal_connector._original_handlers``: the user's SIGTERM handler, chained by fedhog's.
- ``trainer._checkpoint_connector.hpc_save_path``, ``ModelCheckpoint._save_last_checkpoint`` /
  ``_monitor_candidates``: where a preemption checkpoint goes, and refreshing ``last.ckpt`` with it.
- ``trainer._checkpoint_connector.dump_checkpoint``: the checkpoint ``trainer.save_checkpoint`` would write, without
  its barrier and the strategy's gather: a rescue is built by one survivor while the default group is broken; and
  the ``is_last_batch`` flag in its ``loops`` entry, cleared when other workers' batches of the epoch are left.
- ``ModelCheckpoint._every_n_train_steps`` / ``_train_time_interval``, ``trainer._val_check_time_interval``:
  settings that are read-only in public and must be checked before launch.
- ``Trainer.estimated_stepping_batches``: a read-only property computed from per-worker counts; under dynamic
  work sharing the Trainer's class is swapped for a subclass whose property gives the average worker's count
  (for ``fit`` only, undone at teardown).
- ``trainer.fit_loop.epoch_progress`` and a checkpoint's ``loops`` entry: the epoch a training loader starts in
  (what Lightning passes to ``set_epoch``), needed before Lightning calls ``set_epoch``.
- ``trainer.fit_loop._data_fetcher``: the training iterator, built again when the one Lightning built before a
  checkpoint was restored began the wrong epoch; ``trainer.fit_loop.epoch_loop._is_training_done`` (and ``done``):
  whether the training epoch ends after the current batch (where every worker meets once per epoch);
  ``epoch_loop.batch_progress.current``: whether the epoch's last batch was skipped (``on_train_batch_start``
  returned -1).
- ``DistributedSamplerWrapper.dataset._sampler``: the user's own sampler inside the one Lightning puts around it,
  whose indices dynamic work sharing hands out.
- ``LightningModule._trainer``: whether a module is attached, without the error ``module.trainer`` raises.
- ``nn.Module._forward_hooks``: the hooks a module holds (a test checks that partial backprop removes its own).
- ``trainer._logger_connector._first_loop_iter``: whether a training batch is in progress (``sync_dist`` inside a
  batch stays local); ``_progress_bar_metrics``: the averaging rate next to the user's progress-bar values.
- torch: ``distributed_c10d._get_default_store`` (the rendezvous store, for counters that are not collectives),
  ``_set_pg_timeout`` (torch < 2.12 only), ``nn.Module._parameters`` / ``_buffers`` (to swap a tensor without
  changing its identity), ``multiprocessing.reductions.reduce_tensor`` (CUDA IPC handles).
"""

from __future__ import annotations

import pickle
import signal
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning.fabric.strategies import _StrategyRegistry as StrategyRegistry
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.fabric.utilities.distributed import _init_dist_connection as init_dist_connection
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed as set_num_threads_if_needed
from lightning.fabric.utilities.distributed import _sync_ddp_if_available as sync_ddp_if_available
from lightning.fabric.utilities.optimizer import _optimizer_to_device as optimizer_to_device
from lightning.fabric.utilities.optimizer import _optimizers_to_device as optimizers_to_device
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.overrides.distributed import _sync_module_states as sync_module_states
from lightning.pytorch.strategies.ddp import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher as ScriptLauncher
from lightning.pytorch.utilities.data import _update_dataloader as update_dataloader
from torch import nn

if TYPE_CHECKING:
    import lightning.pytorch as pl

PathLike = _PATH
"""A file path as Lightning's checkpoint functions take it (``str`` or ``os.PathLike``)."""

__all__ = [
    "PathLike",
    "ScriptLauncher",
    "StrategyRegistry",
    "init_dist_connection",
    "optimizer_to_device",
    "optimizers_to_device",
    "set_num_threads_if_needed",
    "sync_ddp_if_available",
    "sync_module_states",
    "update_dataloader",
]


OVERRIDE_POINTS: dict[str, tuple[type, str]] = {
    "_configure_launcher": (DDPStrategy, "FedHogStrategy sets its launcher there, as every Lightning strategy does"),
    "_launcher": (DDPStrategy, "the launcher FedHogStrategy._configure_launcher sets"),
    "_layer_sync": (DDPStrategy, "FedHogStrategy refuses `sync_batchnorm=True` when the Trainer sets it"),
    "_call_children_scripts": (ScriptLauncher, "FedHogLauncher.launch starts the workers with it"),
}
"""The private names of Lightning classes that fedhog's subclasses override, set or call on themselves: the name, the
class that defines it, and what fedhog does with it."""


# ------------------------------------------------------------------------------------------------------ torch
def default_store() -> Any:
    """The rendezvous store of the default process group (atomic counters and flags without a collective)."""
    return dist.distributed_c10d._get_default_store()


def set_default_timeout(timeout: timedelta) -> None:
    """Sets the default group's collective timeout (``dist.set_timeout`` from torch 2.12, the function it replaced
    before; without either, collectives keep the timeout the group was made with)."""
    setter = getattr(dist, "set_timeout", None) or getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if setter is not None:
        setter(timeout)


def registered_tensors(owner: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """The module's own parameter and buffer dicts (not its children's), to swap entries in place."""
    return owner._parameters, owner._buffers


def forward_hook_count(module: nn.Module) -> int:
    """Forward hooks registered on ``module`` itself (not its children)."""
    return len(module._forward_hooks)


def cuda_ipc_handle(tensor: torch.Tensor) -> bytes:
    """A pickled handle another process on the same machine opens with :func:`open_cuda_ipc_handle`."""
    return pickle.dumps(torch.multiprocessing.reductions.reduce_tensor(tensor))


def open_cuda_ipc_handle(handle: bytes) -> torch.Tensor:
    rebuild, args = pickle.loads(handle)
    return rebuild(*args)


# -------------------------------------------------------------------------------------------------- Lightning
def replace_sigterm_broadcast(trainer: pl.Trainer, check: Callable[[], None]) -> None:
    """Replaces the per-batch SIGTERM broadcast of this Trainer's training epoch loop with ``check``."""
    trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = check  # type: ignore[method-assign]


def restore_sigterm_broadcast(trainer: pl.Trainer) -> None:
    trainer.fit_loop.epoch_loop.__dict__.pop("_broadcast_sigterm_tensor", None)


def attached_trainer(module: pl.LightningModule | None) -> pl.Trainer | None:
    """The Trainer a LightningModule is attached to, or None (``module.trainer`` raises when there is none)."""
    return getattr(module, "_trainer", None)


def user_sigterm_handler(trainer: pl.Trainer) -> Any:
    """The SIGTERM handler that was installed before Lightning's (the user's, or the default)."""
    return trainer._signal_connector._original_handlers.get(signal.SIGTERM)


def in_training_batch(trainer: pl.Trainer) -> bool:
    """Whether a training batch is in progress (between its start and Lightning's end-of-batch logging)."""
    return trainer.training and trainer._logger_connector._first_loop_iter is not None


def show_in_progress_bar(trainer: pl.Trainer, name: str, value: float) -> None:
    """Adds a value to the progress bar's metrics without logging it (no collective, no logger)."""
    trainer._logger_connector._progress_bar_metrics[name] = value


def logging_step(trainer: pl.Trainer) -> int:
    """The step Lightning gives the metrics it logs itself (the validation-end rows, ``self.log`` in hooks): batches
    that stepped the optimizer in this fit. ``global_step`` runs one ahead of it at the end of an epoch, where the
    optimizer step has counted but the batch loop has not yet, so rows logged with it never match Lightning's."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def preemption_checkpoint_path(trainer: pl.Trainer) -> PathLike:
    """Where Lightning saves (and a SLURM requeue resumes) a checkpoint taken on preemption."""
    return trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)


def dump_checkpoint(trainer: pl.Trainer) -> dict[str, Any]:
    """The full checkpoint of this process's state as ``trainer.save_checkpoint`` builds it (no collective in it;
    the strategy's ``lightning_module_state_dict`` and the hooks' ``on_save_checkpoint`` are called)."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)


def reopen_epoch(checkpoint: dict[str, Any]) -> None:
    """Makes a checkpoint saved during a training epoch resume into that epoch even if the saving worker's loader
    was exhausted (another worker's batches are left): Lightning ends a restored epoch whose last batch was seen.
    Nothing changes once the epoch's training has ended (its epoch-end hooks were under way)."""
    fit_loop = checkpoint["loops"]["fit_loop"]
    epoch = fit_loop["epoch_progress"]["current"]
    if epoch["processed"] < epoch["started"]:
        fit_loop["epoch_loop.batch_progress"]["is_last_batch"] = False


def refresh_last_checkpoint(callback: ModelCheckpoint, trainer: pl.Trainer) -> None:
    """Writes ``callback``'s ``last.ckpt`` now, as it would after a regular save."""
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


def step_or_time_trigger(callback: ModelCheckpoint) -> str | None:
    """``"every_n_train_steps=N"`` or ``"train_time_interval=T"`` when the callback saves by steps or by time."""
    if callback._every_n_train_steps:
        return f"every_n_train_steps={callback._every_n_train_steps}"
    if callback._train_time_interval is not None:
        return f"train_time_interval={callback._train_time_interval}"
    return None


def saves_by_time(callback: ModelCheckpoint) -> bool:
    return callback._train_time_interval is not None


def time_based_val_check(trainer: pl.Trainer) -> float | None:
    """Seconds between validations when ``val_check_interval`` was given as a time, else None."""
    return getattr(trainer, "_val_check_time_interval", None)


# ---------------------------------------------------------------------------------------------------- Trainer
_BASE_CLASS = "_fedhog_base_class"


def override_estimated_stepping_batches(trainer: pl.Trainer, estimate: Callable[[], float | None]) -> None:
    """Makes ``trainer.estimated_stepping_batches`` return ``estimate()`` (Lightning's own value where it is None).

    The property is read-only and derived from one worker's loader length, which dynamic work sharing takes away;
    a subclass of the Trainer's own class that overrides only this property replaces it on this instance.
    """
    restore_trainer_class(trainer)
    base = type(trainer)
    original = base.estimated_stepping_batches

    def estimated_stepping_batches(self: pl.Trainer) -> int | float:
        value = estimate()
        if value is None:
            return original.fget(self)  # type: ignore[attr-defined]
        return int(value) if value != float("inf") else value

    trainer.__class__ = type(
        base.__name__,
        (base,),
        {
            "estimated_stepping_batches": property(estimated_stepping_batches, doc=original.__doc__),
            _BASE_CLASS: base,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
        },
    )


def restore_trainer_class(trainer: pl.Trainer) -> None:
    """Undoes :func:`override_estimated_stepping_batches` (nothing if it was not applied)."""
    base = type(trainer).__dict__.get(_BASE_CLASS)
    if base is not None:
        trainer.__class__ = base


def epochs_done(trainer: pl.Trainer) -> int:
    """The epoch number Lightning gives the training sampler's ``set_epoch`` at the start of the next epoch."""
    return int(trainer.fit_loop.epoch_progress.current.processed)


def restart_training_iterator(trainer: pl.Trainer) -> None:
    """Builds the training loader's iterator again, as Lightning does at the start of an epoch."""
    fetcher = trainer.fit_loop._data_fetcher
    if fetcher is not None:
        iter(fetcher)


def epoch_ends_after_this_batch(trainer: pl.Trainer) -> bool:
    """Whether the training epoch loop stops after the batch in progress (its last batch, ``max_steps``, a stop).

    ``done`` alone is False on the first batch after a restart while validation is still to run, though that batch
    may be the epoch's last; ``_is_training_done`` says so without that condition.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    return bool(epoch_loop._is_training_done or epoch_loop.done)


def skipped_rest_of_epoch(trainer: pl.Trainer) -> bool:
    """Whether the training epoch ended because ``on_train_batch_start`` returned -1 (its batch was never started)."""
    current = trainer.fit_loop.epoch_loop.batch_progress.current
    return current.started < current.ready


def sampler_inside_wrapper(sampler: object) -> Any | None:
    """The user's sampler that Lightning wrapped for distributed training, or None if ``sampler`` is no wrapper."""
    if isinstance(sampler, DistributedSamplerWrapper):
        return sampler.dataset._sampler
    return None


def checkpoint_epochs_done(checkpoint: Any) -> int | None:
    """:func:`epochs_done` as a checkpoint records it (the epoch a resumed run starts in), None if absent."""
    try:
        return int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return None
