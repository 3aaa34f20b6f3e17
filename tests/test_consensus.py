"""Consensus points, the stop agreement and failure routing, with fakes: no process, no thread, milliseconds."""

from __future__ import annotations

import signal
from datetime import timedelta

import pytest

from lightning_fedhog.consensus import ConsensusPoints
from lightning_fedhog.engine import AveragingError, NonFiniteError
from lightning_fedhog.faults import SETTLE_SECONDS, FaultWatch, PeerLostError
from tests.fakes import Calls, Clock, FakeCollectives, FakeEngine, FakePeers, FakeStore


def _watch(peers: FakePeers | None = None, clock: Clock | None = None, timeout: float = 30.0) -> FaultWatch:
    clock = clock or Clock()
    return FaultWatch(peers, rank=0, world_size=4, timeout=timedelta(seconds=timeout), stop_key="stop",
                      meetings=lambda: 3, clock=clock, sleep=clock.sleep)


def _points(calls: Calls, faults: FaultWatch, engine: FakeEngine | None = None, **collectives: object):
    return ConsensusPoints(
        FakeCollectives(calls, **collectives), faults, engine=lambda: engine, settle=lambda: calls.append("settle"),
        arrive=lambda n: calls.append(f"arrive {n}"), clock=Clock(),
    )


def test_a_consensus_point_parks_averages_and_costs_one_for_consecutive_points() -> None:
    calls = Calls()
    engine = FakeEngine(calls)
    points = _points(calls, _watch(), engine)
    assert points.enter() is False
    assert calls == ["settle", "arrive 1", "engine.pause", "agree", "engine.consensus_average", "barrier"]
    calls.clear()
    assert points.enter() is None  # validation, then a checkpoint: still parked, nothing to do
    assert calls == []
    assert points.leave() is False
    assert calls == ["arrive 2", "agree", "engine.resume", "barrier"]
    assert not points.at_consensus and points.meetings == 2


def test_the_end_of_fit_makes_a_compressed_point_exact_and_workers_run_the_same_collectives() -> None:
    leader_calls, worker_calls = Calls(), Calls()
    leader = _points(leader_calls, _watch(), FakeEngine(leader_calls))
    worker = _points(worker_calls, _watch(), None)
    for points in (leader, worker):
        points.enter()  # validation: what the rounds send
        points.enter(exact=True)  # the end of fit right after it: made exact, once
        points.enter(exact=True)
    assert leader_calls[-2:] == ["engine.make_exact", "barrier"]
    assert leader_calls.count("engine.make_exact") == 1
    collectives = [call for call in leader_calls if call in ("agree", "barrier")]
    assert collectives == [call for call in worker_calls if call in ("agree", "barrier")]
    started_after = Calls()  # the sanity check's point came before the engine started: nothing to make exact
    late = FakeEngine(started_after)
    points = _points(started_after, _watch(), None)
    points.enter()
    points._engine = lambda: late  # the engine starts running (not parked) with training
    points.enter(exact=True)
    assert "engine.make_exact" not in started_after and started_after[-1] == "barrier"
    fresh = Calls()
    exact = _points(fresh, _watch(), FakeEngine(fresh))
    exact.enter(exact=True)  # a fresh exact point: the exact average, nothing to make exact afterwards
    exact.enter(exact=True)
    assert "engine.full_average" in fresh and "engine.make_exact" not in fresh


def test_a_worker_without_engine_runs_the_same_collectives_as_a_leader() -> None:
    leader_calls, worker_calls = Calls(), Calls()
    leader = _points(leader_calls, _watch(), FakeEngine(leader_calls))
    worker = _points(worker_calls, _watch(), None)
    for points in (leader, worker):
        points.enter()
        points.leave()
    collectives = [call for call in leader_calls if call in ("agree", "barrier")]
    assert collectives == [call for call in worker_calls if call in ("agree", "barrier")]


