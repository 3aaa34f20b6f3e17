"""``averaging_period="auto"``: how many device steps between rounds, chosen from what the workers lose to them.

A fixed period is a guess that is wrong in both directions: on a thin link rounds take longer than the period's
steps, so blocks are mixed far less often than configured; on a fast link with busy cores each round takes CPU
from the workers. Mixing more often helps accuracy as long as it does not slow the steps, so the self-paced rule
spends a *budget*: averaging may cost at most ``budget`` (5 %) of the workers' throughput.

What a round costs is measured where it lands, in the workers' step rate, by comparing two kinds of window:

- a *quiet* window: every so often the gap after a round is a probe, at least :data:`QUIET_STEPS` device steps
  long, and the step rate is measured in it from the first step completed after that round to the step that
  triggers the next round, so no round is in flight anywhere in it and none of a round's cost spills into it;
- a *cycle*: everything between two probes (rounds, gaps and whatever a round leaves behind in the steps after
  it), at least :data:`CYCLE_STEPS` device steps (the leaders' mean, sent in the rounds' control messages) and
  :data:`MIN_CYCLE_ROUNDS` rounds.

The steps lost in a cycle are those the quiet rate would have taken in its time less those taken, where the quiet
rate is that of the two quiet windows on either side of the cycle: the machine's speed drifts by more than the cost
being measured over a few seconds on busy cores, and a drift that is linear over the cycle cancels
against the windows around it, where it would not against the windows before it alone. Per round, they are what one
round costs, in steps, whatever the reason: CPU taken from the workers, the interpreter lock, a step
stretched by a round shorter than it (a window that counted only the steps completed while a round is in flight
cannot see that one: the stretched step completes after the round). Rounds that cost ``lost`` steps each stay
within the budget when they are ``lost / budget`` steps apart; that is this leader's proposal, sent in the round's
control message, and every leader uses the largest proposal, so the budget holds on every device. A leader that
waits in a round for slower devices loses nothing by it (its workers keep stepping), so waiting is not counted as
cost.

One cycle's estimate is mostly noise (a quiet window varies by as much as the cost sought), so the sums weigh the
last ten or so cycles (:data:`DECAY`), a leader proposes nothing before :data:`MIN_CYCLES` cycles, and a proposal is
at most twice or half the period in use: the period follows a link or step time that changes mid-run within a few
probes, without swinging from 1 to hundreds on one noisy cycle.

Windows start and end at observed step completions, and the time a device is parked (consensus points) is in
neither: a cycle stops at the last completion seen before a pause and restarts at the first one after it. With a
fixed period the same windows are measured (logged as ``fedhog/averaging_cost``), but a probe does not hold a
round back: where rounds outlast the period no quiet window is seen, and no cost is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_fedhog.config import DEFAULT_AVERAGING_PERIOD

START_PERIOD = DEFAULT_AVERAGING_PERIOD
"""The period before anything has been measured (the fixed default)."""

MAX_PERIOD = 4096

QUIET_STEPS = 16
"""The shortest probe: device steps with no round in flight, to measure the step rate without averaging."""

CYCLE_STEPS = 96
"""Device steps between two probes (at least): probes take about a seventh of the time at short periods."""

MIN_CYCLE_ROUNDS = 2

MIN_CYCLES = 3
"""Cycles measured before a leader proposes a period: one cycle's estimate is mostly noise."""

DECAY = 0.9
"""Weight of the past cycles against a new one: the estimate averages about ten cycles."""


@dataclass(frozen=True)
class Pace:
    """Decayed sums over measured cycles: the steps they lost, the steps they took and the rounds they held."""

    lost_steps: float = 0.0
    cycle_steps: float = 0.0
    rounds: float = 0.0
    cycles: int = 0

    def cycle(self, steps: float, seconds: float, rounds: int, quiet_rate: float, decay: float = DECAY) -> Pace:
        """The sums after one more cycle that took ``steps`` in ``seconds`` and held ``rounds`` rounds, where the
        quiet windows around it ran at ``quiet_rate`` steps per second (ignored when any of them is not positive)."""
        if quiet_rate <= 0 or rounds <= 0 or seconds <= 0:
            return self
        lost = quiet_rate * seconds - steps
        return Pace(decay * self.lost_steps + lost, decay * self.cycle_steps + steps, decay * self.rounds + rounds,
                    self.cycles + 1)

    @property
    def cost(self) -> float:
        """The share of the workers' throughput averaging took in the measured cycles (0 when unmeasured)."""
        total = self.cycle_steps + self.lost_steps
        return max(self.lost_steps / total, 0.0) if self.rounds > 0 and total > 0 else 0.0

    def period(self, budget: float) -> int:
        """Device steps between the starts of two rounds, so that averaging costs at most ``budget`` of the
        throughput; :data:`START_PERIOD` until a cycle has been measured against a quiet window."""
        if self.rounds <= 0:
            return START_PERIOD
        lost_per_round = max(self.lost_steps / self.rounds, 0.0)
        return min(max(math.ceil(lost_per_round / budget), 1), MAX_PERIOD)


