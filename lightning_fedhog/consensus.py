"""Consensus points: every worker parked, every device holding the same average, and the stop agreed there.

Lightning looks at the model at validation start, checkpoint save and the end of ``fit``; there every device must
hold the same model, the average of the devices' copies (exact at the end of ``fit``; while rounds compress, within
quantisation error of it: :mod:`~lightning_fedhog.consensus_average`), and nobody may write it. A consensus point is a
collective over all workers, which Lightning reaches at the same points on every rank. Workers stay parked until
their next training batch, so consecutive consensus points (validate, then checkpoint) cost one.

Stopping (SIGTERM) is decided inside a collective that every rank reaches at the same consensus point, never by a
separate message: all ranks then save the same checkpoint and stop at the same point.

The order at each point is the same on every rank: this module issues ``agree`` and ``barrier`` only, in a fixed
sequence that depends on nothing a rank knows alone (tests/test_consensus.py checks it with fakes).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

import torch
import torch.distributed as dist

from lightning_fedhog.faults import FaultWatch


class Collectives(Protocol):
    """The collectives over all workers that consensus points and the epoch-end meeting use."""

    def agree(self, flag: bool) -> bool:
        """True on every rank when any rank passed True (a sum all-reduce of one number)."""

    def count(self, flags: tuple[bool, ...]) -> tuple[int, ...]:
        """How many ranks passed True, per flag (a sum all-reduce of a few numbers)."""

    def barrier(self, name: str) -> None: ...


class AllWorkers:
    """:class:`Collectives` over the default process group (gloo, CPU tensors), which every worker belongs to.

    A gloo collective with a dead member only fails on the ranks that talk to it directly; the others wait for the
    run's ``timeout`` (30 minutes by default). So the wait looks at the peers a few times a second (``give_up``):
    once a peer is seen dead, or another worker started a rescue (:mod:`~lightning_fedhog.rescue`), this worker
    stops waiting and fails with the reason, and can take part in the rescue.

    Args:
        give_up: why this worker should stop waiting for a collective (None: keep waiting).
        look_every: seconds between two calls of ``give_up`` while a collective waits.
    """

    def __init__(self, give_up: Callable[[], str | None] | None = None, look_every: float = 0.25) -> None:
        self._give_up = give_up
        self._look_every = look_every

    def agree(self, flag: bool) -> bool:
        return self.count((flag,))[0] > 0

    def count(self, flags: tuple[bool, ...]) -> tuple[int, ...]:
        totals = torch.tensor([float(flag) for flag in flags])
        self._run(lambda: dist.all_reduce(totals))
        return tuple(int(total) for total in totals.tolist())

    def barrier(self, name: str) -> None:
        self._run(dist.barrier)

    def _run(self, collective: Callable[[], object]) -> None:
        """Runs ``collective`` in a helper thread while this one looks at the peers (a gloo collective cannot be
        polled: asking whether it completed blocks while it runs). A collective given up on stays blocked in its
        thread until it fails, which it does once the ranks it waits for exit."""
        if self._give_up is None:
            collective()
            return
        failure: list[BaseException] = []
        done = threading.Event()

        def run() -> None:
            try:
                collective()
            except BaseException as error:  # re-raised in the calling thread
                failure.append(error)
            finally:
                done.set()

        threading.Thread(target=run, name="fedhog-collective", daemon=True).start()
        while not done.wait(self._look_every):
            if (reason := self._give_up()) is not None:
                raise RuntimeError(reason)
        if failure:
            raise failure[0]


class ParkableEngine(Protocol):
    """What a consensus point asks of the device leader's averaging engine."""

    @property
    def parked(self) -> bool: ...

    def pause(self) -> None: ...

    def full_average(self) -> None: ...

    def consensus_average(self) -> None: ...

    def make_exact(self) -> None: ...

    def resume(self) -> None: ...


