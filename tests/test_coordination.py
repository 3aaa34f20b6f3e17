"""The order of a worker's meetings with the others (consensus, stop, stragglers, telemetry), with fakes."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, NoReturn

import pytest
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_fedhog.consensus import ConsensusPoints
from lightning_fedhog.coordination import Coordination
from lightning_fedhog.faults import FaultWatch, PeerLostError
from lightning_fedhog.stragglers import StragglerWatch
from lightning_fedhog.telemetry import Telemetry
from tests import fakes
from tests.fakes import Calls, FakeCollectives, FakePeers


class StoppedError(Exception):
    """What the fake stop raises, so a test sees that the run ended there."""


class FakeEngine(fakes.FakeEngine):
    """The consensus tests' engine, plus what a worker asks of it between points: its thread's failure, figures."""

    def __init__(self, calls: Calls, thread_error: BaseException | None = None) -> None:
        super().__init__(calls)
        self.thread_error = thread_error

    def raise_if_failed(self) -> None:
        if self.thread_error is not None:
            raise self.thread_error

    def take_stats(self) -> dict[str, float]:
        self.calls.append("engine.take_stats")
        return {"rounds": 1.0}


def _coordination(
    calls: Calls,
    *,
    anyone_stops: bool = False,
    stragglers: bool = True,
    publish: bool = True,
    engine: FakeEngine | None = None,
    training: bool = False,
) -> Coordination:
    """A worker's coordination with fakes around it; ``training``: past ``on_train_start`` (figures and the
    straggler clock started)."""
    clock = iter(float(t) for t in range(1000))
    faults = FaultWatch(
        FakePeers(), rank=0, world_size=2, timeout=timedelta(seconds=60), stop_key="stop", meetings=lambda: 0
    )
    points = ConsensusPoints(
        FakeCollectives(calls, anyone_stops=anyone_stops), faults, engine=lambda: engine,
        settle=lambda: calls.append("settle"), arrive=lambda n: None,
    )

    def gather(what: Any) -> list[Any]:
        calls.append(("gather", "stragglers" if isinstance(what, tuple) else "telemetry"))
        return [what, what]

    def stop() -> NoReturn:
        calls.append("stop")
        raise StoppedError

    watch = StragglerWatch(gather, device=0, devices=2, report=True, clock=lambda: next(clock)) if stragglers else None
    coordination = Coordination(
        points, faults, Telemetry(clock=lambda: next(clock)), gather=gather, stop=stop, engine=lambda: engine,
        publish=(lambda gathered: calls.append(("publish", len(gathered)))) if publish else None,
        stragglers=watch, device=0,
    )
    if training:
        coordination.training_starts()
    return coordination


def test_a_consensus_point_averages_then_gathers_telemetry() -> None:
    calls = Calls()
    engine = FakeEngine(calls)
    coordination = _coordination(calls, engine=engine, training=True)
    coordination.consensus()
    assert calls == [
        "settle", "engine.pause", "agree", "engine.consensus_average", "barrier",
        "engine.take_stats", ("gather", "telemetry"), ("publish", 2),
    ]


def test_an_epoch_end_meeting_agrees_on_a_stop_then_gathers_the_epochs_training_times() -> None:
    calls = Calls()
    coordination = _coordination(calls, training=True)
    coordination.before_batch(batch=[1])
    calls.clear()
    coordination.epoch_ends(0)
    assert calls == ["meet", ("gather", "stragglers")]
    coordination.consensus()  # validation
    calls.clear()
    coordination.epoch_ends(1)  # an epoch in which no batch started (a restart at its end): on every rank alike
    assert calls == ["meet"]


def test_the_second_point_in_a_row_costs_nothing_and_leaving_resumes_the_engine() -> None:
    calls = Calls()
    engine = FakeEngine(calls)
    coordination = _coordination(calls, engine=engine, training=True)
    coordination.consensus()
    calls.clear()
    coordination.consensus()  # validation, then a checkpoint: still parked
    assert calls == []
    coordination.before_batch(batch=[1, 2, 3])
    assert calls == ["agree", "engine.resume", "barrier"]
    assert not coordination.points.at_consensus


def test_before_training_a_point_gathers_nothing() -> None:
    """The sanity check's validation: no rank has telemetry yet, so no rank gathers."""
    calls = Calls()
    coordination = _coordination(calls)
    coordination.consensus()
    assert not any(isinstance(call, tuple) for call in calls)


def test_rank_zero_publishes_and_the_others_only_gather() -> None:
    calls = Calls()
    coordination = _coordination(calls, publish=False, stragglers=False, training=True)
    coordination.consensus()
    assert ("gather", "telemetry") in calls
    assert not any(isinstance(call, tuple) and call[0] == "publish" for call in calls)


def test_a_stop_agreed_at_a_point_stops_before_any_other_collective() -> None:
    calls = Calls()
    coordination = _coordination(calls, anyone_stops=True, training=True)
    with pytest.raises(StoppedError):
        coordination.consensus()
    assert calls[-1] == "stop"
    assert not any(isinstance(call, tuple) for call in calls)  # no gather: peers stop at the same place


