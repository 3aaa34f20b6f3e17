"""Dynamic work sharing: an epoch's batches are handed out from one counter shared by every worker of the run.

With equal static shards (``DistributedSampler``) a fast worker finishes its shard early and idles at the end
of every epoch until the slowest arrives, which gives back DDP's straggler problem once per epoch. The
reference code of the paper avoids it because fast nodes simply run more minibatches. Here every worker claims
the next chunk (one batch) of a seeded permutation from an atomic counter in the run's rendezvous store, so
faster workers take more batches, every sample is used exactly once per epoch, and all workers run out within
about one batch of each other.

The counter is a ``TCPStore.add`` on the process group's store: one small request per batch, not a collective,
so nobody waits for anybody.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, Sampler

from lightning_fedhog.internals import update_dataloader

if TYPE_CHECKING:
    import lightning.pytorch as pl

WorkSharing = Literal["static", "dynamic"]


class SharedCounterSampler(Sampler[int]):
    """Yields the chunks of an epoch's permutation that this worker claims from a shared counter.

    It has no ``__len__`` on purpose: the number of batches a worker gets is not known in advance, and Lightning
    then ends the epoch when the iterator is exhausted instead of after a fixed count.

    Args:
        num_samples: size of the data set.
        chunk_size: samples per claim; the loader's batch size, so one claim is one batch.
        store: a ``torch.distributed.Store`` shared by all workers (``add`` is atomic).
        key: a prefix unique to this run and fit.
        seed: seed of the per-epoch permutation, the same on every worker.
        shuffle: permute the samples every epoch (otherwise in order).
        chunks_per_epoch: claimable chunks per epoch (default: all); ``limit_train_batches`` lowers it.
        total_chunks: chunks left for the rest of the run from ``start_epoch`` on (``max_steps``), or None. The
            budget is spent epoch by epoch, so every worker knows without talking to the others in which epoch
            (and at which chunk) it runs out.
        start_epoch: the epoch from which ``total_chunks`` counts.
        on_exhausted: called at the end of the epoch in which ``total_chunks`` runs out, on every worker, so
            they all stop at the same epoch end.
    """

    def __init__(
        self,
        num_samples: int,
        chunk_size: int,
        store: Any,
        key: str,
        *,
        seed: int = 0,
        shuffle: bool = True,
        chunks_per_epoch: int | None = None,
        total_chunks: int | None = None,
        start_epoch: int = 0,
        on_exhausted: Callable[[], None] | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.num_samples = num_samples
        self.chunk_size = chunk_size
        self.store = store
        self.key = key
        self.seed = seed
        self.shuffle = shuffle
        all_chunks = math.ceil(num_samples / chunk_size)
        self.chunks_per_epoch = all_chunks if chunks_per_epoch is None else min(chunks_per_epoch, all_chunks)
        self.total_chunks = total_chunks
        self.start_epoch = start_epoch
        self.on_exhausted = on_exhausted
        self.epoch = 0
        self.exhausted = False
        self.claimed: list[int] = []  # chunks this worker got in the current epoch

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch: a new permutation and a new counter."""
        self.epoch = epoch

    def order(self) -> list[int]:
        """The epoch's permutation of sample indices, identical on every worker."""
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def _chunks_this_epoch(self) -> tuple[int, bool]:
        """Claimable chunks in the current epoch, and whether the run's budget ends with it."""
        if self.total_chunks is None:
            return self.chunks_per_epoch, False
        spent = max(self.epoch - self.start_epoch, 0) * self.chunks_per_epoch
        left = max(self.total_chunks - spent, 0)
        return min(self.chunks_per_epoch, left), left <= self.chunks_per_epoch

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        limit, last_epoch = self._chunks_this_epoch()
        self.claimed = []
        while True:
            chunk = int(self.store.add(f"{self.key}/epoch{self.epoch}", 1)) - 1
            if chunk >= limit:
                break
            self.claimed.append(chunk)
            yield from order[chunk * self.chunk_size : (chunk + 1) * self.chunk_size]
        if last_epoch and not self.exhausted:
            self.exhausted = True
            if self.on_exhausted is not None:
                self.on_exhausted()


def shared_counter_loader(
    dataloader: object, trainer: pl.Trainer, store: Any, key: str, world_size: int
) -> tuple[object, SharedCounterSampler | None, int | None]:
    """The training loader with a :class:`SharedCounterSampler` in place of its sampler.

    ``max_steps`` is a per-worker count in Lightning; the same total work (``max_steps`` batches per worker) is
    spent from one budget instead, so every worker stops at the same epoch end: Lightning's own ``max_steps`` is
    switched off for the run.

    Returns:
        The loader, its sampler, and the ``max_steps`` to restore after ``fit`` (None if unchanged); the loader is
        returned as it is (with a warning) when it has no ``batch_size`` to claim by.
    """
    if not isinstance(dataloader, DataLoader) or dataloader.batch_size is None:
        rank_zero_warn(
            "fedhog: `work_sharing='dynamic'` needs a `DataLoader` with a `batch_size` (not a custom"
            " `batch_sampler`); this training loader keeps static shards."
        )
        return dataloader, None, None
    limit = trainer.limit_train_batches
    epoch_loop = trainer.fit_loop.epoch_loop
    saved_max_steps, total_chunks = None, None
    if epoch_loop.max_steps > 0:
        saved_max_steps = epoch_loop.max_steps
        total_chunks = max(epoch_loop.max_steps - trainer.global_step, 0) * world_size
        epoch_loop.max_steps = -1
    sampler = dataloader.sampler
    work_sampler = SharedCounterSampler(
        len(dataloader.dataset),  # type: ignore[arg-type]
        dataloader.batch_size,
        store,
        key=key,
        seed=int(getattr(sampler, "seed", 0)),
        shuffle=bool(getattr(sampler, "shuffle", True)),
        chunks_per_epoch=limit * world_size if isinstance(limit, int) else None,
        total_chunks=total_chunks,
        start_epoch=trainer.current_epoch,
        on_exhausted=lambda: setattr(trainer, "should_stop", True),
    )
    return update_dataloader(dataloader, work_sampler, mode=RunningStage.TRAINING), work_sampler, saved_max_steps


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
