"""What fedhog reports to the user's logger: pure aggregation of the figures every worker gathered.

Decentralized training hides what DDP users take for granted: do the copies agree, is the averager keeping
up, is a device lagging. These figures answer that, measured at consensus points (once per epoch at most) so
they cost nothing per step.
"""

from __future__ import annotations

from typing import Any

PREFIX = "fedhog/"


def fedhog_metrics(workers: list[dict[str, Any]], wall_time: float) -> dict[str, float]:
    """Turns the per-worker figures of one consensus interval into logger metrics.

    Args:
        workers: one dict per global rank: ``device``, ``samples_per_s``, ``parked_s``, ``idle_share`` (the share
            of the slowest worker's training time the fastest waited, with static shards; None when not measured)
            and, for device leaders, ``engine`` (the averaging engine's :meth:`take_stats`, or None without peers).
        wall_time: seconds since training started, to plot anything against wall-clock.

    Returns:
        Flat ``{"fedhog/...": value}``: run, device and worker samples/s, the longest time a worker was parked,
        and leader figures averaged over devices (staleness: the largest), with the consensus distance per device.
    """
    metrics: dict[str, float] = {
        f"{PREFIX}wall_time_s": wall_time,
        f"{PREFIX}samples_per_s": sum(w["samples_per_s"] for w in workers),
        f"{PREFIX}parked_s": max(w["parked_s"] for w in workers),
    }
    if workers[0].get("idle_share") is not None:  # the same figure on every rank (static shards, while measured)
        metrics[f"{PREFIX}idle_share"] = workers[0]["idle_share"]
    devices: dict[int, float] = {}
    for rank, worker in enumerate(workers):
        metrics[f"{PREFIX}worker{rank}/samples_per_s"] = worker["samples_per_s"]
        devices[worker["device"]] = devices.get(worker["device"], 0.0) + worker["samples_per_s"]
    for device, rate in sorted(devices.items()):
        metrics[f"{PREFIX}device{device}/samples_per_s"] = rate
    leaders = [(w["device"], w["engine"]) for w in workers if w.get("engine")]
    if leaders:
        averaged = (
            "rounds", "rounds_per_s", "bytes_per_s", "seconds_per_round", "round_distance", "consensus_distance",
            "period", "averaging_cost", "compression",
        )
        for key in averaged:
            values = [engine[key] for _, engine in leaders if key in engine]
            if values:
                metrics[f"{PREFIX}{key}"] = sum(values) / len(values)
        metrics[f"{PREFIX}staleness_steps"] = max(engine["staleness_steps"] for _, engine in leaders)
        for device, engine in leaders:
            metrics[f"{PREFIX}device{device}/consensus_distance"] = engine["consensus_distance"]
    return metrics
