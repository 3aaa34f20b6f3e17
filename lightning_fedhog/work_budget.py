"""How many chunks (batches) each epoch hands out under dynamic work sharing, and the run's ``max_steps`` budget.

Pure arithmetic, the same on every worker: every worker computes the same numbers from the same inputs (the data's
length, ``limit_train_batches``, ``max_steps`` and what earlier epochs or a checkpoint spent), so no message is
needed to agree on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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

    An epoch hands out at least one chunk per worker: a worker that got none would skip the epoch's hooks and
    collectives (a consensus point, validation, the epoch-end reductions) while the others wait in them. So the
    budget's last epoch is rounded up to one batch per worker when less is left (at most ``world_size - 1`` batches
    more than ``max_steps`` asked, less than one step per worker). An epoch counts as spent once it trains its
    first batch: Lightning sets up a loader (and after an epoch-end checkpoint, a whole pass) that trains nothing.

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
    resumed_trained: int = 0  # chunks of the resumed epoch a rescue found trained (spent, if it resumes in it)

    def left(self) -> int | None:
        """Chunks of the budget not yet handed out at the start of the current epoch (None: no budget)."""
        return None if self.total is None else max(self.total - self.spent, 0)

    def plan(self, epoch: int, available: int) -> tuple[int, int]:
        """``(spent, size)`` once ``epoch`` has begun: the chunks spent before it, and its own number of chunks.

        The size is ``available`` at most, unless rounded up to one chunk per worker; 0 when the budget is spent.
        Asking does not count the epoch as begun (:meth:`begin_epoch` does).
        """
        if epoch == self.epoch:
            return self.spent, self.current
        spent = self.spent
        if self.resumed_epoch is not None:
            if epoch > self.resumed_epoch:
                spent += self.resumed_current
            elif epoch == self.resumed_epoch:
                spent += self.resumed_trained
        elif self.epoch >= 0 and epoch > self.epoch:
            spent += self.current
        left = None if self.total is None else max(self.total - spent, 0)
        size = available if left is None else min(available, left)
        return spent, max(size, self.world_size) if size > 0 else 0

    def begin_epoch(self, epoch: int, available: int) -> tuple[int, bool]:
        """Counts ``epoch`` as begun (when it trains its first batch): its size, and whether it is the budget's last.

        Idempotent for the same epoch.
        """
        if epoch != self.epoch:
            self.spent, self.current = self.plan(epoch, available)
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
        self.resumed_trained = 0
