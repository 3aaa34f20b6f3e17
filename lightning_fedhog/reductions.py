"""Lightning's DDP collectives for workers that step independently: nothing inside a training batch waits for others.

fedhog's workers never meet during a training step, so anything Lightning would all-reduce there would put every
worker in lock-step with the slowest. :class:`IndependentWorkersDDP` is ``DDPStrategy`` with that taken out;
``FedHogStrategy`` builds on it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.types import ReduceOp
from lightning.pytorch.strategies.ddp import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_fedhog import internals

LOCAL_REDUCE_WARNING = (
    "fedhog: a value logged with `sync_dist=True` inside a training batch is reported for each worker on its own,"
    " because syncing it every step would stall all workers. Epoch-level values (`on_epoch=True`) are still reduced"
    " over all workers at the end of the epoch."
)


class IndependentWorkersDDP(DDPStrategy):
    """``DDPStrategy`` whose reductions inside a training batch stay local, and whose decisions are always reduced."""

    _warned_local_reduce = False

    def _workers_independent(self) -> bool:
        """Whether the workers currently step independently (set up for ``fit``); subclasses say when."""
        return False

    @override
    def reduce(self, tensor: Tensor, group: Any | None = None, reduce_op: ReduceOp | str | None = "mean") -> Tensor:
        """All-reduces ``tensor``, except inside a training batch, where the worker's own value is returned.

        A per-step ``self.log(..., sync_dist=True)`` would put every worker in lock-step, waiting for the slowest
        each step. Values logged per step are therefore the worker's own; values accumulated per epoch are still
        reduced over all workers when the epoch ends, outside the batch.
        """
        trainer = internals.attached_trainer(self.lightning_module)
        independent = self._workers_independent() and trainer is not None and internals.in_training_batch(trainer)
        if isinstance(tensor, Tensor) and independent:
            if not self._warned_local_reduce:
                self._warned_local_reduce = True
                rank_zero_warn(LOCAL_REDUCE_WARNING)
            return tensor
        return super().reduce(tensor, group=group, reduce_op=reduce_op)

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        # decisions (early stopping, ...) must agree on all ranks: always reduce them for real
        total = internals.sync_ddp_if_available(
            torch.tensor(int(decision), device=self.root_device), None, reduce_op=ReduceOp.SUM  # type: ignore[arg-type]
        )
        return bool(total == self.world_size) if all else bool(total)

    def gather_object(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (a collective over all workers), indexed by global rank."""
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def gather_object_to_zero(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` on rank 0 only (None elsewhere): a collective over all workers that moves each
        value once, where :meth:`gather_object` sends every value to every rank."""
        gathered: list[Any] | None = [None] * self.world_size if self.global_rank == 0 else None
        dist.gather_object(value, gathered, dst=0)
        return gathered