class ConsensusPoints:
    """Entering and leaving consensus points for one worker.

    Args:
        collectives: ``agree`` and ``barrier`` over every worker of the run.
        faults: turns failed collectives and engine commands into errors that name the lost peer, and holds the
            stop flag.
        engine: returns this worker's averaging engine (device leaders with peers), else None.
        settle: waits until this worker's queued device work has landed in the shared vector (CUDA streams).
        arrive: marks the n-th consensus point reached, so a rank that waits in vain can name who never came.
        clock: injected for tests.
    """

    def __init__(
        self,
        collectives: Collectives,
        faults: FaultWatch,
        *,
        engine: Callable[[], ParkableEngine | None],
        settle: Callable[[], None],
        arrive: Callable[[int], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.at_consensus = False
        self._exact = False  # the copies at this consensus point are the exact average
        self.meetings = 0  # consensus points met so far in this fit (the same count on every rank)
        self.parked_seconds = 0.0
        self._collectives = collectives
        self._faults = faults
        self._engine = engine
        self._settle = settle
        self._arrive_at = arrive
        self._clock = clock

    def enter(self, exact: bool = False) -> bool | None:
        """Parks every worker and leaves the same model on every device.

        Args:
            exact: the exact average, whatever the rounds send (the end of ``fit``). Otherwise a consensus point
                sends what the rounds send: with compressed rounds every device holds the same model within
                quantisation error of the exact average, and what that drops is added back when training resumes
                (:meth:`~lightning_fedhog.engine.AveragingEngine.consensus_average`).

        Returns:
            None when this worker is still parked at the previous consensus point (nothing was done but, if
            ``exact`` and that point was not, making it exact); else whether the ranks agreed to stop here.
        """
        if self.at_consensus:
            if exact and not self._exact:
                self._make_exact()
            return None
        began = self._clock()
        self._settle()  # this worker's last optimizer step has landed before the average is taken
        self._arrive()
        engine = self._engine()
        if engine is not None:
            self._faults.run_engine_command(engine.pause, "pause the averaging with the other devices")
        stop = self._agree("park the workers for a consensus point")
        if engine is not None:
            average = engine.full_average if exact else engine.consensus_average
            self._faults.run_engine_command(average, "average with the other devices at a consensus point")
        self._collective("finish the consensus average", lambda: self._collectives.barrier("fedhog-consensus"))
        self.at_consensus, self._exact = True, exact
        self.parked_seconds += self._clock() - began
        return stop

    def _make_exact(self) -> None:
        """Still parked: the devices' copies become the exact average (a no-op for the engines when the point
        already was), then every worker waits until its device's copy is (the same barrier on every rank). An
        engine started after the point (the sanity check's comes before training starts) has nothing to make
        exact, on every leader alike."""
        engine = self._engine()
        if engine is not None and engine.parked:
            self._faults.run_engine_command(engine.make_exact, "average exactly with the other devices")
        self._collective("finish the exact average", lambda: self._collectives.barrier("fedhog-consensus-exact"))
        self._exact = True

    def leave(self) -> bool:
        """Resumes training after a consensus point, once every worker has finished with the consensus model.

        The leaders' engines first add back what a compressed consensus left aside; a barrier then keeps every
        worker from stepping before its device's copy is whole again (a step racing the add-back could lose part
        of it).

        Returns:
            Whether the ranks agreed to stop instead (the engine then stays parked).
        """
        self._arrive()
        if self._agree("resume training after a consensus point"):
            return True
        engine = self._engine()
        if engine is not None and engine.parked:  # not parked: started after the consensus point
            self._faults.run_engine_command(engine.resume, "resume the averaging with the other devices")
        self._collective("resume training", lambda: self._collectives.barrier("fedhog-resume"))
        self.at_consensus = False
        return False

    def meet(self, skipped: bool = False) -> bool:
        """Whether any worker asked to stop: a few numbers over every worker, without parking or averaging.

        A collective that every worker runs once per epoch after its last batch (and at a batch start when it knows
        of a stop), so a stop is agreed before any epoch-end collective, whatever a worker's place in its epoch.

        Args:
            skipped: this worker's epoch ended because ``on_train_batch_start`` returned -1. Lightning then skips the
                epoch's validation on that rank only, so unless every rank skipped, the ranks' collectives would part
                ways right after this meeting: every rank fails here instead, with the reason.
        """
        began = self._clock()
        self._arrive()
        stops, skips, ranks = self._counted(
            "meet the other workers at the end of the epoch", (self._faults.stop_requested, skipped, True)
        )
        self.parked_seconds += self._clock() - began
        if not stops and 0 < skips < ranks:
            raise RuntimeError(
                f"fedhog: `on_train_batch_start` returned -1 (skip the rest of the epoch) on {skips} of the {ranks}"
                f" workers in this epoch but not on the others; Lightning then skips validation on those workers only,"
                f" and the workers would wait for each other in different collectives. HINT: return -1 on every worker"
                f" in the same epoch (a condition on the epoch or on a value synced over workers, not on `batch_idx`,"
                f" which differs between workers), or end training with `trainer.should_stop = True`."
            )
        return stops > 0

    def reset(self) -> None:
        """A new ``fit``: no consensus point met yet."""
        self.at_consensus, self.meetings, self.parked_seconds = False, 0, 0.0

    def _arrive(self) -> None:
        self.meetings += 1
        self._arrive_at(self.meetings)

    def _agree(self, what: str) -> bool:
        stop = self._faults.stop_requested
        return self._collective(what, lambda: self._collectives.agree(stop))

    def _counted(self, what: str, flags: tuple[bool, ...]) -> tuple[int, ...]:
        began = self._clock()
        try:
            return self._collectives.count(flags)
        except RuntimeError as error:
            raise self._faults.collective_failed(what, error, elapsed=self._clock() - began) from error

    def _collective(self, what: str, call: Callable[[], bool | None]) -> bool:
        began = self._clock()
        try:
            return bool(call())
        except RuntimeError as error:
            raise self._faults.collective_failed(what, error, elapsed=self._clock() - began) from error
