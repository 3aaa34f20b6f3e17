"""One worker's part in the run's collective life: consensus points, the agreed stop, stragglers and telemetry.

Between Lightning's hooks a worker trains alone; at a few points it must meet every other worker: before a batch
that follows a consensus point (leave it together, or stop together), and at the consensus points themselves
(validation start, checkpoint save, end of ``fit``). :class:`Coordination` runs those meetings in one fixed order,
the same on every rank whatever its data, speed or timing:

1. at a consensus point: ``ConsensusPoints.enter`` (agree on a stop, average), then the telemetry gather
   (every rank has telemetry once training started);
2. before a batch after a consensus point: ``ConsensusPoints.leave`` (agree again on a stop);
3. once per epoch, after the worker's last batch and before any epoch-end collective of Lightning's or the user's
   (metric syncs, checkpoint decisions, a reloaded validation loader): the epoch-end meeting, a few numbers that
   say whether anyone asked to stop, then (static shards, until acted on) the stragglers' gather of every worker's
   training time. A worker that learns of a stop at a batch start holds the same meeting there.

A stop (SIGTERM on any rank) is agreed inside those collectives, so every rank saves the same checkpoint at the
same point and ends the same way. The epoch-end meeting is what makes that hold when workers are at different
places of an epoch: a worker at its epoch end cannot pass the meeting until every other worker has either trained
its last batch or learnt of the stop, so the stop meeting of a worker still training pairs with it, and after it
every rank runs the same consensus point and stop. The collaborators come in from outside, so the order can be
tested with fakes (tests/test_coordination.py) instead of processes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_fedhog.consensus import AllWorkers, ConsensusPoints
from lightning_fedhog.faults import FaultWatch, PeerLostError
from lightning_fedhog.liveness import PeerRegistry
from lightning_fedhog.rescue import RescueMeeting
from lightning_fedhog.stragglers import StragglerWatch
from lightning_fedhog.telemetry import Telemetry

if TYPE_CHECKING:
    from datetime import timedelta

    from lightning_fedhog.consensus import ParkableEngine

log = logging.getLogger("lightning_fedhog.strategy")  # where users already look for fedhog's diagnoses


class WatchedEngine(Protocol):
    """What a worker asks of its device's averaging engine besides parking it: failures and figures."""

    def raise_if_failed(self) -> None: ...

    def take_stats(self) -> dict[str, float]: ...


