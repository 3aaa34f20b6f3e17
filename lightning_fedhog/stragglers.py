"""Idle devices behind a slow one under equal static shards: measured at epoch ends, then acted on once.

With static shards every worker trains the same number of batches per epoch, so at each epoch end the faster
workers wait for the slowest, as DDP's ranks do at every step. Every worker knows how long it trained in the epoch;
gathered at the epoch-end meeting (:mod:`~lightning_fedhog.coordination`), the spread says how much of the fast
workers' time went to waiting. With ``work_sharing="auto"`` a large enough share turns on dynamic sharing
from the next epoch (:class:`StragglerWatch`); with ``"static"``, or where the run's settings rule dynamic sharing
out, :func:`idle_report` words it once with the fix.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

IDLE_FRACTION = 0.25
"""Act when the fastest worker idled at least this share of the slowest worker's training time (switch to dynamic
sharing under ``"auto"``, else report): above what balanced runs measure over a window, below what a device 1.5x
slower causes (a third); the measurements are in docs/configuration.md."""

WINDOW_SECONDS = 2.0
"""...measured over epochs summed until the slowest worker's training time reaches this long: a single short epoch
is too noisy to judge (docs/configuration.md)."""


def idle_report(busy_seconds: list[float], devices: list[int], blocker: str | None = None) -> str | None:
    """A warning when static shards made the fastest worker idle, else None.

    Args:
        busy_seconds: each rank's training time in the span just measured (index = global rank).
        devices: each rank's device index.
        blocker: why the run cannot switch to dynamic sharing by itself (``work_sharing="auto"``), if it cannot.
    """
    idle = idle_share(busy_seconds, devices)
    if idle is None or idle.fraction < IDLE_FRACTION:
        return None
    return _idle_warning(idle, blocker)


def _idle_warning(idle: IdleShare, blocker: str | None) -> str:
    fix = (
        f"fedhog cannot switch to `work_sharing='dynamic'` by itself here: {blocker}"
        if blocker is not None
        else "HINT: `FedHogStrategy(work_sharing='dynamic')` lets faster devices take more batches so nobody waits"
    )
    return (
        f"fedhog: with equal static shards the workers waited for the slowest at the end of the epoch: {idle}."
        f" {fix} (see the straggler notes in docs/configuration.md)."
    )


@dataclass(frozen=True)
class IdleShare:
    """How long the fastest worker waited for the slowest in one span of training (static shards)."""

    slowest: int
    fastest: int
    longest: float
    shortest: float
    devices: tuple[int, ...]

    @property
    def fraction(self) -> float:
        """The share of the slowest worker's training time the fastest spent waiting."""
        return (self.longest - self.shortest) / self.longest

    def __str__(self) -> str:
        return (
            f"rank {self.slowest} (device {self.devices[self.slowest]}) trained {self.longest:.2f} s since the"
            f" previous meeting, rank {self.fastest} (device {self.devices[self.fastest]}) {self.shortest:.2f} s and"
            f" then idled {self.fraction:.0%} of that time"
        )


def idle_share(busy_seconds: list[float], devices: list[int]) -> IdleShare | None:
    """The fastest worker's idle share, or None where it means nothing (one device, a span too short to judge)."""
    if len(busy_seconds) < 2 or len(set(devices)) < 2:
        return None
    slowest = max(range(len(busy_seconds)), key=busy_seconds.__getitem__)
    fastest = min(range(len(busy_seconds)), key=busy_seconds.__getitem__)
    longest, shortest = busy_seconds[slowest], busy_seconds[fastest]
    if longest < WINDOW_SECONDS:
        return None
    return IdleShare(slowest, fastest, longest, shortest, tuple(devices))


class StragglerWatch:
    """Measures one worker's training time per span and acts once on idle devices (static shards).

    Each worker's training time in an epoch (from its first batch to its last, not counting consensus points) is
    gathered at the epoch-end meeting, where every rank gathers or none does. Epochs are summed into a window until
    the slowest worker's sum reaches :data:`WINDOW_SECONDS`; the same gathered figures make the same decision
    everywhere: with
    ``switch`` (``work_sharing="auto"``), turn on dynamic sharing from the next epoch; otherwise, or when the run's
    settings rule dynamic sharing out, warn once with the measurement and the fix. Either way it then stops
    measuring (one collective fewer per consensus point).

    Args:
        gather: an all-gather of one Python object over every worker (a collective).
        device: this worker's device index among the run's devices.
        devices: devices in the run (nothing to compare with one).
        report: whether this worker writes the report (rank 0).
        clock: injected for tests.
        switch: turns on dynamic sharing from the next epoch; returns None when it did, else why it cannot.
    """

    def __init__(
        self,
        gather: Callable[[Any], list[Any]],
        device: int,
        devices: int,
        report: bool,
        clock: Callable[[], float] = time.monotonic,
        switch: Callable[[], str | None] | None = None,
    ) -> None:
        self._gather = gather
        self._device = device
        self._devices = devices
        self._report = report
        self._clock = clock
        self._switch = switch
        self._since: float | None = None  # the clock when the current stretch of training started
        self._banked = 0.0  # training time of this epoch before a pause (a mid-epoch consensus point)
        self._trained_in_epoch = False
        self.done = False  # acted (warned or switched): no more measuring
        self._window: list[float] = []  # every rank's training time summed over the spans of the current window
        self.last: IdleShare | None = None  # the latest measurement (logged as `fedhog/idle_share`)

    def batch_starts(self) -> None:
        """A training batch starts: the clock runs (from the epoch's first batch, or the first after a pause)."""
        if self._since is None:
            self._since = self._clock()
            self._trained_in_epoch = True

    def pause(self) -> None:
        """A consensus point: validation and checkpoints are not training; the time so far is kept for the epoch."""
        if self._since is not None:
            self._banked += self._clock() - self._since
            self._since = None

    def trained(self) -> float | None:
        """Seconds trained in this epoch so far (read before waiting for the others); None if no batch started,
        which is so on every rank alike (static shards: the same batches everywhere)."""
        if not self._trained_in_epoch:
            return None
        return self._banked + (self._clock() - self._since if self._since is not None else 0.0)

    def take_measured(self) -> float | None:
        """The idle share measured since the last call (``fedhog/idle_share``), if any."""
        measured, self.last = self.last, None
        return measured.fraction if measured is not None else None

    def at_meeting(self, trained: float | None) -> None:
        """Gathers every worker's ``trained`` at the epoch-end meeting (a collective, only after a span of training,
        until acted on), adds it to the window, and acts once when a full window says so."""
        self._since, self._banked, self._trained_in_epoch = None, 0.0, False
        if self.done or trained is None or self._devices < 2:
            return
        busy = self._gather((trained, self._device))
        devices = [device for _, device in busy]
        previous = self._window or [0.0] * len(busy)
        self._window = seconds = [total + mine for total, (mine, _) in zip(previous, busy, strict=True)]
        self.last = idle_share(seconds, devices)
        if self.last is None:  # the window is not full yet
            return
        self._window = []
        log.debug("fedhog: idle share %.3f (%s)", self.last.fraction, self.last)
        if self.last.fraction < IDLE_FRACTION:
            return
        self.done = True
        blocker = self._switch() if self._switch is not None else None
        if self._switch is not None and blocker is None:
            if self._report:
                log.info(
                    "fedhog: with equal static shards the workers waited for the slowest: %s. Work is shared"
                    " dynamically from the next epoch on (`work_sharing='auto'`).", self.last,
                )
            return
        if self._report:  # through logging: advice that a `warnings` filter should not swallow
            log.warning(_idle_warning(self.last, blocker))
