"""Callbacks that make fedhog runs comparable with other strategies."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning as L
from typing_extensions import override

from lightning_fedhog import internals


class WallClock(L.Callback):
    """Logs ``wall_time_s`` (seconds since ``fit`` started) at the end of every training epoch, on rank 0.

    fedhog logs ``fedhog/wall_time_s`` itself; add this callback to a DDP (or any) run so that
    ``python -m lightning_fedhog.plot`` can draw both against wall-clock time. It communicates nothing.
    """

    def __init__(self) -> None:
        self._start = 0.0

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"wall_time_s": time.monotonic() - self._start}, step=trainer.global_step)


class ConsensusFirst(L.Callback):
    """Takes fedhog's meetings before any user callback or module hook: consensus points and the epoch-end meeting.

    Lightning calls callbacks, then the LightningModule, then the strategy at ``on_validation_start`` and
    ``on_train_end``; an EMA callback, a probe or an export there would see a device's own copy while other workers
    still write it. The epoch-end meeting (where a stop is agreed) must come before any epoch-end collective, the
    first of which can be a reloaded validation loader's set-up, right after the last batch. The strategy puts this
    callback first in ``trainer.callbacks`` for ``fit`` and removes it after. These are collectives: every rank
    reaches these hooks at the same points, in the same order.

    Args:
        consensus: the consensus point (``consensus(True)``: the exact average).
        epoch_ends: this worker's epoch ends: ``epoch_ends(epoch, skipped)`` meets the others (once per epoch);
            ``skipped``: the epoch ended because ``on_train_batch_start`` returned -1.
        epoch_over: the epoch's validation is over too (``on_train_epoch_end``).
    """

    def __init__(
        self, consensus: Callable[..., None], epoch_ends: Callable[[int, bool], None], epoch_over: Callable[[], None]
    ) -> None:
        self._consensus = consensus
        self._epoch_ends = epoch_ends
        self._epoch_over = epoch_over

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if internals.epoch_ends_after_this_batch(trainer):
            self._epoch_ends(trainer.current_epoch, False)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # no batch end said so: the epoch's last batch was skipped (`on_train_batch_start` returned -1), or a stop
        # was set after the last batch end
        self._epoch_ends(trainer.current_epoch, internals.skipped_rest_of_epoch(trainer))
        self._epoch_over()

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._consensus()

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._consensus(True)  # the model `fit` hands over is the exact average
