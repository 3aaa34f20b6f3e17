"""Telling the user once when equal static shards leave devices idle behind a slow one.

With ``work_sharing="static"`` every worker trains the same number of batches per epoch, so at each consensus
point (validation, checkpoint, end of ``fit``) the faster workers wait for the slowest, as DDP's ranks do at every
step. Every worker knows how long it trained since the last consensus point; gathered there, the spread says how
much of the fast workers' time went to waiting, and :func:`idle_report` words it with the fix.
"""

from __future__ import annotations

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
