"""``compression="auto"``: the choice alone, then engine fleets on an emulated thin link and on a fast one."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_fedhog.auto_compression import (
    BACK_LOAD,
    BACK_ROUNDS,
    FIRST_BACKOFF,
    SWITCH_LOAD,
    SWITCH_ROUNDS,
    TRIAL_ROUNDS,
    CodecChoice,
    agreed,
    round_load,
)
from lightning_fedhog.config import FedHogConfig
from tests.conftest import engine_fleet, run_in_threads


def _rounds(choice: CodecChoice, count: int, load: float, seconds: float, sent: str = "none") -> CodecChoice:
    for _ in range(count):
        choice = choice.after_round(load, seconds, sent)  # type: ignore[arg-type]
    return choice


def test_a_link_that_holds_rounds_back_is_tried_with_int8_and_kept_when_int8_is_faster() -> None:
    choice = _rounds(CodecChoice(), SWITCH_ROUNDS - 1, load=3.0, seconds=0.3)
    assert choice.codec == "none", "a few slow rounds are not yet a thin link"
    choice = choice.after_round(SWITCH_LOAD, 0.05, "none")  # a round that left the link idle enough
    choice = _rounds(choice, SWITCH_ROUNDS, load=3.0, seconds=0.3)
    assert (choice.codec, choice.trial, choice.exact_seconds) == ("int8", True, 0.3)
    choice = choice.after_round(3.0, 0.3, "none")  # the block's first compressed round sends fp32: not timed
    assert choice.trial and choice.timed == ()
    choice = _rounds(choice, TRIAL_ROUNDS, load=0.8, seconds=0.08, sent="int8")
    assert (choice.codec, choice.trial) == ("int8", False)
    assert choice.slowdown == pytest.approx(0.3 / 0.08)
    # the link stays thin: int8 stays (an fp32 round would take 0.8 x 3.75 = 3x the period)
    assert _rounds(choice, 10 * BACK_ROUNDS, load=0.8, seconds=0.08, sent="int8").codec == "int8"


def test_when_int8_is_not_faster_the_rounds_go_back_to_fp32_and_try_again_ever_more_rarely() -> None:
    choice = _rounds(CodecChoice(), SWITCH_ROUNDS, load=2.0, seconds=0.01)
    choice = _rounds(choice, TRIAL_ROUNDS, load=2.0, seconds=0.009, sent="int8")  # computation-bound: no gain
    assert (choice.codec, choice.wait, choice.backoff) == ("none", FIRST_BACKOFF, 2 * FIRST_BACKOFF)
    waiting = _rounds(choice, FIRST_BACKOFF, load=2.0, seconds=0.01)
    assert waiting.codec == "none" and waiting.wait == 0, "no trial while backing off"
    again = _rounds(waiting, SWITCH_ROUNDS, load=2.0, seconds=0.01)
    assert again.codec == "int8" and again.trial
    failed_twice = _rounds(again, TRIAL_ROUNDS, load=2.0, seconds=0.01, sent="int8")
    assert (failed_twice.codec, failed_twice.wait) == ("none", 2 * FIRST_BACKOFF)
    assert failed_twice.switches == 4


def test_kept_int8_goes_back_to_fp32_once_fp32_rounds_would_leave_the_link_mostly_idle() -> None:
    kept = _rounds(_rounds(CodecChoice(), SWITCH_ROUNDS, 4.0, 0.4), TRIAL_ROUNDS, 1.0, 0.1, sent="int8")
    assert (kept.codec, kept.trial, kept.slowdown) == ("int8", False, 4.0)
    # the link frees up: fp32 rounds would keep it busy a little less than BACK_LOAD of the time
    free = 0.9 * BACK_LOAD / kept.slowdown
    almost = _rounds(kept, BACK_ROUNDS - 1, load=free, seconds=0.005, sent="int8")
    assert almost.codec == "int8"
    assert almost.after_round(1.2 * BACK_LOAD / kept.slowdown, 0.01, "int8").streak == 0
    assert almost.after_round(free, 0.005, "none") == almost, "an fp32 round says nothing about int8's load"
    assert almost.after_round(free, 0.005, "int8").codec == "none"


def test_unmeasured_and_non_finite_figures_never_move_the_choice() -> None:
    choice = _rounds(CodecChoice(), 10, load=0.0, seconds=0.0)
    assert choice == CodecChoice()
    assert CodecChoice().after_round(float("nan"), 1.0, "none") == CodecChoice()
    assert CodecChoice().after_round(9.0, 1.0, "int8") == CodecChoice(), "watching counts fp32 rounds only"
    assert agreed([2.0, 0.0]) == 0.0, "a leader that has not measured holds the choice back"
    assert agreed([3.0, 1.5]) == 1.5, "the leader that waited least speaks for the link"
    assert agreed([]) == 0.0
    assert round_load(0.3, 0.01, period=16, rounds_in_flight=2) == pytest.approx(0.3 / 0.32)
    assert round_load(0.3, 0.0, period=16, rounds_in_flight=1) == 0.0


def test_auto_is_the_default_and_means_fp32_with_gossip() -> None:
    assert FedHogConfig().compression == "auto"
    assert FedHogConfig(averaging="gossip").compression == "auto"
    with pytest.raises(ValueError, match=r"compression='bf16'.*averaging='gossip'.*HINT"):
        FedHogConfig(compression="bf16", averaging="gossip")


class _SlowWork:
    """A collective's work whose ``wait`` returns no earlier than the bytes would take on the emulated link."""

    def __init__(self, work: Any, due: float) -> None:
        self._work, self._due = work, due

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        done = self._work.wait(*args, **kwargs)
        time.sleep(max(self._due - time.monotonic(), 0.0))
        return done


