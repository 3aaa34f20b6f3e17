"""The averaging engine: a background thread in each device leader that mixes the device's copy with its peers.

Workers never wait for it: it reads the device's step counters, and every ``period`` device steps it exchanges
one block of the shared vector with the other leaders and corrects the live vector in place
(:func:`~lightning_fedhog.averaging.exchange_average_`). It owns a process group that no other thread uses
(two threads on one gloo group deadlock).

Every leader must issue the same collectives in the same order. Rounds are numbered and the block of a round
depends only on its number; pausing is agreed *inside* the round's message: a leader that wants to pause sets a
flag, and in the round where any flag is set, every leader parks. Parked, the engine only does what its main
thread asks, and all main threads ask the same things in the same order at consensus points:
``consensus_average`` or ``full_average`` (:mod:`~lightning_fedhog.consensus_average`: sent as the rounds send, or
exact), perhaps ``make_exact``, then ``resume`` or ``stop``. Whether a command sends anything, and what, depends only
on values every leader holds alike (the agreed codec, the references' readiness, the summed control of the rounds).

With ``rounds_in_flight`` = D > 1, a leader starts round t + D - 1 before it finishes round t, so it learns of a
pause agreed in round t with rounds t + 1 .. t + D - 1 started, on every leader alike: each finishes them, then
parks (:mod:`~lightning_fedhog.rounds`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from lightning_fedhog.auto_compression import report_codec, round_load
from lightning_fedhog.averaging import differing_copies
from lightning_fedhog.blocks import BlockRule, block_bounds, next_block
from lightning_fedhog.compression import Compression
from lightning_fedhog.consensus_average import form_consensus_, restore_residual_
from lightning_fedhog.rounds import InFlight, Rounds
from lightning_fedhog.self_pacing import START_PERIOD, Seen, SelfPacing, agreed_period
from lightning_fedhog.telemetry import RoundFigures
from lightning_fedhog.topology import Topology

if TYPE_CHECKING:
    from lightning_fedhog.config import FedHogConfig

_State = Literal["idle", "running", "parked", "stopped"]


class AveragingError(RuntimeError):
    """The averaging among device leaders failed (a peer gone, stuck or too slow); the message names the leaders."""


class NonFiniteError(AveragingError):
    """A device's copy held NaN/Inf: the round (or the consensus) was not applied anywhere."""


class CopiesDifferError(AveragingError):
    """After a consensus point some device held other bits than the rest: the copies drifted apart unseen."""


_MAX_POLL_SECONDS = 0.05
"""The longest the engine sleeps between two looks at the step counters (how late a round can start)."""


