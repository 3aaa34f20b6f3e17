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

from lightning_fedhog.internals import logging_step, show_in_progress_bar
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
        log_as_lightning_does(trainer, metrics)
        if "fedhog/rounds_per_s" in metrics:
            # the progress bar (rank 0's, one for the run) shows the averaging rate next to the user's metrics
            show_in_progress_bar(trainer, "avg_rounds/s", round(metrics["fedhog/rounds_per_s"], 1))


def log_as_lightning_does(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Logs ``metrics`` through the Trainer's loggers at the step and with the ``epoch`` Lightning gives its own
    rows, so fedhog's figures of an epoch end share a step and an epoch with that epoch's validation metrics."""
    row = {**metrics, "epoch": trainer.current_epoch}
    step = logging_step(trainer)
    for logger in trainer.loggers:
        logger.log_metrics(row, step=step)


class RoundFigures:
    """What a device leader's averaging rounds did since the previous :meth:`take` (the engine thread records,
    the main thread takes while the engine is parked)."""

    def __init__(self, num_blocks: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.consensus_distance = 0.0  # this copy's distance to the mean when the last consensus point began
        self._last_moved = 0.0  # how far the last finished round moved this copy
        self._pause_moved_sq = 0.0  # squared, summed over the rounds finished since a pause was agreed
        self._clock = clock
        self._sums = {"rounds": 0.0, "seconds": 0.0, "bytes": 0.0, "moved_sq": 0.0, "compressed": 0.0}
        self._start = clock()
        self._block_steps = [0] * num_blocks  # device steps at each block's last exchange
        self._stalest = 0  # the most device steps a block went unexchanged, at the rounds since the last take

    def round_done(
        self, block: int, seconds: float, stats: dict[str, float], device_steps: int, compressed: bool = False
    ) -> None:
        """One round of ``block`` took ``seconds``; ``stats`` as the exchange functions fill them; ``compressed``:
        it sent bf16 or int8 codes."""
        self._sums["rounds"] += 1
        self._sums["compressed"] += float(compressed)
        self._sums["seconds"] += seconds
        self._sums["bytes"] += stats.get("bytes", 0.0)
        self._last_moved = stats.get("moved", 0.0)
        self._sums["moved_sq"] += self._last_moved**2
        self._stalest = max(self._stalest, device_steps - self._block_steps[block])
        self._block_steps[block] = device_steps

    def paused_round(self) -> None:
        """The round just finished agreed on a pause, or was drained after one: its move is part of the way to
        the consensus."""
        self._pause_moved_sq += self._last_moved**2

    def consensus(self, moved: float, device_steps: int) -> None:
        """The exact average moved this copy by ``moved``. With the rounds that agreed on the pause (which for
        ``num_blocks=1`` already average the whole vector, so the exact average alone would read about 0) it makes
        the copy's distance to the mean when the consensus point began (rounds of distinct blocks add up as
        orthogonal moves; a block the pause round moved and the average moved again adds a little). Every block is
        then as fresh as at an exchange, at ``device_steps``."""
        self.consensus_distance = (self._pause_moved_sq + moved**2) ** 0.5
        self._pause_moved_sq = 0.0
        self._block_steps = [device_steps] * len(self._block_steps)  # the exact average brought every block up

    def take(self, device_steps: int, period: int) -> dict[str, float]:
        """Rounds/s, bytes/s, seconds per round, the RMS distance a round moved this copy (an estimate of the
        distance to the other copies), the most device steps a block went without an exchange (measured when a round
        refreshed it, or now for a block still waiting: the round that agrees on a pause refreshes a block just
        before every consensus point, so a look at that moment alone would read about 0), the distance to the mean
        at the last consensus, the period in use (the chosen one with ``averaging_period="auto"``) and the share of
        the rounds that sent compressed codes."""
        now = self._clock()
        elapsed = max(now - self._start, 1e-9)
        rounds = self._sums["rounds"]
        result = {
            "rounds": rounds,
            "rounds_per_s": rounds / elapsed,
            "bytes_per_s": self._sums["bytes"] / elapsed,
            "seconds_per_round": self._sums["seconds"] / rounds if rounds else 0.0,
            "round_distance": (self._sums["moved_sq"] / rounds) ** 0.5 if rounds else 0.0,
            "staleness_steps": float(max(self._stalest, *(device_steps - last for last in self._block_steps))),
            "consensus_distance": self.consensus_distance,
            "period": float(period),
            "compression": self._sums["compressed"] / rounds if rounds else 0.0,
        }
        self._sums = dict.fromkeys(self._sums, 0.0)
        self._stalest = 0
        self._start = now
        return result