def test_a_stop_agreed_when_leaving_a_point_stops_every_rank_there() -> None:
    calls = Calls()
    coordination = _coordination(calls, training=True)
    coordination.consensus()
    coordination.points._collectives.anyone_stops = True  # a peer got SIGTERM while everyone was parked
    calls.clear()
    with pytest.raises(StoppedError):
        coordination.before_batch(batch=[1])
    assert calls == ["agree", "stop"]


def test_a_signal_between_points_meets_the_others_at_the_next_batch_then_stops_at_a_consensus_point() -> None:
    """The meeting pairs with a peer's epoch-end meeting (or its own stop meeting), then every rank runs the point."""
    calls = Calls()
    coordination = _coordination(calls, training=True)
    coordination.faults.request_stop()
    with pytest.raises(StoppedError):
        coordination.before_batch(batch=[1])
    assert calls[:4] == ["meet", "settle", "agree", "barrier"] and calls[-1] == "stop"


def test_every_epoch_ends_with_one_meeting_before_anything_else() -> None:
    calls = Calls()
    coordination = _coordination(calls, stragglers=False, training=True)
    coordination.epoch_ends(0)  # after the last batch
    coordination.epoch_ends(0)  # `on_train_epoch_end`: already met
    assert calls == ["meet"]
    coordination.epoch_ends(1)
    assert calls == ["meet", "meet"]


def test_a_stop_learnt_at_the_epoch_end_meeting_takes_every_rank_to_one_consensus_point_and_stop() -> None:
    """A peer still training got SIGTERM and met this rank at its epoch end: the same sequence follows on both."""
    calls = Calls()
    coordination = _coordination(calls, anyone_stops=True, training=True)
    with pytest.raises(StoppedError):
        coordination.epoch_ends(0)
    assert calls[:4] == ["meet", "settle", "agree", "barrier"] and calls[-1] == "stop"
    assert coordination.faults.stop_requested


def test_a_stop_agreed_while_parked_stops_there_on_every_rank() -> None:
    calls = Calls()
    coordination = _coordination(calls, training=True)
    coordination.consensus()
    coordination.points._collectives.anyone_stops = True
    calls.clear()
    with pytest.raises(StoppedError):
        coordination.epoch_ends(0)
    assert calls == ["meet", "stop"]


@pytest.mark.parametrize(("mine", "peer", "fails"), [(True, False, True), (False, True, True), (True, True, False)])
def test_an_epoch_skipped_on_some_workers_only_fails_on_every_worker(mine: bool, peer: bool, fails: bool) -> None:
    """`on_train_batch_start` returning -1 on some workers: they would skip validation, the others not."""
    calls = Calls()
    coordination = _coordination(calls, stragglers=False, training=True)
    coordination.points._collectives.peer_skips = peer
    if fails:
        with pytest.raises(RuntimeError, match=r"returned -1 .* on 1 of the 2 workers.*HINT"):
            coordination.epoch_ends(0, skipped=mine)
    else:
        coordination.epoch_ends(0, skipped=mine)
    assert calls == ["meet"]


def test_the_training_time_is_read_before_waiting_at_the_epoch_end_meeting() -> None:
    """Static shards: the idle report compares training times; the wait for a straggler happens at the meeting."""
    calls = Calls()
    coordination = _coordination(calls, training=True)
    gathered: list[Any] = []
    coordination.stragglers._gather = lambda mine: gathered.append(mine) or [mine, (mine[0] * 4, 1)]
    coordination.before_batch(batch=[1])  # the first batch starts the clock (at 1: telemetry read 0)
    coordination.epoch_ends(0)  # reads the clock (2), then meets and gathers
    assert gathered == [(1.0, 0)]


def test_a_failed_engine_thread_is_raised_in_the_training_loop() -> None:
    calls = Calls()
    coordination = _coordination(calls, engine=FakeEngine(calls, thread_error=RuntimeError("gloo connection reset")))
    with pytest.raises(PeerLostError, match="average with the other devices"):
        coordination.before_batch(batch=[1])


def test_a_stop_is_not_recorded_as_a_failure_but_an_error_is() -> None:
    calls = Calls()
    coordination = _coordination(calls)
    coordination.failed(SIGTERMException())
    coordination.failed(KeyboardInterrupt())
    assert coordination.faults.peers.marks == []
    coordination.failed(ValueError("bad batch"))
    assert coordination.faults.peers.marks == ["failed"]
    assert coordination.finish() is True  # failed: the end of fit waits for nobody
    assert coordination.faults.peers.marks == ["failed"]
    clean = _coordination(Calls())
    assert clean.finish() is False
    assert clean.faults.peers.marks == ["exited"]
    interrupted = _coordination(Calls())
    interrupted.failed(KeyboardInterrupt())
    assert interrupted.finish() is True  # a Ctrl-C: the launching process kills the workers, nobody waits for them
    assert interrupted.faults.peers.marks == []
