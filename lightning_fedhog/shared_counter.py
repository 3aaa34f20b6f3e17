"""The sampler of dynamic work sharing: each worker claims an epoch's batches one at a time from a shared counter.

With equal static shards (``DistributedSampler``) a fast worker finishes its shard early and idles at the end of
every epoch until the slowest arrives, which gives back DDP's straggler problem once per epoch. The reference code
of the paper avoids it because fast nodes simply run more minibatches. Here the epoch's index list (the user's
sampler's, :mod:`~lightning_fedhog.epoch_indices`) is cut into chunks of one batch, and every worker claims the next
chunk from an atomic counter in the run's rendezvous store (``TCPStore.add``: one small request per batch, not a
collective, so nobody waits for anybody).

Claims are made ahead of training: a loader with workers prefetches ``prefetch_factor * num_workers`` batches, and
Lightning builds an iterator and throws it away (a reloaded loader's first iterator, one built before a checkpoint
was restored). So a claimed chunk counts as handed out only once its batch is trained: a worker counts the batches
it trains from each pass over its sampler, and when it starts a new pass, the chunks its previous pass claimed but
did not train go back to a pool in the store, which every worker drains after the counter (each returned chunk is
taken by exactly one worker, by ``compare_set``). The worker that returned chunks drains the pool itself before its
epoch ends, so a returned chunk is always trained: every index of the epoch exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import Sampler

from lightning_fedhog.epoch_indices import fingerprint
from lightning_fedhog.rendezvous import present_values
from lightning_fedhog.work_budget import WorkBudget, chunks_per_epoch


@dataclass(frozen=True)
class ResumedEpoch:
    """The epoch a rescue interrupted (:mod:`~lightning_fedhog.rescue`): what of it was trained before.

    Attributes:
        epoch: the epoch's number.
        chunks: how many chunks the epoch had then (a resumed run with another batch size or limit cannot use it).
        trained: the chunks whose batches some worker began to train.
    """

    epoch: int
    chunks: int
    trained: frozenset[int]


@dataclass
class _Pass:
    """One pass of a worker over its sampler (one iterator Lightning built): what it claimed and trained."""

    epoch: int
    spent: int  # the run's chunks handed out before this epoch
    limit: int  # chunks of this epoch
    token: str  # this pass's name in the store, for claims from the pool
    yielded: list[int] = field(default_factory=list)  # chunks, in the order their batches were yielded
    held: list[int] = field(default_factory=list)  # claimed, not yet yielded (a short last chunk goes last)
    trained: int = 0  # batches of this pass trained so far (the first `trained` of `yielded`)
    closed: bool = False


class SharedCounterSampler(Sampler[int]):
    """Yields the chunks of an epoch's index list that this worker claims from the run's shared counter.

    It has no ``__len__`` on purpose: the number of batches a worker gets is not known in advance, and Lightning
    then ends the epoch when the iterator is exhausted instead of after a fixed count. Chunk ``rank`` of every epoch
    is reserved for this worker (kept for it until it is trained, also across thrown-away passes), so nobody ends
    an epoch empty-handed; the others are claimed.

    Args:
        order: the epoch's index list (identical on every worker for the same epoch).
        num_samples: the length of every epoch's index list.
        chunk_size: indices per claim; the loader's batch size, so one claim is one batch.
        store: a ``torch.distributed.Store`` shared by all workers (``add`` and ``compare_set`` are atomic).
        key: a prefix unique to this loader, the same on every worker.
        rank: this worker's index among the ``budget.world_size`` workers.
        budget: the number of chunks of each epoch (shared with the strategy, which saves it in checkpoints).
        drop_last: leave out the last, incomplete chunk.
        limit: ``limit_train_batches`` (per worker, as Lightning defines it).
        on_last_epoch: called when the epoch in which the budget runs out trains its first batch, on every worker.
        on_pass: called when a pass begins (before anything is claimed), e.g. to refuse an unsupported set-up.
        epoch: the epoch the loader starts in (``set_epoch`` may come after the first pass has begun).
        resumed: the epoch a rescue interrupted and what of it was trained: that epoch hands out only the rest.
        record: leave every trained chunk's number in the store, so that a rescue after a lost worker knows what
            the epoch trained (one small request per batch).
    """

    def __init__(
        self,
        order: Callable[[int], list[int]],
        num_samples: int,
        chunk_size: int,
        store: Any,
        key: str,
        *,
        rank: int = 0,
        budget: WorkBudget | None = None,
        drop_last: bool = False,
        limit: int | float = 1.0,
        on_last_epoch: Callable[[], None] | None = None,
        on_pass: Callable[[], None] | None = None,
        epoch: int = 0,
        resumed: ResumedEpoch | None = None,
        record: bool = False,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.order = order
        self.num_samples = num_samples
        self.chunk_size = chunk_size
        self.store = store
        self.key = key
        self.rank = rank
        self.budget = budget if budget is not None else WorkBudget(world_size=1)
        self.num_chunks = max(num_samples // chunk_size if drop_last else math.ceil(num_samples / chunk_size), 1)
        self._short_last = not drop_last and num_samples % chunk_size != 0
        self.chunks_per_epoch = chunks_per_epoch(self.num_chunks, limit, self.budget.world_size)
        self.on_last_epoch = on_last_epoch
        self.on_pass = on_pass
        # Lightning iterates a length-less loader once when it sets it up (to know the epoch's last batch), before
        # `set_epoch`: the epoch the run is at must be known from the start, or that first pass would be epoch 0's
        self.epoch = epoch
        self.trained_through = 0  # the run's chunks handed out up to the latest one this worker trained (progress)
        self._pass: _Pass | None = None
        self._passes = 0
        self._reserved_trained = -1  # the latest epoch whose reserved chunk this worker trained
        self._checked_epoch = -1  # the latest epoch whose index list was compared with the other workers'
        if resumed is not None and resumed.chunks != self.chunks_per_epoch:
            rank_zero_warn(
                f"fedhog: the rescue's epoch {resumed.epoch} had {resumed.chunks} batches but this run's loader"
                f" gives it {self.chunks_per_epoch} (another batch size, data set or `limit_train_batches`), so the"
                " batches it trained before the rescue cannot be told apart: the epoch is trained whole."
            )
            resumed = None
        self.resumed = resumed
        self.record = record
        # the resumed epoch's chunks still to train, in order: the pass's chunk numbers index this list
        self._left = [] if resumed is None else [c for c in range(self.chunks_per_epoch) if c not in resumed.trained]

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch: a new index list and a new counter."""
        self.epoch = epoch

    def plan(self) -> tuple[int, int]:
        """``(spent, size)`` of the sampler's current epoch, as a pass beginning now would use them."""
        return self.budget.plan(self.epoch, self._available(self.epoch))

    def _available(self, epoch: int) -> int:
        """Chunks ``epoch`` can hand out: all of them, or in a resumed epoch those not trained before the rescue (at
        least one per worker: every worker must reach the epoch's end, so an epoch the rescue found finished trains
        one chunk per worker again)."""
        if self.resumed is None or epoch != self.resumed.epoch:
            return self.chunks_per_epoch
        return len(self._left) or min(self.budget.world_size, self.chunks_per_epoch)

    def chunk_at(self, epoch: int, position: int) -> int:
        """The chunk of the epoch's index list that a pass's ``position``-th chunk number stands for."""
        if self.resumed is None or epoch != self.resumed.epoch:
            return position % self.num_chunks  # wraps only when the data has < 1 batch per worker
        order = self._left or list(range(self.chunks_per_epoch))
        return order[position % len(order)]

    def trained_chunks(self, epoch: int) -> set[int]:
        """The chunks of ``epoch`` whose batches any worker began to train, as recorded in the store (with
        ``record``), and those a rescued run had trained before. Readable after a worker died."""
        keys = [f"{self.key}/epoch{epoch}/trained/{rank}" for rank in range(self.budget.world_size)]
        records = present_values(self.store, keys).values()
        found = {int(chunk) for raw in records for chunk in raw.decode().split(",") if chunk}
        if self.resumed is not None and epoch == self.resumed.epoch:
            found |= self.resumed.trained
        return found

    def current_pass_is_stale(self) -> bool:
        """Whether the pass in progress began for another epoch or budget than the current ones (a loader iterated
        before Lightning restored a checkpoint)."""
        if self._pass is None:
            return False
        return (self._pass.epoch, self._pass.spent, self._pass.limit) != (self.epoch, *self.plan())

    def batch_trained(self) -> None:
        """Called as each training batch starts: counts it against the pass it came from; the epoch's first batch
        counts the epoch in the budget (the same on every worker: each trains at least one batch per epoch)."""
        current = self._pass
        if current is None or current.trained >= len(current.yielded):
            return
        chunk = current.yielded[current.trained]
        current.trained += 1
        if self.record:
            trained = f"{self.key}/epoch{current.epoch}/trained/{self.rank}"
            self.store.append(trained, f"{self.chunk_at(current.epoch, chunk)},")
        self.trained_through = max(self.trained_through, current.spent + chunk + 1)
        if chunk < self.budget.world_size:  # numbers below the world size are the workers' reserved chunks
            self._reserved_trained = current.epoch
        _, last = self.budget.begin_epoch(current.epoch, self._available(current.epoch))
        if last and self.on_last_epoch is not None:
            self.on_last_epoch()

    def __iter__(self) -> Iterator[int]:
        if self.on_pass is not None:
            self.on_pass()
        if self._pass is not None:
            self._give_back(self._pass)
        spent, limit = self.plan()
        self._passes += 1
        current = _Pass(self.epoch, spent, limit, token=f"{self.rank}:{self._passes}")
        self._pass = current
        order = self.order(current.epoch)
        self._compare_with_other_workers(current.epoch, order)
        for chunk in self._claims(current):
            if current.closed:  # a newer pass took over (it gave back what this one claimed)
                return
            if self._short_last and self.chunk_at(current.epoch, chunk) == self.num_chunks - 1:
                current.held.append(chunk)  # the short chunk goes last, or it would merge with the next batch
                continue
            yield from self._yield(current, chunk, order)
        while current.held and not current.closed:
            yield from self._yield(current, current.held.pop(0), order)

    def _yield(self, current: _Pass, chunk: int, order: list[int]) -> Iterator[int]:
        current.yielded.append(chunk)
        start = self.chunk_at(current.epoch, chunk) * self.chunk_size
        yield from order[start : start + self.chunk_size]

    def _claims(self, current: _Pass) -> Iterator[int]:
        """This pass's chunks: the reserved one (until trained), the counter's, then the pool of returned ones."""
        prefix = f"{self.key}/epoch{current.epoch}"
        if self._reserved_trained != current.epoch and self.rank < current.limit:
            yield self.rank
        while True:
            chunk = self.budget.world_size + int(self.store.add(f"{prefix}/next", 1)) - 1
            if chunk >= current.limit:  # spent past the end; fine since an epoch's limit never grows between passes
                break  # (a restored checkpoint can only have spent more of the budget)
            yield chunk
        seen = 0
        while (returned := int(self.store.add(f"{prefix}/returned", 0))) > seen:
            for slot in range(seen, returned):
                owner = self.store.compare_set(f"{prefix}/returned{slot}/owner", "", current.token)
                if owner == current.token.encode():
                    chunk = int(self.store.get(f"{prefix}/returned{slot}"))
                    if chunk < current.limit:
                        yield chunk
            seen = returned

    def _give_back(self, previous: _Pass) -> None:
        """Puts the chunks ``previous`` claimed and did not train back in its epoch's pool (the reserved one stays
        this worker's: its next pass yields it again)."""
        previous.closed = True
        untrained = previous.yielded[previous.trained :] + previous.held
        prefix = f"{self.key}/epoch{previous.epoch}"
        for chunk in untrained:
            if chunk < self.budget.world_size:
                continue
            slot = int(self.store.add(f"{prefix}/returned", 1)) - 1
            self.store.set(f"{prefix}/returned{slot}", str(chunk))

    def _compare_with_other_workers(self, epoch: int, order: list[int]) -> None:
        """Fails when this worker's index list for ``epoch`` differs from the first worker's to draw it."""
        if epoch == self._checked_epoch:
            return
        mine = fingerprint(order)
        first = self.store.compare_set(f"{self.key}/epoch{epoch}/fingerprint", "", mine)
        if first != mine.encode():
            raise RuntimeError(
                f"fedhog: `work_sharing='dynamic'` needs every worker to draw the same index list for an epoch, but"
                f" rank {self.rank}'s list for epoch {epoch} differs from another worker's (its sampler gives"
                f" different indices on different workers even when seeded alike, or the data set differs per rank)."
                f" HINT: make the sampler a function of its seed and `set_epoch`, or use `work_sharing='static'`."
            )
        self._checked_epoch = epoch

