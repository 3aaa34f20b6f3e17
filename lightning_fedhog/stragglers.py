"""Telling the user once when equal static shards leave devices idle behind a slow one.

With ``work_sharing="static"`` every worker trains the same number of batches per epoch, so at each consensus
point (validation, checkpoint, end of ``fit``) the faster workers wait for the slowest, as DDP's ranks do at every
step. Every worker knows how long it trained since the last consensus point; gathered there, the spread says how
much of the fast workers' time went to waiting, and :func:`idle_report` words it with the fix.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

IDLE_FRACTION = 0.2
"""Report when the fastest worker idled at least this share of the slowest worker's training time."""

MIN_SECONDS = 0.5
"""...and the slowest trained at least this long since the previous consensus point (shorter spans are noise)."""


def idle_report(busy_seconds: list[float], devices: list[int]) -> str | None:
    """A warning when static shards made the fastest worker idle, else None.

    Args:
        busy_seconds: each rank's training time since the previous consensus point (index = global rank).
        devices: each rank's device index.
    """
    if len(busy_seconds) < 2 or len(set(devices)) < 2:
        return None
    slowest = max(range(len(busy_seconds)), key=busy_seconds.__getitem__)
    fastest = min(range(len(busy_seconds)), key=busy_seconds.__getitem__)
    longest, shortest = busy_seconds[slowest], busy_seconds[fastest]
    if longest < MIN_SECONDS or longest <= 0:
        return None
    idle = (longest - shortest) / longest
    if idle < IDLE_FRACTION:
        return None
    return (
        f"fedhog: with equal static shards the workers waited for the slowest at the consensus point: rank"
        f" {slowest} (device {devices[slowest]}) trained {longest:.2f} s since the previous one, rank {fastest}"
        f" (device {devices[fastest]}) {shortest:.2f} s and then idled {idle:.0%} of that time. HINT:"
        f" `FedHogStrategy(work_sharing='dynamic')` lets faster devices take more batches so nobody waits"
        f" (see the straggler notes in docs/configuration.md)."
    )


class StragglerWatch:
    """Measures one worker's training time between consensus points and reports idle devices once (static shards).

    Every rank trained since the last consensus point or none did (leaving one is a collective), so every rank
    gathers at the next one or none does, and the same gathered figures make the same decision everywhere.

    Args:
        gather: an all-gather of one Python object over every worker (a collective).
        device: this worker's device index among the run's devices.
        devices: devices in the run (nothing to compare with one).
        report: whether this worker writes the report (rank 0).
        clock: injected for tests.
    """

    def __init__(
        self,
        gather: Callable[[Any], list[Any]],
        device: int,
        devices: int,
        report: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._gather = gather
        self._device = device
        self._devices = devices
        self._report = report
        self._clock = clock
        self._since: float | None = None
        self._stopped: float | None = None  # the training time when this worker reached the epoch-end meeting
        self.warned = False

    def left_consensus(self) -> None:
        """Training resumes: the clock of this span starts."""
        self._since, self._stopped = self._clock(), None

    def arrived(self) -> None:
        """This worker trained its last batch of the epoch and waits for the others: its training time stops here."""
        if self._since is not None and self._stopped is None:
            self._stopped = self._clock() - self._since

    def trained(self) -> float | None:
        """Seconds trained since leaving the last consensus point (taken before waiting for the others)."""
        if self._since is None:
            return None
        return self._stopped if self._stopped is not None else self._clock() - self._since

    def at_consensus(self, trained: float | None) -> None:
        """Gathers every worker's ``trained`` (a collective, only after a span of training) and reports once."""
        self._since, self._stopped = None, None
        if self.warned or trained is None or self._devices < 2:
            return
        busy = self._gather((trained, self._device))
        report = idle_report([seconds for seconds, _ in busy], [device for _, device in busy])
        if report is not None:
            self.warned = True
            if self._report:  # through logging: advice that a `warnings` filter should not swallow
                log.warning(report)