class Coordination:
    """Meetings of one worker with all the others, in the order every rank follows.

    Args:
        points: entering and leaving consensus points (collectives over every worker).
        faults: liveness of the peers and this rank's stop flag.
        telemetry: this worker's figures, gathered at each consensus point once training started.
        gather: an all-gather of one Python object over every worker (a collective).
        stop: saves the stop checkpoint and ends ``fit``; called on every rank when the ranks agreed to stop.
        engine: returns this worker's averaging engine (device leaders with peers), else None.
        publish: rank 0 logs the gathered telemetry through the Trainer's loggers; None on other ranks.
        stragglers: with static shards, measures idle devices at each epoch-end meeting; None otherwise.
        device: this worker's device index among the run's devices (telemetry groups by it).
    """

    def __init__(
        self,
        points: ConsensusPoints,
        faults: FaultWatch,
        telemetry: Telemetry,
        *,
        gather: Callable[[Any], list[Any]],
        stop: Callable[[], NoReturn],
        engine: Callable[[], WatchedEngine | None],
        publish: Callable[[list[Any]], None] | None,
        stragglers: StragglerWatch | None,
        device: int,
    ) -> None:
        self.points = points
        self.faults = faults
        self.telemetry = telemetry
        self.stragglers = stragglers
        self._gather = gather
        self._stop = stop
        self._engine = engine
        self._publish = publish
        self._device = device
        self._met_epoch: int | None = None  # the latest epoch whose epoch-end meeting this worker held

    def training_starts(self) -> None:
        """The figures start (at ``on_train_start``, before anything there waits for the other ranks)."""
        self.telemetry.start()

    def before_batch(self, batch: Any) -> None:
        """Looks at the peers; after a consensus point, resumes training with every worker, or stops with them.

        A stop asked between consensus points (SIGTERM here or on a peer) makes a consensus point right away:
        every worker's next batch start comes here too, so every rank reaches it. Then counts the batch and
        raises the averaging engine's error, if its thread failed.
        """
        self.faults.watch()
        if self.points.at_consensus:
            if self.points.leave():
                self._stop()
        elif self.faults.stop_requested:
            self._meet_on_stop()  # pairs with the others' meetings, then a consensus point that ends `fit`
        if self.stragglers is not None:
            self.stragglers.batch_starts()
        self.telemetry.count(batch)
        engine = self._engine()
        if engine is not None:
            self.faults.run_engine_command(engine.raise_if_failed, "average with the other devices")

    def epoch_ends(self, epoch: int, skipped: bool = False) -> None:
        """This worker trained its last batch of ``epoch``: the epoch-end meeting (once per epoch).

        Args:
            skipped: the epoch ended because ``on_train_batch_start`` returned -1 (checked at the meeting).
        """
        if self._met_epoch == epoch:
            return
        self._met_epoch = epoch
        trained = self.stragglers.trained() if self.stragglers is not None else None  # before waiting for anyone
        self._meet_on_stop(skipped)
        if self.stragglers is not None:
            self.stragglers.at_meeting(trained)  # every rank trained in the epoch or none did

    def _meet_on_stop(self, skipped: bool = False) -> None:
        """A few numbers over every worker: if anyone asked to stop, every rank goes on to a consensus point and
        stops there (its checkpoint saved); otherwise nothing more happens."""
        if self.points.meet(skipped):
            self.faults.request_stop()
            if self.points.at_consensus:  # every rank is (points are collectives): stop here, all alike
                self._stop()
            self.consensus()

    def consensus(self, exact: bool = False) -> None:
        """Makes every device hold the same model, the average of all devices' copies, with every worker parked
        (``exact``: the exact average even where the rounds compress, :meth:`ConsensusPoints.enter`).

        Nothing happens when the workers are still parked at the previous point (validation, then a checkpoint),
        but making it exact when asked.
        """
        if self.stragglers is not None:
            self.stragglers.pause()  # validation, checkpoints and waiting here are not training
        stop = self.points.enter(exact)
        if stop is None:
            return
        if stop:
            self._stop()
        if self.telemetry.enabled:
            engine = self._engine()
            mine = self.telemetry.take(
                self._device, self.points.parked_seconds, engine.take_stats() if engine is not None else None
            )
            self.points.parked_seconds = 0.0
            mine["idle_share"] = self.stragglers.take_measured() if self.stragglers is not None else None
            gathered = self._gather(mine)  # a collective at a consensus point: every rank is here
            if self._publish is not None:
                self._publish(gathered)

    def failed(self, error: BaseException) -> None:
        """``fit`` failed on this rank: records why (peers quote it when their collectives break) and logs it.

        A stop on SIGTERM is not a failure: every rank agreed to it. Nor is a Ctrl-C, but nobody waits for a peer
        after one: the launching process kills its workers at once (:mod:`lightning_fedhog.interrupt`).
        """
        if isinstance(error, KeyboardInterrupt):
            self.faults.failed = True  # read by `finish`: the end of `fit` waits for nobody
            return
        if isinstance(error, SIGTERMException):
            return
        diagnosis = self.faults.on_failure(error, caused_by_peer=isinstance(error, PeerLostError))
        if diagnosis:
            log.error("fedhog: rank %d: %s", self.faults.rank, diagnosis)

    def finish(self) -> bool:
        """The end of ``fit``: this rank is marked as gone. Returns whether it failed (then nobody waits for it)."""
        failed = self.faults.failed
        self.faults.on_exit()
        return failed


def meet_peers(
    store: Any,
    key: Callable[[str], str],
    *,
    rank: int,
    device: int,
    slot: int,
    world_size: int,
    timeout: timedelta,
    engine: Callable[[], ParkableEngine | None],
    settle: Callable[[], None],
) -> tuple[PeerRegistry, FaultWatch, ConsensusPoints]:
    """Announces this worker in the run's peer registry and builds its fault watch and consensus points.

    Args:
        store: the default group's store (every worker reaches it).
        key: turns a name into this fit's store key.
        rank, device, slot: this worker's global rank, device index and slot on the device.
        world_size: workers in the run.
        timeout: the run's collective timeout (liveness looks at peers a few times within it).
        engine: this worker's averaging engine, when it has one.
        settle: waits until this worker's queued device work has landed in the shared vector.

    Returns:
        The registry (call ``load`` once every worker announced itself), the fault watch and the consensus points.
    """
    peers = PeerRegistry(store, key("liveness"), PeerRegistry.this_process(rank, device, slot), world_size)
    peers.announce()
    points: ConsensusPoints | None = None
    faults = FaultWatch(
        peers, rank=rank, world_size=world_size, timeout=timeout, stop_key=key("stop"),
        meetings=lambda: points.meetings if points is not None else 0,
        rescue_key=RescueMeeting.started_key(key("rescue")),
    )
    points = ConsensusPoints(AllWorkers(faults.stop_waiting), faults, engine=engine, settle=settle, arrive=peers.arrive)
    return peers, faults, points
