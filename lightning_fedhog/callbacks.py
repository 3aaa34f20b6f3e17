"""Callbacks that make fedhog runs comparable with other strategies."""

from __future__ import annotations

import time
from collections.abc import Callable

import lightning as L
from typing_extensions import override


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
    """Takes fedhog's consensus point before any user callback or module hook looks at the model.

    Lightning calls callbacks, then the LightningModule, then the strategy at ``on_validation_start`` and
    ``on_train_end``; an EMA callback, a probe or an export there would see a device's own copy while other workers
    still write it. The strategy puts this callback first in ``trainer.callbacks`` for ``fit`` and removes it after.
    A consensus point is a collective: every rank reaches these hooks at the same points, in the same order.
    """

    def __init__(self, consensus: Callable[[], None]) -> None:
        self._consensus = consensus

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._consensus()

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._consensus()
