"""Dynamic work sharing: an epoch's batches are handed out from one counter shared by every worker of the run.

With equal static shards (``DistributedSampler``) a fast worker finishes its shard early and idles at the end
of every epoch until the slowest arrives, which gives back DDP's straggler problem once per epoch. The
reference code of the paper avoids it because fast nodes simply run more minibatches. Here every worker claims
the next chunk (one batch) of a seeded permutation from an atomic counter in the run's rendezvous store, so
faster workers take more batches, every sample is used exactly once per epoch, and all workers run out within
about one batch of each other.

The counter is a ``TCPStore.add`` on the process group's store: one small request per batch, not a collective,
so nobody waits for anybody. What Lightning derives from a loader's length is kept right by
:class:`DynamicWork`: every worker gets at least one batch per epoch (so every rank reaches the same hooks and
collectives), the epoch's limit and the run's ``max_steps`` budget are spent by the sampler rather than cut by
Lightning per worker (so batches a prefetching loader claimed are never dropped), and
``trainer.estimated_stepping_batches`` is the average worker's count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset, Sampler

from lightning_fedhog import internals
from lightning_fedhog.pacing import pace_step_schedulers, unpace

if TYPE_CHECKING:
    import lightning.pytorch as pl

WorkSharing = Literal["static", "dynamic"]

CHECKPOINT_KEY = "fedhog_work"
"""The checkpoint entry of the dynamic work-sharing budget (chunks spent, epoch)."""


def chunks_per_epoch(num_chunks: int, limit: int | float, world_size: int) -> int:
    """Chunks the whole run may train in one epoch under ``limit_train_batches`` (a per-worker figure in Lightning).

    An int limit allows that many batches to every worker, so ``limit * world_size`` in all; a float takes that
    fraction of the epoch (at least one batch).
    """
    if isinstance(limit, int):
        return min(num_chunks, limit * world_size)
    return num_chunks if limit >= 1.0 else max(1, int(num_chunks * limit))


@dataclass
class WorkBudget:
    """How many chunks each epoch hands out, and the run's ``max_steps`` budget as it is spent.

    Every worker holds its own copy and computes the same numbers from the same inputs, so no message is needed
    to agree on them. An epoch hands out at least one chunk per worker: a worker that got none would skip the
    epoch's hooks and collectives (leaving a consensus point, validation, the epoch-end reductions) while the
    others wait in them. So the budget's last epoch is rounded up to one batch per worker when less is left (at
    most ``world_size - 1`` batches more than ``max_steps`` asked, less than one step per worker).

    Args:
        world_size: workers sharing the counter.
        total: chunks the whole run may train (``max_steps * accumulate_grad_batches * world_size``), or None.
        spent: chunks of the epochs finished before the current one (resumed from a checkpoint).
    """

    world_size: int
    total: int | None = None
    spent: int = 0
    epoch: int = -1  # the epoch whose size is `current`
    current: int = 0
    resumed_epoch: int | None = None  # a checkpoint's epoch: it counts as finished if training starts after it
    resumed_current: int = 0

    def left(self) -> int | None:
        """Chunks of the budget not yet handed out at the start of the current epoch (None: no budget)."""
        return None if self.total is None else max(self.total - self.spent, 0)

    def _plan(self, epoch: int, available: int) -> tuple[int, int]:
        """``(spent, size)`` once ``epoch`` has begun: the chunks spent before it, and its own number of chunks.

        The size is ``available`` at most, unless rounded up to one chunk per worker.
        """
        if epoch == self.epoch:
            return self.spent, self.current
        spent = self.spent
        if self.resumed_epoch is not None:
            if epoch > self.resumed_epoch:
                spent += self.resumed_current
        elif self.epoch >= 0 and epoch > self.epoch:
            spent += self.current
        left = None if self.total is None else max(self.total - spent, 0)
        size = available if left is None else min(available, left)
        return spent, max(size, self.world_size) if size > 0 else 0

    def peek(self, epoch: int, available: int) -> int:
        """The size :meth:`begin_epoch` gives ``epoch``, without counting the epoch as begun.

        The sampler asks before training starts: Lightning iterates a loader once when it sets it up, and after an
        epoch-end checkpoint it runs one pass that trains nothing; only an epoch that trains is counted.
        """
        return self._plan(epoch, available)[1]

    def begin_epoch(self, epoch: int, available: int) -> tuple[int, bool]:
        """Counts ``epoch`` as begun (when it trains its first batch): its size, and whether it is the budget's last.

        Idempotent for the same epoch.
        """
        if epoch != self.epoch:
            self.spent, self.current = self._plan(epoch, available)
            self.epoch, self.resumed_epoch = epoch, None
        left = self.left()
        return self.current, left is not None and left <= self.current

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "spent": self.spent, "epoch": self.epoch, "current": self.current}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues a saved run: the saved epoch counts as spent if training resumes after it, else it restarts."""
        self.spent = state["spent"]  # the total comes from this run's `max_steps`, which may have been raised
        self.epoch, self.current = -1, 0
        self.resumed_epoch, self.resumed_current = state["epoch"], state["current"]


