"""Learning-rate schedules that follow the run's progress, not one worker's step count.

With dynamic work sharing a fast worker takes more optimizer steps than a slow one. A schedule stepped once per
worker step and sized by ``trainer.estimated_stepping_batches`` (the average worker's count) would then run past
its end on the fast worker (a cosine climbs back up, ``OneCycleLR`` raises) and never reach it on the slow one.
:class:`PacedScheduler` steps the wrapped schedule as often as the run as a whole has advanced, measured in the
average worker's steps, so every worker's schedule spans the run and ends with it. All workers write one shared
copy of the parameters (Hogwild!), so the learning rate they apply should be a function of the run's progress.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau


class PacedScheduler:
    """Steps ``scheduler`` up to the run's progress each time Lightning steps it (zero, one or more times).

    Everything else (``optimizer``, ``get_last_lr``, ``state_dict``, ...) is the wrapped scheduler's, so
    checkpoints and ``LearningRateMonitor`` see the scheduler the user configured.

    Args:
        scheduler: the user's per-step scheduler.
        progress: the run's progress in average-worker optimizer steps.
        frequency: the scheduler config's ``frequency`` (Lightning steps it every that many steps).
        total: the number of steps the schedule was sized for (``estimated_stepping_batches``), which it never
            passes; None for no bound.
    """

    def __init__(
        self, scheduler: LRScheduler, progress: Callable[[], float], frequency: int = 1, total: float | None = None
    ) -> None:
        self.scheduler = scheduler
        self._progress = progress
        self._frequency = max(int(frequency), 1)
        self._total = total

    def target(self) -> int:
        """How many times the schedule should have been stepped by now (its ``last_epoch``)."""
        steps = self._progress()
        if self._total is not None and math.isfinite(self._total):
            steps = min(steps, self._total)
        return math.floor(steps / self._frequency)

    def step(self, *args: Any, **kwargs: Any) -> None:
        if args or kwargs:  # an explicit `step(epoch)` (or a metric) sets its own pace: passed on as it is
            self.scheduler.step(*args, **kwargs)
            return
        while self.scheduler.last_epoch < self.target():
            self.scheduler.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scheduler, name)

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict)


def pace_step_schedulers(configs: list[Any], progress: Callable[[], float], total: float | None) -> int:
    """Wraps every ``interval="step"`` scheduler of Lightning's ``lr_scheduler_configs`` in a :class:`PacedScheduler`.

    Returns:
        How many were wrapped. ``ReduceLROnPlateau`` and schedulers that are not ``LRScheduler`` keep their own
        pace (they have no step count to set the pace by).
    """
    wrapped = 0
    for config in configs:
        scheduler = config.scheduler
        pace = isinstance(scheduler, LRScheduler) and not isinstance(scheduler, ReduceLROnPlateau)
        if config.interval == "step" and pace:
            config.scheduler = PacedScheduler(config.scheduler, progress, config.frequency, total)
            wrapped += 1
    return wrapped


def unpace(configs: list[Any]) -> None:
    """Puts the user's own schedulers back (end of ``fit``)."""
    for config in configs:
        if isinstance(config.scheduler, PacedScheduler):
            config.scheduler = config.scheduler.scheduler
