"""A straggler for recipe runs: chosen ranks sleep a fixed time before every training batch.

    python -m recipes.mnist1d fit --trainer.callbacks+=benchmarks.straggler.Straggler \
        --trainer.callbacks.slow_ranks=[1] --trainer.callbacks.seconds=0.004

The sleep is the same whatever the strategy, so DDP, post-local SGD and fedhog face the same hindrance; the
benchmark sets it to the step time of one process training alone (measured once, :class:`StepTimer`), which makes
the slow device about 2x slower. It communicates nothing.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
from typing_extensions import override


class Straggler(L.Callback):
    """Sleeps ``seconds`` before each training batch on the ranks in ``slow_ranks``, from epoch ``from_epoch`` on."""

    def __init__(self, slow_ranks: list[int] | None = None, seconds: float = 0.0, from_epoch: int = 0) -> None:
        self.slow_ranks = set(slow_ranks or [])
        self.seconds = seconds
        self.from_epoch = from_epoch

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        slow = trainer.global_rank in self.slow_ranks and trainer.current_epoch >= self.from_epoch
        if slow and self.seconds > 0:
            time.sleep(self.seconds)


class StepTimer(L.Callback):
    """Writes the median wall-clock of a training step (batch start to batch end) on rank 0 to ``path``."""

    def __init__(self, path: str = "step_time.json") -> None:
        self.path = Path(path)
        self._began = 0.0
        self._seconds: list[float] = []

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._began = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._seconds.append(time.perf_counter() - self._began)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self._seconds:
            warm = self._seconds[len(self._seconds) // 10 :]  # the first steps warm caches up
            self.path.write_text(json.dumps({"median_step_s": statistics.median(warm), "steps": len(warm)}))