class SharedCounterSampler(Sampler[int]):
    """Yields the chunks of an epoch's permutation that this worker claims from a shared counter.

    It has no ``__len__`` on purpose: the number of batches a worker gets is not known in advance, and Lightning
    then ends the epoch when the iterator is exhausted instead of after a fixed count. The first chunk of every
    epoch is reserved for each worker (chunk ``rank``), so nobody ends an epoch empty-handed; the rest are claimed.

    Args:
        num_samples: size of the data set.
        chunk_size: samples per claim; the loader's batch size, so one claim is one batch.
        store: a ``torch.distributed.Store`` shared by all workers (``add`` is atomic).
        key: a prefix unique to this run and fit.
        rank: this worker's index among the ``budget.world_size`` workers.
        budget: the number of chunks of each epoch (shared with the strategy, which saves it in checkpoints).
        seed: seed of the per-epoch permutation, the same on every worker.
        shuffle: permute the samples every epoch (otherwise in order).
        drop_last: leave out the last, incomplete chunk.
        limit: ``limit_train_batches`` (per worker, as Lightning defines it).
        on_last_epoch: called when the epoch in which the budget runs out trains its first batch, on every worker
            (every worker trains at least one batch of every epoch that trains).
        epoch: the epoch the loader starts in (``set_epoch`` may come after the first pass has begun).
    """

    def __init__(
        self,
        num_samples: int,
        chunk_size: int,
        store: Any,
        key: str,
        *,
        rank: int = 0,
        budget: WorkBudget | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        limit: int | float = 1.0,
        on_last_epoch: Callable[[], None] | None = None,
        epoch: int = 0,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.num_samples = num_samples
        self.chunk_size = chunk_size
        self.store = store
        self.key = key
        self.rank = rank
        self.budget = budget if budget is not None else WorkBudget(world_size=1)
        self.seed = seed
        self.shuffle = shuffle
        self.num_chunks = max(num_samples // chunk_size if drop_last else math.ceil(num_samples / chunk_size), 1)
        self.chunks_per_epoch = chunks_per_epoch(self.num_chunks, limit, self.budget.world_size)
        self.on_last_epoch = on_last_epoch
        # Lightning iterates a length-less loader once when it sets it up (to know the epoch's last batch), before
        # `set_epoch`: the epoch the run is at must be known from the start, or that first pass would be epoch 0's
        self.epoch = epoch
        self.claimed_through = 0  # the run's chunks handed out up to this worker's latest claim (its progress)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch: a new permutation and a new counter."""
        self.epoch = epoch

    def order(self) -> list[int]:
        """The epoch's permutation of sample indices, identical on every worker."""
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def begin_epoch(self) -> None:
        """This worker trains its first batch of the pass: the epoch counts (the same on every worker)."""
        _, last = self.budget.begin_epoch(self.epoch, self.chunks_per_epoch)
        if last and self.on_last_epoch is not None:
            self.on_last_epoch()

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        limit = self.budget.peek(self.epoch, self.chunks_per_epoch)
        workers = self.budget.world_size
        chunk = self.rank  # reserved: every worker trains at least one batch per epoch
        while chunk < limit:
            self.claimed_through = self.budget.spent + chunk + 1
            start = (chunk % self.num_chunks) * self.chunk_size  # wraps only when the data has < 1 batch per worker
            yield from order[start : start + self.chunk_size]
            chunk = workers + int(self.store.add(f"{self.key}/epoch{self.epoch}", 1)) - 1

class DynamicWork:
    """The training loader's shared-counter sampler, and what Lightning derives from the loader's length.

    Lightning counts ``max_steps`` and ``limit_train_batches`` per worker and cuts each worker's epoch there; with
    unequal shares that would drop batches a prefetching loader has already claimed, and stop fast workers early.
    So for the run both move into the sampler: ``max_steps`` becomes one budget of chunks for all workers (kept
    across reloaded loaders and saved in checkpoints), the limit a number of chunks per epoch, and Lightning's own
    ``max_steps`` and ``limit_train_batches`` are switched off until :meth:`restore`. The budget's last epoch sets
    ``max_epochs``, so every worker stops after the same epoch, at its end.

    Args:
        world_size: workers of the run.
        rank: this worker's global rank.
    """

    def __init__(self, world_size: int, rank: int) -> None:
        self.world_size = world_size
        self.rank = rank
        self.budget = WorkBudget(world_size=world_size)
        self.sampler: SharedCounterSampler | None = None
        self._saved: dict[str, Any] | None = None  # the Trainer's settings, given back by `restore`
        self.resume_epoch: int | None = None  # the epoch a checkpoint resumes at (known before Lightning restores)
        self.resume_steps: int | None = None  # a checkpoint's global step, when it holds no budget of its own
        self._limit: int | float = 1.0
        self._accumulate = 1

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
        if self.budget.resumed_epoch is None:  # no budget saved: what this Trainer (or checkpoint) already stepped
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
        if (
            not isinstance(dataloader, DataLoader)
            or dataloader.batch_size is None
            or isinstance(dataloader.dataset, IterableDataset)
        ):
            rank_zero_warn(
                "fedhog: `work_sharing='dynamic'` needs a `DataLoader` over a map-style data set with a `batch_size`"
                " (not an `IterableDataset`, not a custom `batch_sampler`); this training loader keeps static shards."
            )
            return dataloader
        self.take_over(trainer)
        sampler = dataloader.sampler

        def last_epoch() -> None:  # in Lightning's numbering, which a pass that trains nothing may have moved
            limit, last = trainer.fit_loop.max_epochs, trainer.current_epoch + 1
            trainer.fit_loop.max_epochs = last if limit is None or limit < 0 else min(limit, last)

        if self.resume_epoch is not None and trainer.current_epoch == 0:
            epoch = self.resume_epoch  # Lightning has not restored its loops yet
        else:
            epoch = internals.epochs_done(trainer)

        self.sampler = SharedCounterSampler(
            len(dataloader.dataset),  # type: ignore[arg-type]
            dataloader.batch_size,
            store,
            key=key,
            rank=self.rank,
            budget=self.budget,
            seed=int(getattr(sampler, "seed", 0)),
            shuffle=bool(getattr(sampler, "shuffle", True)),
            drop_last=dataloader.drop_last,
            limit=self._limit,
            on_last_epoch=last_epoch,
            epoch=epoch,
        )
        return internals.update_dataloader(dataloader, self.sampler, mode=RunningStage.TRAINING)

    def attach(self, trainer: pl.Trainer) -> None:
        """Makes ``trainer.estimated_stepping_batches`` the average worker's count for this ``fit``."""
        internals.override_estimated_stepping_batches(trainer, lambda: self.estimate(trainer))

    def estimate(self, trainer: pl.Trainer) -> float | None:
        """:meth:`estimated_stepping_batches`, setting up the loader first as Lightning does when it is not yet."""
        if self.sampler is None:
            trainer.fit_loop.setup_data()
        return self.estimated_stepping_batches()

    def pace(self, trainer: pl.Trainer, configs: list[Any]) -> None:
        """Makes the per-step LR schedules in ``configs`` follow the run's progress (:mod:`~.pacing`)."""
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

    def resume_from(self, checkpoint: Mapping[str, Any]) -> None:
        """Picks up a checkpoint's epoch and budget (or, saved without dynamic sharing, its global step)."""
        self.resume_epoch = internals.checkpoint_epochs_done(checkpoint)
        if CHECKPOINT_KEY in checkpoint:
            self.budget.load_state_dict(checkpoint[CHECKPOINT_KEY])
        else:  # the budget goes on from the checkpoint's step
            self.resume_steps = int(checkpoint.get("global_step", 0))

    def on_train_batch(self) -> None:
        """Called before every training batch: the first of a pass counts its epoch in the budget."""
        if self.sampler is not None:
            self.sampler.begin_epoch()

    def progress(self) -> float:
        """The run's progress in average-worker optimizer steps, as of this worker's latest claim."""
        if self.sampler is None:
            return 0.0
        return self.sampler.claimed_through / (self.world_size * self._accumulate)


def check_dynamic_compatible(val_check_interval: object, step_checkpoints: list[str], max_time: bool = False) -> None:
    """Refuses Trainer settings that need every worker to reach the same step (dynamic sharing breaks that).

    Args:
        val_check_interval: the Trainer's ``val_check_interval``.
        step_checkpoints: descriptions of callbacks that act every N steps or every T seconds.
        max_time: the Trainer has a ``Timer`` (``max_time=...``), which broadcasts after every step.
    """
    hint = "HINT: keep validation and checkpoints at epoch ends, or use `work_sharing='static'`."
    if max_time:
        raise ValueError(
            "`work_sharing='dynamic'` gives workers different step counts, but `Trainer(max_time=...)` (the `Timer`"
            " callback) broadcasts from rank 0 after every step, so the workers' broadcasts would not pair up and the"
            " run would hang at the first epoch end. HINT: bound the run with `max_epochs` or `max_steps`, or use"
            " `work_sharing='static'`."
        )
    if not (isinstance(val_check_interval, float) and val_check_interval == 1.0):
        raise ValueError(
            f"`work_sharing='dynamic'` gives workers different numbers of batches per epoch, so validation can only"
            f" run at the end of an epoch, but `val_check_interval={val_check_interval!r}`. {hint}"
        )
    if step_checkpoints:
        raise ValueError(
            f"`work_sharing='dynamic'` gives workers different step counts, so a checkpoint every N steps or T"
            f" seconds would be taken at different moments on different workers: {', '.join(step_checkpoints)}."
            f" {hint}"
        )