def test_the_stop_is_agreed_at_the_point_and_every_rank_runs_the_same_collectives() -> None:
    asked, not_asked = _watch(), _watch()
    asked.request_stop(signal.SIGTERM)
    sequences = []
    for faults in (asked, not_asked):
        calls = Calls()
        points = _points(calls, faults, FakeEngine(calls), anyone_stops=True)  # the sum over ranks is 1
        assert points.enter() is True  # every rank learns of the stop inside the same collective
        sequences.append([call for call in calls if call in ("agree", "barrier")])
    assert sequences[0] == sequences[1] == ["agree", "barrier"]


def test_a_stop_agreed_when_leaving_keeps_the_engine_parked() -> None:
    calls = Calls()
    engine = FakeEngine(calls)
    points = _points(calls, _watch(), engine, anyone_stops=False)
    points.enter()
    points._collectives.anyone_stops = True  # another rank received SIGTERM while everybody was parked
    calls.clear()
    assert points.leave() is True
    assert calls == ["arrive 2", "agree"] and engine.parked


def test_an_engine_started_after_the_point_is_not_resumed() -> None:
    calls = Calls()
    engine = FakeEngine(calls)
    points = _points(calls, _watch(), None)
    points.enter()
    points._engine = lambda: engine  # the engine starts at train start, after the sanity-check validation
    calls.clear()
    points.leave()
    assert "engine.resume" not in calls


@pytest.mark.parametrize("fail_at", ["agree", "barrier"])
def test_a_broken_collective_names_the_dead_peer(fail_at: str) -> None:
    peers = FakePeers(dead=[3])
    points = _points(Calls(), _watch(peers), None, fail_at=fail_at)
    with pytest.raises(PeerLostError, match=r'rank 0 could not .* rank \[3\] is dead.*ckpt_path="last"'):
        points.enter()


def test_non_finite_copies_keep_their_own_error_unless_a_peer_is_gone() -> None:
    non_finite = NonFiniteError("non-finite values (NaN/Inf) in the parameters")
    calls = Calls()
    with pytest.raises(NonFiniteError):
        _points(calls, _watch(FakePeers()), FakeEngine(calls, error=non_finite)).enter()
    with pytest.raises(PeerLostError):  # the NaN came from a dying peer: the dead peer is the news
        _points(calls, _watch(FakePeers(dead=[1])), FakeEngine(calls, error=non_finite)).enter()
    with pytest.raises(PeerLostError, match="could not average with the other devices at a consensus point"):
        _points(calls, _watch(FakePeers()), FakeEngine(calls, error=AveragingError("timed out"))).enter()


def test_a_collective_that_broke_early_waits_briefly_for_the_peer_to_be_seen_dead() -> None:
    clock = Clock()
    faults = _watch(FakePeers(), clock, timeout=30.0)
    error = faults.collective_failed("finish the consensus average", RuntimeError("closed"), elapsed=0.1)
    assert clock.now == pytest.approx(100.0 + SETTLE_SECONDS, abs=0.06)  # nobody was seen dead: waited it out
    assert "every peer is alive" in str(error)
    waited = clock.now
    faults.collective_failed("finish the consensus average", RuntimeError("timed out"), elapsed=30.0)
    assert clock.now == waited  # a wait that ran out: the peer is stuck, not dying


def test_watch_names_a_dead_peer_and_relays_a_stop_through_the_store() -> None:
    store, clock = FakeStore(), Clock()
    signalled, other = _watch(FakePeers(store), clock), _watch(FakePeers(store), clock)
    other.watch()
    assert not other.stop_requested
    signalled.request_stop(signal.SIGTERM)
    signalled.watch()
    assert store.keys == {"stop": "0"}
    clock.now += 1.0  # the next look, a second later
    other.watch()
    assert other.stop_requested
    with pytest.raises(PeerLostError, match=r"rank 0 stops: rank \[2\] is dead"):
        clock.now += 1.0
        _watch(FakePeers(dead=[2]), clock).watch()


def test_a_failure_is_recorded_for_the_peers_and_an_exit_only_without_one() -> None:
    peers = FakePeers()
    faults = _watch(peers)
    assert faults.on_failure(RuntimeError("boom"), caused_by_peer=False) is None
    faults.on_exit()
    assert peers.marks == ["failed"] and faults.failed
    clean = FakePeers()
    _watch(clean).on_exit()
    assert clean.marks == ["exited"]