def agreed_period(proposals: list[float]) -> int:
    """The period every leader uses: the largest of the leaders' proposals (non-finite ones ignored), so that no
    device loses more than the budget."""
    finite = [value for value in proposals if math.isfinite(value) and value > 0]
    return min(max(math.ceil(max(finite)), 1), MAX_PERIOD) if finite else START_PERIOD


Seen = tuple[float, float]
"""An observed device step count and when (monotonic seconds)."""


class SelfPacing:
    """One leader's measuring schedule: which gap is a probe, and the windows that feed its :class:`Pace`.

    The engine reports each gap between rounds (:meth:`gap`: the first and the last step completions it saw in it,
    and its first look at the counters) and each round (:meth:`round`: the agreed pause flag and the leaders' mean
    steps since the last round). Whether the next gap is a probe depends only on those agreed values, so all
    leaders probe in the same gap.

    A cycle is measured in *segments*: one opens at a step completion (or, after a park where no completion was
    seen in the gap, at the engine's first look, which on average falls half a step after a completion) and closes at
    the first completion of the next probe or at the last one seen before a pause. A segment's rounds count only
    when it closes at a completion; one that cannot is dropped with its rounds.
    """

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.pace = Pace()
        self.probing = True  # the gap before the first round: the quiet rate is needed before any cycle counts
        self._cycle_rounds, self._agreed_steps = 0, 0.0  # agreed: the same on every leader
        self._segment: Seen | None = None  # where the open segment began
        self._segment_rounds = 0
        self._cycle = (0.0, 0.0, 0)  # closed segments since the last probe: steps, seconds, rounds
        self._latest: Seen | None = None
        self._quiet: tuple[float, float] | None = None  # the last quiet window: steps, seconds
        self._anchor = START_PERIOD  # the agreed period at the last probe: proposals stay within 2x of it

    def remaining(self, period: int, since_round: int, since_gap: int) -> int:
        """Device steps until the next round is due: ``period`` after the last round started (``since_round``),
        and a probe lasts at least :data:`QUIET_STEPS` after that round ended (``since_gap``), so that even a
        device that reached its period while waiting for the others in the round measures a quiet window."""
        due = period - since_round
        return max(due, QUIET_STEPS + 1 - since_gap) if self.probing else due

    def proposal(self) -> int:
        """This leader's period, at most twice or half the period agreed at the last probe, so a noisy estimate
        moves it step by step (the estimate, and so the proposal, changes only at probes); 0 (no opinion) until it
        has measured :data:`MIN_CYCLES` cycles, so it holds no one back."""
        if self.pace.cycles < MIN_CYCLES or self.pace.rounds <= 0:
            return 0
        return min(max(self.pace.period(self.budget), max(self._anchor // 2, 1)), 2 * self._anchor)

    def gap(self, first: Seen | None, latest: Seen | None, look: Seen, period: int = START_PERIOD) -> None:
        """A gap ended (its round starts): the ``first`` and ``latest`` step completions seen in it, if any, the
        engine's first ``look`` at the counters when it began, and the self-paced ``period`` agreed so far."""
        self._latest = latest
        if self.probing:
            self._anchor = period
            if first is not None:  # the cycle ends with the step that carried the last round's spill-over
                self._close(first)
            self._segment, self._segment_rounds = None, 0
            before, after = self._quiet, None
            if first is not None and latest is not None and latest[0] - first[0] >= QUIET_STEPS // 2:
                after = (latest[0] - first[0], latest[1] - first[1])
            self._quiet = after  # a probe cut short (a pause) leaves no window: the next cycle has one side only
            windows = [window for window in (before, after) if window is not None and window[1] > 0]
            # the quiet rate around the cycle (a drift cancels out); none measured: the cycle is not counted
            rate = sum(w[0] for w in windows) / sum(w[1] for w in windows) if windows else 0.0
            self.pace = self.pace.cycle(*self._cycle, quiet_rate=rate)
            self._cycle, self._cycle_rounds, self._agreed_steps = (0.0, 0.0, 0), 0, 0.0
            self._segment = latest
            self.probing = False
        elif self._segment is None:  # after a park: from the first completion, or half a step after the first look
            self._segment = first if first is not None else (look[0] + 0.5, look[1])

    def round(self, paused: bool, steps: float) -> None:
        """A round ended; ``paused``: it agreed on a pause (the workers park; parked time is in no window);
        ``steps``: the device steps since the previous round, averaged over the leaders (so the same on each)."""
        if paused:
            if self._latest is not None:
                self._close(self._latest)
            self._segment, self._segment_rounds = None, 0
            return
        if self._segment is not None:
            self._segment_rounds += 1
        self._cycle_rounds += 1
        self._agreed_steps += steps
        self.probing = self._cycle_rounds >= MIN_CYCLE_ROUNDS and self._agreed_steps >= CYCLE_STEPS

    def _close(self, end: Seen) -> None:
        """Adds the open segment, up to the completion ``end``, to the cycle (nothing if it has not begun)."""
        start = self._segment
        if start is not None and end[0] >= start[0] and end[1] > start[1]:
            steps, seconds, rounds = self._cycle
            self._cycle = (steps + end[0] - start[0], seconds + end[1] - start[1], rounds + self._segment_rounds)
        self._segment, self._segment_rounds = None, 0
