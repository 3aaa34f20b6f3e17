"""What fedhog adds to Lightning's checkpoints: every worker's optimizer state, the checkpoint of a stop, a rescue.

``FedHogStrategy``'s checkpoint hooks call these functions.

The weights in a checkpoint are the consensus model (a consensus point comes first), which loads into the plain
module. But each Hogwild! worker has its own optimizer state (momentum, Adam moments), and Lightning saves rank 0's
only; resuming every worker from rank 0's would change the run. So every worker's state goes under
``checkpoint["fedhog"]`` and each worker gets its own back on resume (same world size).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_fedhog.internals import (
    PathLike,
    dump_checkpoint,
    preemption_checkpoint_path,
    refresh_last_checkpoint,
    reopen_epoch,
)

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "fedhog"
"""Checkpoint entry holding every worker's optimizer state (Lightning itself keeps only rank 0's)."""


def add_every_workers_optimizer_state(
    checkpoint: dict[str, Any], world_size: int, gather: Callable[[Any], list[Any] | None]
) -> None:
    """Puts every worker's optimizer states into rank 0's ``checkpoint``, the one that is written.

    ``gather`` is a collective over all workers that returns the list on rank 0 and None on the others: only rank 0
    needs them, and on a thin link sending every worker's states to every rank multiplies what a checkpoint costs
    (an Adam state is twice the model).
    """
    states = checkpoint.get("optimizer_states")
    if states is None or world_size == 1:
        return
    gathered = gather(on_cpu(states))
    if gathered is not None:
        checkpoint[CHECKPOINT_KEY] = {"world_size": world_size, "optimizer_states_per_rank": gathered}


def on_cpu(states: Any) -> Any:
    """``states`` (optimizer states, nested) with every tensor detached and copied to the CPU, to send or save."""
    return apply_to_collection(states, Tensor, lambda tensor: tensor.detach().cpu())


def own_optimizer_states(checkpoint: Mapping[str, Any], world_size: int, rank: int) -> list[Any]:
    """This worker's optimizer states: its own when the checkpoint has one per rank of a run of the same size.

    With another number of workers (a rescue saved by fewer survivors, a restart with more or fewer devices), worker
    ``r`` takes saved state ``r mod n``: every saved state is used and every worker gets one that trained this model
    (the workers' momenta and Adam moments all estimate the same averages, so any of them is a sound start).
    """
    per_rank = (checkpoint.get(CHECKPOINT_KEY) or {}).get("optimizer_states_per_rank")
    if per_rank is None:
        return checkpoint["optimizer_states"]
    if len(per_rank) != world_size:
        rank_zero_warn(
            f"fedhog: the checkpoint holds the optimizer states of {len(per_rank)} workers but this run has"
            f" {world_size}; worker r starts from saved state r mod {len(per_rank)}."
        )
    return per_rank[rank % len(per_rank)]


def save_stop_checkpoint(trainer: pl.Trainer, broadcast: Callable[[Any], Any]) -> PathLike:
    """Saves the checkpoint of an agreed stop where a preemption checkpoint goes, and refreshes ``last.ckpt``.

    ``hpc_ckpt_N.ckpt`` in ``default_root_dir``: a SLURM requeue with ``ckpt_path=None`` resumes from it, elsewhere
    ``ckpt_path="hpc"``; also ``last.ckpt`` of every ``ModelCheckpoint(save_last=True)``, so ``ckpt_path="last"``
    resumes from it too. All ranks call this (saving is a collective); ``broadcast`` gives them rank 0's path.
    """
    path = broadcast(preemption_checkpoint_path(trainer))
    trainer.save_checkpoint(path)
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_last is True:
            refresh_last_checkpoint(callback, trainer)
    if trainer.is_global_zero:
        log.warning(
            "fedhog: stopped by SIGTERM at epoch %d, step %d; checkpoint saved to %s. Resume with"
            " `trainer.fit(..., ckpt_path=%r)` (or \"last\" with `ModelCheckpoint(save_last=True)`).",
            trainer.current_epoch, trainer.global_step, path, str(path),
        )
    return path


RESCUE_FILE = "last-rescue.ckpt"
"""A rescue's file name: ``ckpt_path="last"`` takes the newest file named ``last*.ckpt`` in a ``ModelCheckpoint``'s
folder, so it resumes from the rescue when that is newer than ``last.ckpt``."""


def rescue_path(trainer: pl.Trainer) -> str:
    """Where a rescue goes: the folder of the first ``ModelCheckpoint``, else ``default_root_dir``."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return os.path.join(callback.dirpath, RESCUE_FILE)
    return os.path.join(trainer.default_root_dir, RESCUE_FILE)


def write_rescue(
    trainer: pl.Trainer,
    save: Callable[[dict[str, Any], str], None],
    path: str,
    extra: Mapping[str, Any],
    *,
    batches_left: bool,
) -> None:
    """Writes the checkpoint of this process's state, with ``extra`` on top, to ``path`` atomically.

    It is written to a temporary file next to ``path`` and renamed, so a crash while writing leaves no half file
    that ``ckpt_path="last"`` would pick (on a local file system; elsewhere it is written in place).

    Args:
        trainer: the Trainer; its module holds the rescued weights.
        save: writes a checkpoint dict to a path (the strategy's ``CheckpointIO``).
        path: the rescue's path.
        extra: every worker's optimizer state, the work sharing and the rescue's record.
        batches_left: other workers' batches of the epoch are left (dynamic sharing): the resumed run trains them
            even where this worker's loader was exhausted.
    """
    checkpoint = dump_checkpoint(trainer)
    checkpoint.update(extra)
    if batches_left:
        reopen_epoch(checkpoint)
    if "://" in path:
        save(checkpoint, path)
        return
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        save(checkpoint, temporary)
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