class AveragingEngine:
    """Background, block-wise, in-place averaging of one device's flat vector with the other devices.

    Args:
        flat: the device's shared flat vector.
        device_steps: returns the number of optimizer steps the device's workers have taken so far.
        group: process group of all device leaders, used by this engine's thread only.
        group_ranks: global ranks of the leaders, for error messages.
        num_blocks: the vector is exchanged one of this many blocks per round.
        block_rule: how the block of a round is chosen (:func:`~lightning_fedhog.blocks.next_block`).
        gossip_topology: None for all-reduce rounds; else the peer schedule of pairwise gossip rounds.
        seed: shared by all leaders, for random topologies and block rules.
        on_non_finite: a round in which some leader's block holds NaN/Inf is never applied (the values would
            spread to every device); ``"stop"`` then fails with the leaders named, ``"skip"`` carries on.
        period: device steps between rounds, or ``"auto"`` to choose them from the measured step and round times
            (:mod:`~lightning_fedhog.self_pacing`); the main thread may change it at any time.
        compression: what all-reduce rounds send (:mod:`~lightning_fedhog.compression`; ``"auto"``:
            :mod:`~lightning_fedhog.auto_compression`); consensus points send what the rounds send
            (:mod:`~lightning_fedhog.consensus_average`).
        pacing_budget: with ``period="auto"``, the share of the workers' throughput averaging may cost.
        sole_worker: the leader is its device's only worker, so once its main thread asks for a pause nothing but
            the rounds writes the copy: a block that the round agreeing on the pause leaves in the shared reference,
            with every device so, needs no second exchange at the consensus point.
        rounds_in_flight: rounds started before the oldest is finished (:mod:`~lightning_fedhog.rounds`); more
            than one needs all-reduce rounds, round-robin blocks and at least that many blocks.
        timeout: how long the main thread waits for the engine to park or finish a command.
        poll_interval: the least time between two looks at the step counters.
    """

    def __init__(
        self,
        flat: Tensor,
        device_steps: Callable[[], int],
        group: Any,
        group_ranks: list[int],
        *,
        num_blocks: int,
        period: int | Literal["auto"],
        timeout: timedelta,
        block_rule: BlockRule = "round_robin",
        gossip_topology: Topology | None = None,
        seed: int = 0,
        on_non_finite: Literal["stop", "skip"] = "stop",
        compression: Compression = "none",
        pacing_budget: float = 0.05,
        rounds_in_flight: int = 1,
        poll_interval: float = 0.0005,
        sole_worker: bool = False,
    ) -> None:
        self.flat = flat
        self.period: int | Literal["auto"] = period
        self.paced_period = 0  # with period="auto": the period the leaders agreed on in the last round
        self._pacing = SelfPacing(pacing_budget)  # measures what rounds cost the workers, whatever the period
        self.rounds = 0
        self.error: AveragingError | None = None
        self._device_steps = device_steps
        self._group = group
        self._group_ranks = group_ranks
        self._bounds = block_bounds(flat.numel(), num_blocks)
        self._block_rule = block_rule
        self._seed = seed
        self._on_non_finite = on_non_finite
        self.skipped_rounds = 0
        self.figures = RoundFigures(num_blocks)  # what the rounds did since the last `take_stats`
        self._rounds = Rounds(
            flat, group, len(group_ranks), self._bounds, topology=gossip_topology, seed=seed,
            compression=compression, track_change=block_rule == "largest_change", figures=self.figures,
        )
        # the knobs' rule (`FedHogConfig`): the blocks in flight are distinct all-reduce rounds
        assert rounds_in_flight == 1 or (
            gossip_topology is None and block_rule == "round_robin" and num_blocks >= rounds_in_flight
        ), (rounds_in_flight, gossip_topology, block_rule, num_blocks)
        self._max_in_flight = rounds_in_flight
        self._in_flight: deque[InFlight] = deque()  # started, not yet finished (oldest first)
        self._started = 0  # rounds started (``rounds`` counts the finished ones)
        self._timeout = timeout.total_seconds()
        self._poll_interval = poll_interval
        self._seconds_per_step = 0.0  # measured device step time, to sleep until the next round is near
        self._cond = threading.Condition()
        self._state: _State = "idle"
        self._pause_requested = False
        self._abandon = False
        self._command: str | None = None
        self._commands_done = 0
        self._residual: Tensor | None = None  # after a compressed consensus: what it dropped from this copy
        self._sole_worker = sole_worker
        # blocks whose last round ran with every device frozen for a pause: their average is the shared reference,
        # "exact" or "compressed" (the same on every leader: decided from summed control values)
        self._settled: dict[int, str] = {}
        self._thread = threading.Thread(target=self._run, name="fedhog-averaging", daemon=True)

    @classmethod
    def configured(
        cls, config: FedHogConfig, flat: Tensor, device_steps: Callable[[], int], group: Any, group_ranks: list[int],
        *, period: int | Literal["auto"], sole_worker: bool = False,
    ) -> AveragingEngine:
        """The engine with the run's settings (``num_blocks``, ``block_rule``, gossip, seed, ``nonfinite``)."""
        return cls(
            flat, device_steps, group, group_ranks, num_blocks=config.num_blocks, period=period,
            timeout=config.timeout, block_rule=config.block_rule,
            gossip_topology=config.topology if config.averaging == "gossip" else None, seed=config.seed,
            on_non_finite=config.nonfinite, compression=config.compression, rounds_in_flight=config.rounds_in_flight,
            sole_worker=sole_worker,
        )

    # ----------------------------------------------------------------------------------------------- main thread
    def start(self) -> None:
        """Starts the background rounds."""
        self._state = "running"
        self._thread.start()

    @property
    def parked(self) -> bool:
        return self._state == "parked"

    def pause(self) -> None:
        """Asks all leaders to pause and returns once this engine is parked (after an agreed round)."""
        with self._cond:
            self._pause_requested = True
            self._cond.notify_all()
            self._wait(lambda: self._state in ("parked", "stopped"), "pause the averaging with all peers")

    def full_average(self) -> None:
        """While parked: replaces the whole vector by the exact average over all leaders."""
        self._command_and_wait("full")

    def consensus_average(self) -> None:
        """While parked: every leader ends with the same copy, sent as the rounds send.

        With fp32 rounds it is :meth:`full_average`. When the rounds compress, the copies become
        ``c = r + mean(Q(x_i - r))`` (the same bits everywhere) and each leader keeps what quantisation dropped,
        which :meth:`resume` adds back, so nothing is lost
        (:func:`~lightning_fedhog.consensus_average.consensus_compressed_`).
        """
        self._command_and_wait("consensus")

    def make_exact(self) -> None:
        """While parked after :meth:`consensus_average`: makes the copies the exact average (nothing to do after
        an exact one). The end of ``fit`` hands over the exact average."""
        self._command_and_wait("exact")

    @property
    def lossy_consensus(self) -> bool:
        """Whether the copies hold a compressed consensus whose residual :meth:`resume` will add back."""
        return self._residual is not None

    def resume(self) -> None:
        """While parked: adds back a compressed consensus's residual and restarts the background rounds."""
        self._command_and_wait("resume")

    def stop(self) -> bool:
        """Ends the thread. Parked, it leaves cleanly; otherwise (an error path) it is abandoned without collectives.

        Returns:
            Whether the thread has ended with no collective of its left unfinished (an abandoned thread may leave
            started rounds behind, which a peer may never match); a thread still blocked in a collective ends with
            the process.
        """
        if not self._thread.is_alive():
            return not self._in_flight
        if self._state == "parked":
            self._command_and_wait("stop")
        else:
            with self._cond:
                self._abandon = True
                self._cond.notify_all()
        self._thread.join(timeout=1.0)
        return not self._thread.is_alive() and not self._in_flight

    def take_stats(self) -> dict[str, float]:
        """The averaging figures since the previous call (:meth:`~lightning_fedhog.telemetry.RoundFigures.take`)."""
        figures = self.figures.take(self._device_steps(), self.current_period)
        pace = self._pacing.pace
        return {**figures, "averaging_cost": pace.cost} if pace.rounds > 0 else figures

    @property
    def current_period(self) -> int:
        """Device steps between rounds now: the fixed period, or the one the leaders last agreed on."""
        period = self.period  # read once: the main thread may switch it to "auto" meanwhile (end of warm-up)
        if period != "auto":
            return period
        return self.paced_period or START_PERIOD

    def raise_if_failed(self) -> None:
        """Raises the engine's error in the calling thread, if the background thread has failed."""
        if self.error is not None:
            raise self.error

    def _command_and_wait(self, command: str) -> None:
        with self._cond:
            if self._state != "parked":
                raise AveragingError(f"fedhog: averaging engine must be parked to {command!r}, it is {self._state!r}")
            target = self._commands_done + 1
            self._command = command
            self._cond.notify_all()
            self._wait(lambda: self._commands_done >= target, f"{command} the averaging with all peers")

    def _wait(self, predicate: Callable[[], bool], what: str) -> None:
        # called with self._cond held
        if not self._cond.wait_for(lambda: predicate() or self.error is not None, timeout=self._timeout):
            raise AveragingError(
                f"fedhog: could not {what} within {timedelta(seconds=self._timeout)}; the device leaders at global"
                f" ranks {self._group_ranks} did not all answer. HINT: a peer is slow or gone; raise `timeout`."
            )
        self.raise_if_failed()

    # ---------------------------------------------------------------------------------------- background thread
    def _run(self) -> None:
        try:
            if self.flat.is_cuda:
                torch.cuda.set_device(self.flat.device)
                side = torch.cuda.Stream(self.flat.device)
                side.wait_stream(torch.cuda.default_stream(self.flat.device))  # the vector, as the main thread left it
                with torch.cuda.stream(side):
                    self._loop()
            else:
                self._loop()
        except BaseException as error:
            kind = (
                type(error) if isinstance(error, AveragingError)
                else NonFiniteError if isinstance(error, FloatingPointError) else AveragingError
            )
            with self._cond:
                self.error = kind(
                    f"fedhog: averaging round {self.rounds} among the device leaders at global ranks"
                    f" {self._group_ranks} failed: {error}"
                )
                self.error.__cause__ = error
                self._state = "stopped"
                self._cond.notify_all()

    def _loop(self) -> None:
        last = self._device_steps()
        scores: list[float] | None = None
        in_flight = self._in_flight
        while True:
            gap = self._wait_for_trigger(last)
            if gap is None:
                return
            want_pause, first, latest, look = gap
            auto = self.period == "auto"  # read once: the main thread may change it meanwhile
            self._pacing.gap(first, latest, look, period=self.paced_period or START_PERIOD)
            steps = self._device_steps()  # the period counts device steps from one round's start to the next's
            since, last = steps - last, steps
            block = next_block(
                self._block_rule,
                self._started,
                len(self._bounds),
                seed=self._seed,
                scores=scores,
                last_exchanged=self._rounds.last_round,
            )
            proposal = float(self._pacing.proposal()) if auto else 0.0
            link = (round_load(self._rounds.last_seconds, self._seconds_per_step, self.current_period,
                               self._max_in_flight), self._rounds.last_seconds)
            frozen = want_pause and self._sole_worker
            control = self._rounds.control(want_pause, block, proposal, float(since), link, frozen=frozen)
            in_flight.append(self._rounds.start(block, self._started, control, self._device_steps))
            self._started += 1
            if len(in_flight) < self._max_in_flight:
                continue
            paused, scores = self._finish(in_flight.popleft())
            while self._pacing.probing and in_flight and not paused:  # a probe's gap has no round in flight
                paused, scores = self._finish(in_flight.popleft())
            if paused:
                while in_flight:  # started before the pause was known, by every leader alike: finished alike
                    self._finish(in_flight.popleft(), draining=True)
                if not self._park():
                    return

    def _finish(self, round_: InFlight, draining: bool = False) -> tuple[bool, list[float] | None]:
        """Waits for a started round and acts on its summed control; returns whether it agreed on a pause, and the
        block scores (``"largest_change"``). Rounds finished while draining for a pause count as paused."""
        summed = round_.finish()
        self._synchronize()
        self.rounds += 1
        leaders = len(self._group_ranks)
        bad = [index for index, value in enumerate(summed[1 : 1 + leaders].tolist()) if value > 0]
        if bad:
            self._non_finite(bad, round_.block)
        if round_.reference and not bad and int(summed[-1]) == leaders:  # every device frozen when it started
            self._settled[round_.block] = round_.reference
        else:
            self._settled.pop(round_.block, None)
        if self.period == "auto":
            self.paced_period = agreed_period(summed[1 + leaders : 1 + 2 * leaders].tolist())
        paused = draining or bool(summed[0] > 0)
        if paused:
            self.figures.paused_round()
        self._pacing.round(paused, float(summed[1 + 2 * leaders]) / leaders)
        link_end = 2 + 2 * leaders + self._rounds.link_slots
        before = self._rounds.choice
        self._rounds.agree_codec(summed[2 + 2 * leaders : link_end], round_.measured)
        if before is not None and self._group.rank() == 0:
            report_codec(before, self._rounds.choice)
        scores = summed[link_end:-1].tolist() if summed.numel() > link_end + 1 else None
        return paused, scores

    def _non_finite(self, bad: list[int], block: int) -> None:
        """Some leaders' block was not finite: the round was not applied anywhere; stop or carry on."""
        self.skipped_rounds += 1
        if self._on_non_finite == "stop":
            ranks = [self._group_ranks[index] for index in bad]
            raise FloatingPointError(
                f"non-finite values (NaN/Inf) in block {block} of the parameters of the device(s) led by global"
                f" rank(s) {ranks}. The round was not applied, so no other device received them. HINT: lower the"
                " learning rate or clip gradients (`Trainer(gradient_clip_val=...)`); `nonfinite='skip'` keeps"
                " training and only refuses to average non-finite blocks."
            )

    def _wait_for_trigger(self, last: int) -> tuple[bool, Seen | None, Seen | None, Seen] | None:
        """Blocks until the next round is due; returns whether to ask for a pause, the first and the latest step
        completions seen in the wait and its first look at the counters (for the self-paced period), or None to
        quit.

        The step counters live in memory that other processes write, so nothing can notify this thread of a
        step: it looks at them. Each look costs the training thread of this process the interpreter lock (and,
        with every core busy training, a core), so it sleeps about half the time the remaining steps should take
        at the measured step rate: a handful of looks per round instead of one every ``poll_interval``. A pause
        request wakes it at once. In a probe (see :mod:`~lightning_fedhog.self_pacing`) it looks every twentieth of
        a step around the first completion and the last one, so the quiet window's ends are where the steps are.
        """
        seen_steps, seen_time = self._device_steps(), time.monotonic()
        gap_start, look = seen_steps, (float(seen_steps), seen_time)
        first: Seen | None = None
        latest: Seen | None = None
        probe = self._pacing.probing
        while True:
            steps, now = self._device_steps(), time.monotonic()
            if steps > seen_steps:
                per_step = (now - seen_time) / (steps - seen_steps)
                self._seconds_per_step = per_step if self._seconds_per_step == 0 else (
                    0.5 * self._seconds_per_step + 0.5 * per_step
                )
                seen_steps, seen_time = steps, now
                first, latest = first or (float(steps), now), (float(steps), now)
            period = self.current_period
            remaining = period - (steps - last)
            if self.period == "auto":  # a probe may hold the round back a little longer
                remaining = self._pacing.remaining(period, steps - last, steps - gap_start)
            fine = probe and (first is None or remaining <= 1)
            delay = 0.05 * self._seconds_per_step if fine else 0.5 * remaining * self._seconds_per_step
            delay = min(max(delay, self._poll_interval), _MAX_POLL_SECONDS)
            with self._cond:
                if self._abandon:
                    return None
                if self._pause_requested:
                    return True, first, latest, look
                if remaining <= 0:
                    return False, first, latest, look
                self._cond.wait_for(lambda: self._abandon or self._pause_requested, timeout=delay)

    def _park(self) -> bool:
        """Waits for commands while parked; returns False when told to stop."""
        with self._cond:
            self._state = "parked"
            self._cond.notify_all()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._command is not None or self._abandon)
                if self._abandon:
                    return False
                command, self._command = self._command, None
            pending, self._residual = self._residual, None  # any command ends a compressed consensus
            settled, self._settled = ({} if pending is not None else self._settled), {}
            if pending is not None:
                restore_residual_(self.flat, pending)
                self._synchronize()
            if command == "full" or (command == "exact" and pending is not None):
                self._consensus(exact=True, settled=settled)
            elif command == "consensus":
                self._consensus(exact=False, settled=settled)
            with self._cond:
                if command == "resume":
                    self._pause_requested = False
                    self._state = "running"
                elif command == "stop":
                    self._state = "stopped"
                self._commands_done += 1
                self._cond.notify_all()
            if command in ("resume", "stop"):
                return command == "resume"

    def _consensus(self, exact: bool, settled: dict[int, str]) -> None:
        """Forms the consensus (:func:`~lightning_fedhog.consensus_average.form_consensus_`): exact, or sent as the
        rounds send, and without a second exchange of the blocks in ``settled``."""
        codec = "none" if exact else self._rounds.consensus_codec
        shared = self._rounds.shared
        reference = shared.values if shared is not None and shared.allocated else None
        moved, self._residual = form_consensus_(
            self.flat, self._group, len(self._group_ranks), self._bounds, codec, reference, settled
        )
        self._consensus_formed(moved, exact=codec == "none")

    def _consensus_formed(self, moved: float | None, exact: bool) -> None:
        if moved is None:  # a consensus cannot be formed from non-finite copies: always stop
            raise FloatingPointError(
                "non-finite values (NaN/Inf) in the parameters of at least one device at a consensus point;"
                " the average was not formed and every device keeps its own copy. HINT: lower the learning"
                " rate or clip gradients (`Trainer(gradient_clip_val=...)`)."
            )
        self._check_identical()
        self._synchronize()
        self.figures.consensus(moved, self._device_steps())
        self._rounds.consensus_done(exact)

    def _check_identical(self) -> None:
        """After a consensus average every device must hold the same bits; a few bytes per leader prove it. A copy
        that differs (a worker still writing, a collective that returned different results on different leaders)
        would otherwise train on silently, and the model validated and saved would depend on the device."""
        differ = differing_copies(self.flat, self._group, len(self._group_ranks))
        if differ:
            ranks = [self._group_ranks[index] for index in differ]
            raise CopiesDifferError(
                f"after a consensus average the model copies of the device(s) led by global rank(s) {ranks} differ"
                " from the other devices'. Nothing should write the parameters while every worker is parked at a"
                " consensus point. HINT: look for a thread or callback that changes parameters outside"
                " `training_step`/`optimizer.step` (e.g. an EMA callback updating them in place); please report it"
                " with the model if there is none."
            )

    def _synchronize(self) -> None:
        if self.flat.is_cuda:
            torch.cuda.current_stream(self.flat.device).synchronize()
