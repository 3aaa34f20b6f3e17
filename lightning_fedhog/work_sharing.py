"""Dynamic work sharing in a Lightning run: the training loader's sampler, and what Lightning derives from it.

:mod:`~lightning_fedhog.shared_counter` hands out each epoch's batches from a counter shared by every worker, so
faster workers take more batches and nobody idles behind a straggler at the epoch end. What Lightning derives from a
loader's length is kept right by :class:`DynamicWork`: every worker gets at least one batch per epoch (so every rank
reaches the same hooks and collectives), the epoch's limit and the run's ``max_steps`` budget are spent by the
sampler rather than cut by Lightning per worker (so batches a prefetching loader claimed are never dropped), a budget
that is already spent ends ``fit`` at once, and ``trainer.estimated_stepping_batches`` is the average worker's count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_fedhog import internals
from lightning_fedhog.checks import claims_by_batch, in_order, refuse_several_loaders
from lightning_fedhog.epoch_indices import EpochIndices
from lightning_fedhog.lr_pacing import pace_step_schedulers, unpace
from lightning_fedhog.shared_counter import ResumedEpoch, SharedCounterSampler
from lightning_fedhog.work_budget import WorkBudget

if TYPE_CHECKING:
    import lightning.pytorch as pl

CHECKPOINT_KEY = "fedhog_work"
"""The checkpoint entry of the dynamic work-sharing budget (chunks spent, epoch)."""

RESCUE_KEY = "fedhog_rescue"
"""The checkpoint entry a rescue adds (:mod:`~lightning_fedhog.rescue`): who was lost, and what the interrupted epoch
trained (under dynamic sharing, the chunks of it any worker began to train)."""

SHARING_KEY = "fedhog_work_sharing"
"""The checkpoint entry that says how work was shared when it was saved (``"static"`` or ``"dynamic"``)."""


class DynamicWork:
    """The training loader's shared-counter sampler, and what Lightning derives from the loader's length.

    Lightning counts ``max_steps`` and ``limit_train_batches`` per worker and cuts each worker's epoch there; with
    unequal shares that would drop batches a prefetching loader has already claimed, and stop fast workers early.
    So for the run both move into the sampler: ``max_steps`` becomes one budget of chunks for all workers (kept
    across reloaded loaders, saved in checkpoints and carried into a second ``fit`` of the same Trainer), the limit
    a number of chunks per epoch, and Lightning's own ``max_steps`` and ``limit_train_batches`` are switched off
    until :meth:`restore`. The budget's last epoch sets ``max_epochs``, so every worker stops after the same epoch,
    at its end; a budget already spent sets it to the epoch the run is at, so ``fit`` returns at once.

    Args:
        world_size: workers of the run.
        rank: this worker's global rank.
        carried: the budget of this Trainer's previous ``fit`` (:meth:`carried_budget`), the same on every rank.
    """

    def __init__(self, world_size: int, rank: int, carried: dict[str, Any] | None = None) -> None:
        self.world_size = world_size
        self.rank = rank
        self.budget = WorkBudget(world_size=world_size)
        if carried is not None:
            self.budget.load_state_dict(carried)
        self.sampler: SharedCounterSampler | None = None
        self._saved: dict[str, Any] | None = None  # the Trainer's settings, given back by `restore`
        self.resume_epoch: int | None = None  # the epoch a checkpoint resumes at (known before Lightning restores)
        self.resume_steps: int | None = None  # a checkpoint's global step, when it holds no budget of its own
        self._limit: int | float = 1.0
        self._accumulate = 1
        self._loaders = 0  # training loaders set up in this fit: each gets counters of its own
        self.resumed: ResumedEpoch | None = None  # the epoch a rescue interrupted, and what of it was trained

    def take_over(self, trainer: pl.Trainer) -> None:
        """Moves ``max_steps`` and ``limit_train_batches`` from Lightning's per-worker loops into the budget."""
        if self._saved is not None:
            return
        epoch_loop = trainer.fit_loop.epoch_loop
        self._saved = {
            "max_steps": epoch_loop.max_steps,
            "limit_train_batches": trainer.limit_train_batches,
            "max_epochs": trainer.fit_loop.max_epochs,
        }
        self._limit = trainer.limit_train_batches
        self._accumulate = max(int(trainer.accumulate_grad_batches), 1)
        if epoch_loop.max_steps >= 0:
            self.budget.total = epoch_loop.max_steps * self._accumulate * self.world_size
        if self.budget.resumed_epoch is None:  # no budget saved or carried: what the checkpoint already stepped
            steps = self.resume_steps if self.resume_steps is not None else trainer.global_step
            self.budget.spent = steps * self._accumulate * self.world_size
        epoch_loop.max_steps = -1
        trainer.limit_train_batches = 1.0

    def restore(self, trainer: pl.Trainer) -> None:
        """Gives the Trainer its own ``max_steps``, ``limit_train_batches`` and ``max_epochs`` back."""
        if self._saved is not None:
            trainer.fit_loop.epoch_loop.max_steps = self._saved["max_steps"]
            trainer.limit_train_batches = self._saved["limit_train_batches"]
            trainer.fit_loop.max_epochs = self._saved["max_epochs"]
        self._saved, self.sampler = None, None

    def loader(self, dataloader: object, trainer: pl.Trainer, store: Any, key: str) -> object:
        """The training loader with a :class:`SharedCounterSampler` in place of its sampler.

        The loader is returned as it is (with a warning) when it has no ``batch_size`` to claim by.
        """
        if not claims_by_batch(dataloader):
            rank_zero_warn(
                "fedhog: `work_sharing='dynamic'` needs a `DataLoader` over a map-style data set with a `batch_size`"
                " (not an `IterableDataset`, not a custom `batch_sampler`); this training loader keeps static shards."
            )
            return dataloader
        if not in_order(dataloader):
            raise ValueError(
                "fedhog: `work_sharing='dynamic'` counts the batches each worker trains in the order its sampler"
                " claimed them, but the training loader has `in_order=False`. HINT: leave `in_order=True` (the"
                " default), or use `work_sharing='static'`."
            )
        indices = EpochIndices(dataloader.sampler, len(dataloader.dataset))  # type: ignore[arg-type]
        self.take_over(trainer)

        def last_epoch() -> None:  # in Lightning's numbering, which a pass that trains nothing may have moved
            self._end_after(trainer, trainer.current_epoch + 1)

        if self.resume_epoch is not None and trainer.current_epoch == 0:
            epoch = self.resume_epoch  # Lightning has not restored its loops yet
        else:
            epoch = internals.epochs_done(trainer)
        self._loaders += 1
        self.sampler = SharedCounterSampler(
            indices,
            indices.length,
            dataloader.batch_size,
            store,
            key=f"{key}/loader{self._loaders}",
            rank=self.rank,
            budget=self.budget,
            drop_last=dataloader.drop_last,
            limit=self._limit,
            on_last_epoch=last_epoch,
            on_pass=lambda: refuse_several_loaders(trainer),
            epoch=epoch,
            resumed=self.resumed,
            record=self.world_size > 1,  # a rescue after a lost worker reads what the epoch trained
        )
        self._end_if_spent(trainer, epoch)
        return internals.update_dataloader(dataloader, self.sampler, mode=RunningStage.TRAINING)

    def _end_after(self, trainer: pl.Trainer, epochs: int) -> None:
        """Makes ``fit`` stop once ``epochs`` epochs are done (never later than the Trainer's own ``max_epochs``)."""
        limit = trainer.fit_loop.max_epochs
        trainer.fit_loop.max_epochs = epochs if limit is None or limit < 0 else min(limit, epochs)

    def _end_if_spent(self, trainer: pl.Trainer, epoch: int) -> None:
        """A budget with nothing left for ``epoch`` (a finished run resumed, ``max_steps=0``) ends ``fit`` before it:
        the same on every rank, since the budget is."""
        if self._saved is None or self.budget.plan(epoch, 1)[1] > 0:
            return
        self._end_after(trainer, epoch)
        rank_zero_info(
            f"fedhog: the run's `max_steps={self._saved['max_steps']}` budget is spent at epoch {epoch}; nothing is"
            f" left to train."
        )

    def on_train_start(self, trainer: pl.Trainer) -> None:
        """Checkpoint and loops are restored now: a pass begun earlier for another epoch or budget is begun again."""
        if self.sampler is None:
            return
        refuse_several_loaders(trainer)
        self.sampler.set_epoch(internals.epochs_done(trainer))
        if self.sampler.current_pass_is_stale():
            internals.restart_training_iterator(trainer)

    def attach(self, trainer: pl.Trainer) -> None:
        """Makes ``trainer.estimated_stepping_batches`` the average worker's count for this ``fit``."""
        internals.override_estimated_stepping_batches(trainer, lambda: self.estimate(trainer))

    def estimate(self, trainer: pl.Trainer) -> float | None:
        """:meth:`estimated_stepping_batches`, setting up the loader first as Lightning does when it is not yet."""
        if self.sampler is None:
            trainer.fit_loop.setup_data()
        return self.estimated_stepping_batches()

    def pace(self, trainer: pl.Trainer, configs: list[Any]) -> None:
        """Makes the per-step LR schedules in ``configs`` follow the run's progress (:mod:`~.lr_pacing`)."""
        if not any(config.interval == "step" for config in configs):
            return
        total = trainer.estimated_stepping_batches
        if self.sampler is not None:  # else the loader is not one dynamic sharing can take over
            pace_step_schedulers(configs, self.progress, float(total))

    def detach(self, trainer: pl.Trainer, configs: list[Any]) -> None:
        """Gives back everything :meth:`attach`, :meth:`pace` and :meth:`loader` changed, at the end of ``fit``."""
        self.restore(trainer)
        unpace(configs)
        internals.restore_trainer_class(trainer)

    def estimated_stepping_batches(self) -> float | None:
        """The average worker's optimizer steps in the whole run, as Lightning estimates them with static shards.

        None when no shared-counter sampler is in use (Lightning's own estimate then holds).
        """
        if self.sampler is None or self._saved is None:
            return None
        max_steps, max_epochs = self._saved["max_steps"], self._saved["max_epochs"]
        if max_epochs is None or max_epochs == -1:
            return float("inf") if max_steps == -1 else float(max_steps)
        per_epoch = math.ceil(self.sampler.chunks_per_epoch / self.world_size / self._accumulate)
        estimate = per_epoch * max(max_epochs, 1)
        return float(min(estimate, max_steps) if max_steps != -1 else estimate)

    def checkpoint_state(self) -> dict[str, Any]:
        """What the run's ``max_steps`` budget has spent (the same on every rank), once the sampler exists."""
        return {} if self.sampler is None else {CHECKPOINT_KEY: self.budget.state_dict()}

    def carried_budget(self) -> dict[str, Any] | None:
        """The budget as this ``fit`` leaves it, for the next ``fit`` of the same Trainer (None: nothing was shared).

        A second ``fit`` cannot start from each rank's ``global_step``: under dynamic sharing those differ.
        """
        return None if self.sampler is None else self.budget.state_dict()

    def resume_from(self, checkpoint: Mapping[str, Any], trainer: pl.Trainer) -> None:
        """Picks up a checkpoint's epoch and budget (or, saved without dynamic sharing, its global step), and from a
        rescue, what of the interrupted epoch was trained already: the rest is trained, each batch once."""
        self.resume_epoch = internals.checkpoint_epochs_done(checkpoint)
        rescued = (checkpoint.get(RESCUE_KEY) or {}).get("trained")
        if CHECKPOINT_KEY in checkpoint:
            self.budget.load_state_dict(checkpoint[CHECKPOINT_KEY])
            if rescued is not None:  # the budget was saved as it stood before the interrupted epoch
                self.resumed = ResumedEpoch(rescued["epoch"], rescued["chunks"], frozenset(rescued["chunks_trained"]))
                self.budget.resumed_trained = len(self.resumed.trained)
        else:  # the budget goes on from the checkpoint's step
            self.resume_steps = int(checkpoint.get("global_step", 0))
            self.budget.resumed_epoch = None
            if self._saved is not None:  # the loader was set up first (an estimate read in `setup()`)
                self.budget.spent = self.resume_steps * self._accumulate * self.world_size
        if self.resume_epoch is not None:
            self._end_if_spent(trainer, self.resume_epoch)

    def rescue_state(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """What a rescue saves of dynamic sharing: the budget as it stood before the interrupted epoch, and the chunks
        of that epoch that any worker (a lost one too) began to train, as the store recorded them."""
        sampler = self.sampler
        if sampler is None:
            return self.checkpoint_state(), None
        epoch = sampler.epoch
        budget = self.budget.state_dict()
        if self.resumed is not None and budget["epoch"] == epoch == self.resumed.epoch:
            budget["spent"] -= len(self.resumed.trained)  # counted again from the trained chunks when resumed
        trained = sorted(sampler.trained_chunks(epoch))
        return {CHECKPOINT_KEY: budget}, {"epoch": epoch, "chunks": sampler.chunks_per_epoch, "chunks_trained": trained}

    def on_train_batch(self) -> None:
        """Called before every training batch: counts it against the pass it came from (and its epoch)."""
        if self.sampler is not None:
            self.sampler.batch_trained()

    def progress(self) -> float:
        """The run's progress in average-worker optimizer steps, as of the batch this worker trained last.

        Chunks are numbered in the order the run hands them out, so the chunk a worker trains tells how far the
        whole run has come (not counting batches other workers have claimed and still train).
        """
        if self.sampler is None:
            return 0.0
        return self.sampler.trained_through / (self.world_size * self._accumulate)
