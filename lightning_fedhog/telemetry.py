"""What a worker measures between consensus points, and how the run's figures reach the user's loggers.

Each worker counts its samples and the time it spent parked; each device leader's engine counts its rounds. At a
consensus point every worker's figures are gathered (one collective, which every rank reaches there) and rank 0
logs them through the Trainer's loggers under ``fedhog/``, and shows the averaging rate in the progress bar. No
figure costs anything per step beyond a counter.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities.data import extract_batch_size

from lightning_fedhog.internals import show_in_progress_bar
from lightning_fedhog.metrics import fedhog_metrics

if TYPE_CHECKING:
    import lightning.pytorch as pl


class Telemetry:
    """One worker's figures since the previous consensus point.

    Args:
        clock: injected for tests.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = False
        self._clock = clock
        self._fit_start = self._interval_start = 0.0
        self._samples = 0

    def start(self) -> None:
        """Training starts: figures from now on."""
        self.enabled = True
        self._fit_start = self._interval_start = self._clock()
        self._samples = 0

    def count(self, batch: Any) -> None:
        with contextlib.suppress(Exception):  # a batch whose size Lightning cannot tell just is not counted
            self._samples += extract_batch_size(batch)

    def take(self, device: int, parked_s: float, engine: dict[str, float] | None) -> dict[str, Any]:
        """This worker's figures since the last call (see :func:`~lightning_fedhog.metrics.fedhog_metrics`)."""
        now = self._clock()
        mine = {
            "device": device,
            "samples_per_s": self._samples / max(now - self._interval_start, 1e-9),
            "parked_s": parked_s,
            "engine": engine,
        }
        self._samples, self._interval_start = 0, now
        return mine

    def publish(self, trainer: pl.Trainer, gathered: list[dict[str, Any]]) -> None:
        """Logs every worker's figures (rank 0 calls this) through the Trainer's loggers and the progress bar."""
        metrics = fedhog_metrics(gathered, wall_time=self._clock() - self._fit_start)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if "fedhog/rounds_per_s" in metrics:
            # the progress bar (rank 0's, one for the run) shows the averaging rate next to the user's metrics
            show_in_progress_bar(trainer, "avg_rounds/s", round(metrics["fedhog/rounds_per_s"], 1))
