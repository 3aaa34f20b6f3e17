"""``compression="auto"``: rounds send fp32 until the link, not the computation, limits how often blocks are mixed.

Compressed rounds pay for themselves only where bytes are what a round waits for. On a fast link they cost the
workers CPU (encoding, decoding) for nothing, and quantisation adds noise to every mix; on a thin one they mix a
block up to four times as often. Nobody tells a run which link it has, so it finds out from its own rounds:

- **fp32, watching.** A round's *load* is its time over the device steps its period allows
  (``rounds_in_flight x period x seconds per step``): the share of the time the rounds keep the link busy. Above 1
  a round holds back the next one and blocks are mixed less often than asked; well below it, a consensus point or
  anything else that needs the link rarely waits behind a round. After :data:`SWITCH_ROUNDS` rounds in a row with
  load above :data:`SWITCH_LOAD` the leaders try int8.
- **int8, on trial.** :data:`TRIAL_ROUNDS` int8 rounds are timed (only rounds that sent int8 count: each block's
  first compressed round sends fp32, and rounds started before the switch may still finish). If they take at most
  :data:`TRIAL_GAIN` of the fp32 rounds' time, bytes were the limit and int8 stays. If not, the limit was the
  computation (a busy CPU, the interpreter lock): back to fp32, and the next trial waits twice as many rounds as
  the last (from :data:`FIRST_BACKOFF` up to :data:`MAX_BACKOFF`), so a run that cannot gain pays for a trial ever
  more rarely.
- **int8, kept.** If the link frees up, an fp32 round would fit: the int8 load times the slow-down the trial
  measured projects the fp32 load, and after :data:`BACK_ROUNDS` rounds in a row with a projection under
  :data:`BACK_LOAD` (half of :data:`SWITCH_LOAD`: switching back and forth costs a trial each time) the rounds send
  fp32 again.

A round's time runs from its start to the completion of its collective (not to when the engine finishes it, which
with ``rounds_in_flight`` > 1 comes after the next rounds have started). Every leader must send the same sizes in a
round, so the choice is made from figures every leader has: each leader puts its own load and round time in its
slot of the round's control message (:mod:`~lightning_fedhog.rounds`), and
all leaders step the same :class:`CodecChoice` with the smallest of them. The smallest is the right one: a leader
that reached its period first waits in the round for the others, which inflates its round time but says nothing
about the link; the last one to arrive waits for nothing but the bytes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from statistics import median
from typing import Literal

log = logging.getLogger("lightning_fedhog.engine")  # the engine reports its own rounds

AutoCodec = Literal["none", "int8"]
Sent = Literal["none", "bf16", "int8"]

SWITCH_LOAD = 0.25
"""Rounds that keep the link busy more than a quarter of the time are worth a trial: on a fast link they keep it
busy a few percent of the time, and a trial that does not pay costs a few rounds."""

SWITCH_ROUNDS = 2
"""Consecutive busy fp32 rounds before a trial: one slow round (a park, a cold connection) is not a link. Few, since
a short run has few rounds (a 5-epoch MNIST-1D run: about 20)."""

TRIAL_ROUNDS = 3
"""int8 rounds timed in a trial (their median: one outlier does not decide)."""

TRIAL_GAIN = 0.7
"""int8 is kept when its rounds take at most this share of the fp32 rounds' time (bytes alone: about a quarter)."""

BACK_ROUNDS = 16
"""Consecutive int8 rounds whose projected fp32 load is under :data:`BACK_LOAD` before rounds send fp32 again."""

BACK_LOAD = 0.125

FIRST_BACKOFF = 64
"""fp32 rounds after a failed trial before the next trial; doubled after each failed trial."""

MAX_BACKOFF = 4096