@contextmanager
def _thin_link(monkeypatch: pytest.MonkeyPatch, bytes_per_s: float) -> Iterator[None]:
    """Every all-reduce and all-gather of this process takes at least its bytes over ``bytes_per_s``."""

    def slowed(original: Callable[..., Any], sent: Callable[..., int]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            due = time.monotonic() + sent(*args) / bytes_per_s
            return _SlowWork(original(*args, **kwargs), due)

        return call

    with monkeypatch.context() as patch:
        patch.setattr(dist, "all_reduce", slowed(dist.all_reduce, lambda message, *_: message.nbytes))
        for name in ("all_gather_single", "all_gather_into_tensor"):
            if hasattr(dist, name):
                patch.setattr(dist, name, slowed(getattr(dist, name), lambda out, mine, *_: out.nbytes - mine.nbytes))
        yield


def _train(vectors: list[torch.Tensor], steps: list[list[int]], until: Callable[[], bool], step_s: float) -> None:
    """Both devices step every ``step_s`` (and drift apart) until ``until()`` or 20 s."""
    deadline = time.monotonic() + 20
    while not until() and time.monotonic() < deadline:
        for rank, counter in enumerate(steps):
            vectors[rank].add_(1e-4 * (rank + 1))
            counter[0] += 1
        time.sleep(step_s)


def _kept_or_stuck(engines: list) -> Callable[[], bool]:
    return lambda: all(engine._rounds.choice.codec == "int8" and not engine._rounds.choice.trial
                       for engine in engines) or min(engine.rounds for engine in engines) >= 60


@pytest.mark.parametrize("in_flight", [1, 2])
def test_on_a_thin_link_every_leader_switches_to_int8_and_the_copies_still_meet(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, in_flight: int
) -> None:
    caplog.set_level(logging.INFO, logger="lightning_fedhog.engine")
    world_size, numel = 2, 1 << 14  # 64 kB in fp32: 260 ms a round at 0.25 MB/s, int8 about a quarter
    with _thin_link(monkeypatch, bytes_per_s=2.5e5):
        _store, vectors, steps, engines = engine_fleet(
            world_size, numel, in_flight, period=4, compression="auto", rounds_in_flight=in_flight
        )
        for engine in engines:
            engine.start()
        _train(vectors, steps, _kept_or_stuck(engines), step_s=0.001)
        run_in_threads(lambda r: engines[r].pause(), world_size)
        choices = [engine._rounds.choice for engine in engines]
        assert choices[0] == choices[1], "every leader must hold the same choice"
        assert (choices[0].codec, choices[0].trial) == ("int8", False), choices[0]
        assert choices[0].slowdown > 1 / 0.7
        said = [record.getMessage() for record in caplog.records if record.name == "lightning_fedhog.engine"]
        assert len(said) == 2 and "trying int8" in said[0] and "rounds send int8" in said[1], said  # leader 0 only
        figures = engines[0].take_stats()
        assert 0 < figures["compression"] < 1, "some rounds sent fp32 (before the switch), the later ones int8"
        mean = torch.stack(vectors).mean(0)
        run_in_threads(lambda r: engines[r].full_average(), world_size)
        assert torch.equal(vectors[0], vectors[1])
        torch.testing.assert_close(vectors[0], mean, rtol=0, atol=1e-5)  # the rounds preserved the mean
        assert all(torch.equal(engine._rounds.shared.values, vectors[0]) for engine in engines)
        run_in_threads(lambda r: engines[r].stop(), world_size)


@pytest.mark.parametrize("in_flight", [1, 2])
def test_on_a_fast_link_the_rounds_stay_exact_and_allocate_no_reference(in_flight: int) -> None:
    world_size, numel = 2, 1 << 16
    _store, vectors, steps, engines = engine_fleet(
        world_size, numel, in_flight, period=64, compression="auto", rounds_in_flight=in_flight
    )
    for engine in engines:
        engine.start()
    _train(vectors, steps, lambda: min(engine.rounds for engine in engines) >= 3 * SWITCH_ROUNDS, step_s=0.005)
    run_in_threads(lambda r: engines[r].pause(), world_size)
    assert min(engine.rounds for engine in engines) >= 3 * SWITCH_ROUNDS
    assert all(engine._rounds.choice == engines[0]._rounds.choice for engine in engines)
    assert all(engine._rounds.choice.switches == 0 for engine in engines), engines[0]._rounds.choice
    assert engines[0].take_stats()["compression"] == 0.0
    run_in_threads(lambda r: engines[r].full_average(), world_size)
    assert not any(engine._rounds.shared.allocated for engine in engines), "no fp32 copy where nothing compresses"
    run_in_threads(lambda r: engines[r].stop(), world_size)


def test_exact_rounds_keep_an_existing_reference_so_a_switch_back_to_int8_sends_no_fp32_round() -> None:
    world_size, numel = 2, 3000
    _store, vectors, _steps, engines = engine_fleet(world_size, numel, 2, period=1, compression="auto")
    rounds = [engine._rounds for engine in engines]
    for round_ in rounds:
        assert round_.shared is not None
        round_.shared.values  # noqa: B018 - allocates the reference, as a first switch to int8 would
    controls = [round_.control(False, 0, 0.0, 0.0) for round_ in rounds]
    run_in_threads(lambda r: rounds[r].start(0, 0, controls[r], lambda: 0).finish(), world_size)
    mean = torch.stack(vectors).mean(0)
    assert all(torch.equal(round_.shared.values[:1500], rounds[0].shared.values[:1500]) for round_ in rounds)
    torch.testing.assert_close(rounds[0].shared.values[:1500], mean[:1500])
    assert rounds[0].shared._ready == [True, False]
