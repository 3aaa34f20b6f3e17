"""``averaging_period="auto"``: how many device steps between rounds, chosen from what the engine measures.

A fixed period is a guess that is wrong in both directions: on a thin link rounds take longer than the period's
steps, so blocks are mixed far less often than configured; on a fast link with busy cores each round takes CPU
from the workers (on a 2-core machine, period 16 cost about a fifth of the workers' throughput). Mixing more often
helps accuracy as long as it does not slow the steps, so the self-paced rule spends a *budget*: averaging may cost
at most ``budget`` (5 %) of the workers' throughput.

The engine reports, after each round, how many device steps the workers took while the round was in flight and
in the gap before it. From decayed sums of both it knows the step time with and without a round in flight, and so
the share of throughput a round costs while it runs (``slowdown``). Rounds may then be busy at most
``budget / slowdown`` of the time (a link that costs no CPU allows back-to-back rounds, capped at
:data:`MAX_BUSY` so the step time without a round stays measured), and the period is the number of steps in one
round plus the idle gap that share needs. It adapts when the link or the step time changes: old measurements
decay by half every few rounds.

Every leader proposes its period in the round's control message (one slot per leader) and all use the smallest
proposal. The smallest, not the mean: a leader whose device steps faster reaches its trigger first and waits in
the collective for the others, and that wait looks like a long round to it, longer the longer the period, so its
proposal grows with the period it is given; the slowest device's leader arrives last and measures the round
itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_BUSY = 0.8
"""The largest share of time rounds may take, so that some steps are always taken with no round in flight."""

START_PERIOD = 16
"""The period before anything has been measured (the fixed default)."""

MAX_PERIOD = 4096


@dataclass(frozen=True)
class Pace:
    """Decayed sums of device steps and seconds with a round in flight (``busy``) and without (``idle``), and of
    round seconds. ``decay`` is applied to the old sums at every update, so they weigh the last few rounds."""

    busy_steps: float = 0.0
    busy_s: float = 0.0
    idle_steps: float = 0.0
    idle_s: float = 0.0
    rounds: float = 0.0

    def update(
        self, *, idle_steps: int, idle_s: float, busy_steps: int, busy_s: float, decay: float = 0.8
    ) -> Pace:
        """The sums after one more round: ``idle_*`` from the previous round's end to this one's start,
        ``busy_*`` while this round was in flight.

        A round starts right after the step that made it due, so its window holds on average half a step fewer
        completions than its length at the same rate (the next completion is a whole step away), and the idle
        window, which ends on that step, half a step more. Counted as they are, a round of three steps would
        look 30% slower than the gap before it with no slowdown at all; half a step moves from one to the other.
        """
        return Pace(
            busy_steps=decay * self.busy_steps + busy_steps + 0.5,
            busy_s=decay * self.busy_s + busy_s,
            idle_steps=decay * self.idle_steps + max(idle_steps - 0.5, 0.0),
            idle_s=decay * self.idle_s + idle_s,
            rounds=decay * self.rounds + 1,
        )

    @property
    def slowdown(self) -> float:
        """The share of the workers' throughput lost while a round is in flight (0 when unmeasured)."""
        if self.busy_s <= 0 or self.idle_s <= 0 or self.idle_steps <= 0:
            return 0.0
        idle_rate, busy_rate = self.idle_steps / self.idle_s, self.busy_steps / self.busy_s
        return min(max(1.0 - busy_rate / idle_rate, 0.0), 1.0)

    def period(self, budget: float) -> int:
        """Device steps between the start of one round and the next, so averaging costs at most ``budget`` of the
        throughput; :data:`START_PERIOD` until a round and some steps without one have been measured."""
        if self.rounds <= 0 or self.idle_steps <= 0 or self.idle_s <= 0:
            return START_PERIOD
        round_s = self.busy_s / self.rounds
        slowdown = self.slowdown
        busy_share = MAX_BUSY if slowdown <= 0 else min(MAX_BUSY, budget / slowdown)
        gap_s = round_s * (1.0 / busy_share - 1.0)
        busy_rate = self.busy_steps / self.busy_s if self.busy_s > 0 else 0.0
        idle_rate = self.idle_steps / self.idle_s
        steps = busy_rate * round_s + idle_rate * gap_s
        return min(max(math.ceil(steps), 1), MAX_PERIOD)


def agreed_period(proposals: list[float]) -> int:
    """The period every leader uses: the smallest of the leaders' proposals (non-finite ones ignored)."""
    finite = [value for value in proposals if math.isfinite(value) and value > 0]
    return min(max(math.ceil(min(finite)), 1), MAX_PERIOD) if finite else START_PERIOD