@dataclass(frozen=True)
class CodecChoice:
    """What the next rounds send, and what the choice has seen; every leader holds the same one.

    Attributes:
        codec: what rounds started from now on send.
        trial: int8 is being tried (not yet kept).
        streak: consecutive rounds that met the condition for the next move.
        timed: the round times gathered for the next decision (fp32 rounds before a trial, int8 rounds in one).
        exact_seconds: the fp32 round time measured before the last trial.
        slowdown: fp32 over int8 round time, as the last kept trial measured.
        wait: fp32 rounds until a trial may start again.
        backoff: the wait after the next failed trial.
        switches: switches so far (for the log).
    """

    codec: AutoCodec = "none"
    trial: bool = False
    streak: int = 0
    timed: tuple[float, ...] = ()
    exact_seconds: float = 0.0
    slowdown: float = 1.0
    wait: int = 0
    backoff: int = FIRST_BACKOFF
    switches: int = 0

    def after_round(self, load: float, seconds: float, sent: Sent) -> CodecChoice:
        """The choice after one more finished round.

        Args:
            load: the leaders' smallest round time over the steps their period allowed (0: not measured).
            seconds: the leaders' smallest round time (0: not measured).
            sent: what the measured round sent. Only fp32 rounds count while watching and only int8 rounds in a
                trial or once kept: a round measures the codec it sent, whatever the choice was meanwhile.
        """
        if not (math.isfinite(load) and math.isfinite(seconds)):
            return self
        if self.codec == "none":
            return self._watching(load, seconds) if sent == "none" else self
        if sent != "int8":
            return self
        if self.trial:
            return self._trying(seconds)
        return self._kept(load)

    def _watching(self, load: float, seconds: float) -> CodecChoice:
        if self.wait > 0:
            return replace(self, wait=self.wait - 1, streak=0, timed=())
        if load <= SWITCH_LOAD or seconds <= 0:
            return replace(self, streak=0, timed=())
        timed = (*self.timed, seconds)
        if len(timed) < SWITCH_ROUNDS:
            return replace(self, streak=len(timed), timed=timed)
        return replace(
            self, codec="int8", trial=True, streak=0, timed=(), exact_seconds=median(timed),
            switches=self.switches + 1,
        )

    def _trying(self, seconds: float) -> CodecChoice:
        if seconds <= 0:
            return self
        timed = (*self.timed, seconds)
        if len(timed) < TRIAL_ROUNDS:
            return replace(self, timed=timed)
        compressed = median(timed)
        if compressed <= TRIAL_GAIN * self.exact_seconds:
            return replace(self, trial=False, timed=(), slowdown=self.exact_seconds / max(compressed, 1e-9),
                           backoff=FIRST_BACKOFF)
        return replace(self, codec="none", trial=False, timed=(), wait=self.backoff,
                       backoff=min(2 * self.backoff, MAX_BACKOFF), switches=self.switches + 1)

    def _kept(self, load: float) -> CodecChoice:
        if load <= 0 or load * self.slowdown >= BACK_LOAD:
            return replace(self, streak=0)
        if self.streak + 1 < BACK_ROUNDS:
            return replace(self, streak=self.streak + 1)
        return replace(self, codec="none", streak=0, switches=self.switches + 1)


def round_load(seconds: float, seconds_per_step: float, period: int, rounds_in_flight: int) -> float:
    """A round's time over the device steps its period allows (0 when the step time is not measured yet)."""
    allowed = rounds_in_flight * period * seconds_per_step
    return seconds / allowed if allowed > 0 else 0.0


def agreed(values: list[float]) -> float:
    """The leaders' smallest value (the one that waited least); 0 when some leader has not measured it."""
    finite = [value for value in values if math.isfinite(value)]
    return min(finite) if len(finite) == len(values) and finite else 0.0


def report_codec(before: CodecChoice, after: CodecChoice | None) -> None:
    """One line when ``compression="auto"`` changes what the rounds send or keeps int8 after a trial."""
    if after is None or after == before:
        return
    if after.codec == "int8" and before.codec == "none":
        log.info("fedhog: fp32 averaging rounds keep the link busy (%.3f s each, over a quarter of their period):"
                 " trying int8 rounds (`compression='auto'`).", after.exact_seconds)
    elif before.trial and not after.trial and after.codec == "int8":
        log.info("fedhog: int8 rounds are %.1fx as fast as fp32 ones: the link is the limit; rounds send int8"
                 " (`compression='auto'`).", after.slowdown)
    elif before.trial and after.codec == "none":
        log.info("fedhog: int8 rounds were not faster than fp32 ones (%.3f s): the link is not the limit; back to"
                 " fp32 rounds, next try in %d rounds (`compression='auto'`).", before.exact_seconds, after.wait)
    elif before.codec == "int8" and after.codec == "none":
        log.info("fedhog: fp32 rounds would leave the link mostly idle again: rounds send fp32"
                 " (`compression='auto'`).")
