"""Compressed rounds and the self-paced period: the math alone, then on thread gloo groups and engine fleets."""

from __future__ import annotations

import time

import pytest
import torch

from lightning_fedhog.compression import INT8_CHUNK, decode, encode, encoded_bytes, exchange_compressed_
from lightning_fedhog.config import FedHogConfig
from lightning_fedhog.self_pacing import MAX_BUSY, START_PERIOD, Pace, agreed_period
from tests.conftest import run_in_threads, thread_groups
from tests.test_averaging import _engine_fleet, _stop_engines  # noqa: F401 - the fixture stops leftover engines


def _values(numel: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(numel, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("codec", ["none", "bf16", "int8"])
@pytest.mark.parametrize("numel", [1, 1000, 3 * INT8_CHUNK + 5])
def test_codecs_round_trip_within_their_step_and_send_the_bytes_they_claim(codec: str, numel: int) -> None:
    values = _values(numel)
    values[: min(numel, 7)] *= 100  # one chunk with a few large values: its step is coarse, the others' fine
    payload = encode(values, codec)  # type: ignore[arg-type]
    assert payload.dtype == torch.uint8 and payload.numel() == encoded_bytes(numel, codec)  # type: ignore[arg-type]
    back = decode(payload, numel, codec)  # type: ignore[arg-type]
    error = (back - values).abs()
    if codec == "none":
        assert torch.equal(back, values)
    elif codec == "bf16":
        assert bool((error <= values.abs() * 2.0**-8).all())
    else:  # half a step of its chunk: max|v| / 254
        padded = torch.nn.functional.pad(values.abs(), (0, -numel % INT8_CHUNK)).view(-1, INT8_CHUNK)
        step = padded.amax(1).repeat_interleave(INT8_CHUNK)[:numel] / 127
        assert bool((error <= step / 2 + 1e-7).all())
    assert torch.equal(decode(encode(torch.zeros(numel), codec), numel, codec), torch.zeros(numel))  # type: ignore[arg-type]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("codec", ["bf16", "int8"])
def test_a_compressed_round_preserves_the_mean_and_keeps_what_it_dropped(world_size: int, codec: str) -> None:
    _store, groups = thread_groups(world_size)
    reference = _values(300, seed=99)
    copies = [reference + _values(300, seed=rank, scale=0.01) for rank in range(world_size)]
    references = [reference.clone() for _ in range(world_size)]
    mean = torch.stack(copies).mean(0)
    before = [copy.clone() for copy in copies]
    controls = run_in_threads(
        lambda r: exchange_compressed_(
            copies[r], references[r], groups[r], world_size, torch.tensor([float(r), 1.0]), codec  # type: ignore[arg-type]
        ),
        world_size,
    )
    assert all(torch.equal(control, torch.tensor([float(sum(range(world_size))), world_size])) for control in controls)
    torch.testing.assert_close(torch.stack(copies).mean(0), mean, rtol=0, atol=1e-6)  # the corrections sum to zero
    assert all(torch.equal(ref, references[0]) for ref in references), "the reference must stay the same everywhere"
    for rank in range(world_size):
        # what quantisation dropped is exactly what stays between the copy and the new reference: it goes out next
        sent = decode(encode(before[rank] - reference, codec), 300, codec)  # type: ignore[arg-type]
        torch.testing.assert_close(copies[rank] - references[rank], before[rank] - reference - sent, rtol=0, atol=1e-6)
        assert float((copies[rank] - references[rank]).abs().max()) <= 0.01 * 4 / 127  # within about a step


@pytest.mark.parametrize("codec", ["bf16", "int8"])
def test_repeated_compressed_rounds_reach_the_exact_mean_nothing_accumulates(codec: str) -> None:
    world_size = 3
    _store, groups = thread_groups(world_size)
    copies = [_values(2000, seed=rank) for rank in range(world_size)]
    references = [torch.zeros(2000) for _ in range(world_size)]
    mean = torch.stack(copies).mean(0)
    control = torch.zeros(1)
    run_in_threads(lambda r: exchange_compressed_(copies[r], references[r], groups[r], 3, control, "none"), 3)
    copies[1].add_(_values(2000, seed=7, scale=0.05))  # device 1 trains a little after the first (exact) round
    mean = mean + _values(2000, seed=7, scale=0.05) / 3
    spreads = []
    for _ in range(6):
        run_in_threads(lambda r: exchange_compressed_(copies[r], references[r], groups[r], 3, control, codec), 3)
        spreads.append(max(float((copy - mean).abs().max()) for copy in copies))
    torch.testing.assert_close(torch.stack(copies).mean(0), mean, rtol=0, atol=1e-5)
    assert spreads[-1] < 1e-5 and spreads[-1] <= spreads[0], f"copies did not converge to the mean: {spreads}"


def test_the_engine_averages_with_int8_after_an_exact_first_round_and_every_leader_agrees() -> None:
    world_size, numel = 2, 4096
    _store, vectors, steps, engines = _engine_fleet(world_size, numel, 2, period=1, compression="int8")
    for engine in engines:
        engine.start()
    for _ in range(400):
        if min(engine.rounds for engine in engines) >= 6:
            break
        for rank, counter in enumerate(steps):
            vectors[rank].add_(1e-3 * (rank + 1))  # the devices keep training apart
            counter[0] += 1
        time.sleep(0.002)
    run_in_threads(lambda r: engines[r].pause(), world_size)
    figures = engines[0].take_stats()
    assert engines[0].rounds >= 6 and len({engine.rounds for engine in engines}) == 1
    # two first rounds (one per block) sent fp32, the rest int8: bytes per round well under fp32's
    fp32_round = 4 * numel / 2
    assert figures["bytes_per_s"] / figures["rounds_per_s"] < 0.6 * fp32_round
    mean = torch.stack(vectors).mean(0)
    run_in_threads(lambda r: engines[r].full_average(), world_size)
    assert torch.equal(vectors[0], vectors[1])
    torch.testing.assert_close(vectors[0], mean)
    assert all(torch.equal(engine._shared.values, vectors[0]) for engine in engines), "a consensus resets the reference"
    run_in_threads(lambda r: engines[r].stop(), world_size)


def test_a_round_that_agrees_on_a_pause_is_not_taken_for_a_slowdown() -> None:
    # the workers park while that round runs: counted, every consensus point would look like a stall, and with few
    # rounds per epoch the period would grow until those rounds were all it measured (seen on a 20 Mbit/s link)
    _store, _vectors, _steps, engines = _engine_fleet(2, 64, 1, period="auto")
    for engine in engines:
        engine.start()
    for _ in range(3):
        run_in_threads(lambda r: (engines[r].pause(), engines[r].full_average(), engines[r].resume()), 2)
    run_in_threads(lambda r: engines[r].pause(), 2)
    assert engines[0].rounds == 4 and engines[0]._pace == Pace()
    run_in_threads(lambda r: engines[r].stop(), 2)


def test_self_paced_leaders_agree_on_one_period_and_report_it() -> None:
    world_size = 2
    _store, _vectors, steps, engines = _engine_fleet(world_size, 64, 1, period="auto")
    for engine in engines:
        engine.start()
    deadline = time.monotonic() + 20
    while min(engine.rounds for engine in engines) < 8 and time.monotonic() < deadline:
        for counter in steps:
            counter[0] += 1
        time.sleep(0.0005)
    run_in_threads(lambda r: engines[r].pause(), world_size)
    assert len({engine.rounds for engine in engines}) == 1 and engines[0].rounds >= 8
    assert engines[0].paced_period == engines[1].paced_period >= 1
    assert engines[0].take_stats()["period"] == engines[0].paced_period
    run_in_threads(lambda r: engines[r].stop(), world_size)


def _paced(step_s: float, step_s_in_round: float, round_s: float, rounds: int = 40) -> Pace:
    """A device stepping every ``step_s`` (``step_s_in_round`` while a round is in flight) and an engine that starts
    a round once the period's steps are done, as the engine does: the pace after ``rounds`` rounds."""
    pace, clock, progress, dt = Pace(), 0.0, 0.0, 1e-4
    ended = (0, 0.0)
    for _ in range(rounds):
        period, start = pace.period(0.05), int(progress)
        while int(progress) - start < period:  # idle until the period's steps are done
            progress += dt / step_s
            clock += dt
        began = (int(progress), clock)
        while clock - began[1] < round_s:  # the round is in flight
            progress += dt / step_s_in_round
            clock += dt
        pace = pace.update(idle_steps=began[0] - ended[0], idle_s=began[1] - ended[1],
                           busy_steps=int(progress) - began[0], busy_s=clock - began[1])
        ended = (int(progress), clock)
    return pace


def test_the_self_paced_period_spends_the_budget() -> None:
    assert Pace().period(0.05) == START_PERIOD  # nothing measured yet
    # a link that costs no CPU (rounds of 3.5 steps): no slowdown is seen, rounds run MAX_BUSY of the time
    free = _paced(step_s=0.02, step_s_in_round=0.02, round_s=0.07)
    assert free.slowdown < 0.05
    assert free.period(0.05) == pytest.approx(3.5 / MAX_BUSY, abs=1.5)
    # rounds that halve the step rate: busy at most 0.05 / 0.5 = 10% of the time, ~0.63 s of steps between rounds
    costly = _paced(step_s=0.02, step_s_in_round=0.04, round_s=0.07)
    assert costly.slowdown == pytest.approx(0.5, abs=0.1)
    assert costly.period(0.05) == pytest.approx(0.07 / 0.04 + 0.63 / 0.02, rel=0.25)
    # the link slows 4x: a few rounds later the period has followed
    pace = free
    for _ in range(12):
        pace = pace.update(idle_steps=4, idle_s=0.08, busy_steps=14, busy_s=0.28)
    assert pace.period(0.05) == pytest.approx(14 / MAX_BUSY, rel=0.2)
    assert agreed_period([7.0, 10.0]) == 7 and agreed_period([0.0, float("inf")]) == START_PERIOD


def test_leaders_of_different_speed_keep_a_short_self_paced_period() -> None:
    # device b steps 2x slower; rounds cost no CPU (a link). Leader a reaches its trigger first and waits in the
    # collective for b: to a that wait looks like a long round, longer the longer the period. With the mean of the
    # proposals the period ran away (past 2,000 steps in a simulation like this one); the smallest stays short.
    step_s, round_s, dt = (0.01, 0.02), 0.05, 1e-4
    paces, progress, starts, ended = [Pace(), Pace()], [0.0, 0.0], [0, 0], [(0, 0.0), (0, 0.0)]
    clock, period = 0.0, START_PERIOD
    for _ in range(40):
        triggered: list[tuple[int, float] | None] = [None, None]
        while None in triggered:
            clock += dt
            for i in (0, 1):
                progress[i] += dt / step_s[i]
                if triggered[i] is None and int(progress[i]) - starts[i] >= period:
                    triggered[i] = (int(progress[i]), clock)
        end = clock + round_s
        while clock < end:
            clock += dt
            progress[0] += dt / step_s[0]
            progress[1] += dt / step_s[1]
        for i in (0, 1):
            began = triggered[i]
            assert began is not None
            paces[i] = paces[i].update(idle_steps=began[0] - ended[i][0], idle_s=began[1] - ended[i][1],
                                       busy_steps=int(progress[i]) - began[0], busy_s=clock - began[1])
            starts[i], ended[i] = began[0], (int(progress[i]), clock)
        period = agreed_period([pace.period(0.05) for pace in paces])
        assert period < 50, f"the self-paced period ran away: {period}"
    assert period <= 10  # b's round holds ~2.5 of its steps: ~3 steps of it at MAX_BUSY




def test_compression_and_auto_are_validated_at_construction() -> None:
    assert FedHogConfig(averaging_period="auto", compression="int8").compression == "int8"
    with pytest.raises(ValueError, match=r"compression='zip'.*HINT: choose one of 'none', 'bf16', 'int8'"):
        FedHogConfig(compression="zip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"compression='int8'.*averaging='gossip'.*HINT"):
        FedHogConfig(compression="int8", averaging="gossip")
    with pytest.raises(ValueError, match=r"averaging_period.*'auto'"):
        FedHogConfig(averaging_period="fast")  # type: ignore[arg-type]
    assert FedHogConfig(averaging_period="auto", averaging_warmup_epochs=1).period_at(0) == 1
    assert FedHogConfig(averaging_period="auto", averaging_warmup_epochs=1).period_at(1) == "auto"
