"""Callbacks that make fedhog runs comparable with other strategies."""

from __future__ import annotations

import time

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
