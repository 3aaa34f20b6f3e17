"""Averaging math and the engine's protocol, with ranks as threads on real gloo groups."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch

import lightning_fedhog.averaging as averaging
from lightning_fedhog.averaging import all_finite, apply_average_delta_, exchange_average_, exchange_with_peer_
from lightning_fedhog.engine import AveragingEngine
from tests.conftest import engine_fleet, run_in_threads, thread_groups


def test_finite_check_finds_nan_and_inf_and_no_false_alarm_while_a_worker_writes() -> None:
    assert all_finite(torch.tensor([0.0, -1e38, 3.0]))
    assert not all_finite(torch.tensor([0.0, float("nan")]))
    assert not all_finite(torch.tensor([float("-inf"), 1.0]))
    # a Hogwild! worker keeps changing finite values; `torch.isfinite` reads each element three times and then
    # reports some of them as non-finite (31 of 2,000 checks here), which stopped benchmark runs for nothing
    live = torch.zeros(1 << 16)
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            live.add_(1.0)
            live.sub_(0.5)

    thread = threading.Thread(target=worker, name="fedhog-test-writer")
    thread.start()
    try:
        alarms = sum(not all_finite(live) for _ in range(2000))
    finally:
        stop.set()
        thread.join()
    assert alarms == 0


def test_delta_keeps_updates_made_during_the_exchange() -> None:
    snapshot = torch.tensor([1.0, 2.0, 3.0])
    averaged = torch.tensor([2.0, 2.0, 2.0])
    live = snapshot + torch.tensor([0.5, 0.0, -1.0])  # a worker stepped while the message was in flight
    apply_average_delta_(live, snapshot, averaged)
    assert torch.equal(live, averaged + torch.tensor([0.5, 0.0, -1.0]))


@pytest.mark.parametrize("world_size", [2, 3])
def test_exchange_preserves_the_mean_and_sums_flags(world_size: int) -> None:
    _store, groups = thread_groups(world_size)
    vectors = [torch.randn(50, generator=torch.Generator().manual_seed(rank)) for rank in range(world_size)]
    mean = torch.stack(vectors).mean(0)
    controls = run_in_threads(
        lambda r: exchange_average_(vectors[r], groups[r], world_size, torch.tensor([float(r == 1), r])), world_size
    )
    expected = torch.tensor([1.0, sum(range(world_size))])
    assert all(torch.equal(control, expected) for control in controls)
    for vector in vectors:
        torch.testing.assert_close(vector, mean)


@pytest.mark.parametrize(
    ("world_size", "engine_kwargs"),
    [
        (3, {}),
        (3, {"block_rule": "random"}),
        (3, {"block_rule": "largest_change"}),
        (3, {"gossip_topology": "exponential"}),
        (4, {"gossip_topology": "exponential"}),
        (3, {"gossip_topology": "ring", "block_rule": "largest_change"}),
        (4, {"gossip_topology": "random"}),
        (3, {"compression": "int8"}),
        (2, {"compression": "bf16", "block_rule": "largest_change"}),
        (3, {"rounds_in_flight": 2}),
        (2, {"rounds_in_flight": 4, "compression": "int8"}),
    ],
)
def test_engine_without_training_preserves_the_mean_and_converges(world_size: int, engine_kwargs: dict) -> None:
    num_blocks = 4
    gossip = "gossip_topology" in engine_kwargs
    _store, vectors, steps, engines = engine_fleet(world_size, 37, num_blocks, period=1, **engine_kwargs)
    mean = torch.stack(vectors).mean(0)
    for engine in engines:
        engine.start()
    # every device "steps" (no change to the vector) until each block has been exchanged at least twice
    target = (40 if gossip else 2) * num_blocks  # gossip mixes pairwise: many rounds to reach the mean
    deadline = time.monotonic() + 20
    while min(engine.rounds for engine in engines) < target and time.monotonic() < deadline:
        for counter in steps:
            counter[0] += 1
        time.sleep(0.001)
    run_in_threads(lambda r: engines[r].pause(), world_size)
    rounds = {engine.rounds for engine in engines}
    assert len(rounds) == 1, f"leaders disagree on the number of rounds: {rounds}"
    torch.testing.assert_close(torch.stack(vectors).mean(0), mean)  # the mean is preserved exactly
    for vector in vectors:  # and every copy has reached it
        if gossip:
            torch.testing.assert_close(vector, mean, rtol=0, atol=1e-3 * float(mean.abs().max()))
        else:
            torch.testing.assert_close(vector, mean)
            if not engine_kwargs:  # round-robin exchanged every block twice: the copies agree bit for bit
                torch.testing.assert_close(vector, vectors[0], rtol=0, atol=0)
    run_in_threads(lambda r: engines[r].stop(), world_size)


def _wait_until(predicate, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


@pytest.mark.parametrize(
    "engine_kwargs",
    [{}, {"compression": "int8", "period": "auto"}, {"rounds_in_flight": 2}],
    ids=["fp32", "int8-auto", "two-in-flight"],
)
def test_leaders_of_very_different_speed_agree_to_pause_average_and_resume(engine_kwargs: dict) -> None:
    world_size = 3
    settings = {"period": 4, **engine_kwargs}
    _store, vectors, steps, engines = engine_fleet(world_size, numel=64, num_blocks=2, **settings)
    for engine in engines:
        engine.start()
    stop = threading.Event()

    def train(rank: int) -> None:  # device r steps (and changes its copy) at its own pace
        while not stop.is_set():
            vectors[rank].add_(0.01 * (rank + 1))
            steps[rank][0] += 1
            time.sleep(0.0005 * (1 + 20 * (rank == 2)))

    workers = [threading.Thread(target=train, args=(rank,)) for rank in range(world_size)]
    for worker in workers:
        worker.start()
    time.sleep(0.5)
    try:
        # only the fastest leader asks to pause; the others park after the same round without asking
        engines[0].pause()
        _wait_until(lambda: all(engine.parked for engine in engines), seconds=10)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    before = torch.stack(vectors).mean(0)
    run_in_threads(lambda r: (engines[r].pause(), engines[r].full_average()), world_size)
    for vector in vectors:
        torch.testing.assert_close(vector, before)
    assert len({engine.rounds for engine in engines}) == 1
    assert steps[0][0] > 3 * steps[2][0], "the fast device must not have been slowed to the slow one's pace"
    run_in_threads(lambda r: engines[r].resume(), world_size)
    for counter in steps:
        counter[0] += 100
    run_in_threads(lambda r: (engines[r].pause(), engines[r].stop()), world_size)
    assert all(not engine._thread.is_alive() for engine in engines)


@pytest.mark.parametrize("compression", ["none", "int8"])
def test_with_two_rounds_in_flight_the_next_round_starts_before_the_last_one_is_finished(compression: str) -> None:
    # leader 1 takes no step, so it starts no round: leader 0 starts two, of distinct blocks, and finishes none
    _store, vectors, steps, engines = engine_fleet(2, 64, 2, period=1, rounds_in_flight=2, compression=compression)
    mean = torch.stack(vectors).mean(0)
    for engine in engines:
        engine.start()
    for _ in range(20):
        steps[0][0] += 1
        time.sleep(0.002)
    _wait_until(lambda: engines[0]._started == 2, seconds=5)
    time.sleep(0.05)
    assert engines[0]._started == 2 and engines[0].rounds == 0
    step = torch.linspace(-1, 1, 64)
    vectors[0].add_(step)  # device 0 trains while both its rounds are in flight: the late corrections keep it
    # both ask to pause: leader 1 starts its two rounds, the first carries the pause, and both leaders finish the
    # second (which leader 0 had started already) before they park: the same rounds on both
    run_in_threads(lambda r: engines[r].pause(), 2)
    assert engines[0].rounds == engines[1].rounds == engines[0]._started == 2
    torch.testing.assert_close(torch.stack(vectors).mean(0), mean + step / 2)  # the mean gained half the step
    torch.testing.assert_close(vectors[0] - vectors[1], step)  # averaged as sent, then the step on top
    run_in_threads(lambda r: engines[r].stop(), 2)


def test_a_failed_round_is_reported_to_the_main_thread_with_the_peers() -> None:
    _store, groups = thread_groups(2, timeout=1.0)
    engine = AveragingEngine(
        torch.zeros(8), lambda: 0, groups[0], [0, 1], num_blocks=1, period=1, timeout=timedelta(seconds=5)
    )
    engine.start()
    with pytest.raises(RuntimeError, match=r"among the device leaders at global ranks \[0, 1\] failed"):
        engine.pause()  # rank 1 never joins: the round times out
    engine.stop()


@pytest.mark.parametrize("on_non_finite", ["stop", "skip"])
@pytest.mark.parametrize("gossip", [None, "exponential"])
def test_a_non_finite_block_is_never_spread_to_other_devices(on_non_finite: str, gossip: str | None) -> None:
    world_size = 3
    _store, vectors, steps, engines = engine_fleet(
        world_size, 16, 1, period=1, on_non_finite=on_non_finite, gossip_topology=gossip
    )
    vectors[1][3] = float("nan")  # device 1's copy went bad
    healthy = [vectors[0].clone(), vectors[2].clone()]
    for engine in engines:
        engine.start()
    for counter in steps:
        counter[0] += 1  # one round is due
    if on_non_finite == "stop":
        for rank in range(world_size):
            with pytest.raises(RuntimeError, match=r"non-finite values .* led by global rank\(s\) \[1\].*HINT"):
                engines[rank].pause()
    else:
        _wait_until(lambda: all(engine.skipped_rounds >= 1 for engine in engines), seconds=10)
        run_in_threads(lambda r: engines[r].pause(), world_size)
        with pytest.raises(RuntimeError, match=r"non-finite values .* at a consensus point"):
            run_in_threads(lambda r: engines[r].full_average(), world_size)
    assert torch.equal(vectors[0], healthy[0]) and torch.equal(vectors[2], healthy[1]), "NaN must not spread"


class _NcclLikeGroup:
    """A stand-in for an NCCL group: a send posted alone would block its stream until the peer's receive."""

    def send(self, *args: object) -> None:
        raise AssertionError("a lone send on NCCL waits for the peer's receive, which waits behind its own send")

    recv = send


def test_gossip_posts_its_send_and_receive_as_one_batch_on_nccl(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both peers send first on NCCL would deadlock; the pair must go out as one `batch_isend_irecv`."""
    batches: list[list] = []
    peer_copy = torch.tensor([3.0, 5.0])

    class _Done:
        def wait(self) -> None:
            pass

    def batch_isend_irecv(ops: list) -> list:
        batches.append(ops)
        receive = next(op for op in ops if op.op is torch.distributed.irecv)
        receive.tensor.copy_(peer_copy)
        return [_Done() for _ in ops]

    def p2p_op(op, tensor, group=None, group_peer=None, tag=0):  # the real one needs a registered group
        return type("P2POp", (), {"op": op, "tensor": tensor, "group": group, "group_peer": group_peer, "tag": tag})

    monkeypatch.setattr(torch.distributed, "get_backend", lambda group: "nccl")
    monkeypatch.setattr(torch.distributed, "batch_isend_irecv", batch_isend_irecv)
    monkeypatch.setattr(torch.distributed, "P2POp", p2p_op)
    live = torch.tensor([1.0, 1.0])
    exchange_with_peer_(live, _NcclLikeGroup(), peer=1, tag=7)
    assert len(batches) == 1
    (first, second) = batches[0]
    assert {first.op, second.op} == {torch.distributed.isend, torch.distributed.irecv}
    assert (first.group_peer, second.group_peer, first.tag, second.tag) == (1, 1, 7, 7)
    assert torch.equal(live, torch.tensor([2.0, 3.0]))
    assert averaging.group_backend(_NcclLikeGroup()) == "nccl"


def test_gossip_pairs_average_over_gloo_and_keep_the_sum() -> None:
    _, groups = thread_groups(2)
    copies = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0, 6.0, 7.0])]
    run_in_threads(lambda rank: exchange_with_peer_(copies[rank], groups[rank], peer=1 - rank, tag=3), 2)
    assert torch.equal(copies[0], torch.tensor([3.0, 4.0, 5.0]))
    assert torch.equal(copies[1], copies[0])


def test_the_fingerprint_sees_one_ulp_a_swap_and_a_sign_and_not_how_the_vector_is_split() -> None:
    values = torch.randn(3 * averaging._FINGERPRINT_CHUNK // 2, generator=torch.Generator().manual_seed(0))
    print_ = averaging.fingerprint(values)
    assert torch.equal(print_, averaging.fingerprint(values.clone()))
    nudged = values.clone()
    nudged[-1] = torch.nextafter(nudged[-1], torch.tensor(float("inf")))
    swapped = values.clone()
    swapped[[5, 6]] = values[[6, 5]]
    far_swap = values.clone()  # positions one weight period apart share the first weight, not the second
    far_swap[[5, 5 + averaging._WEIGHT_PERIOD]] = values[[5 + averaging._WEIGHT_PERIOD, 5]]
    flipped = values.clone()
    flipped[7] = -flipped[7]
    for other in (nudged, swapped, far_swap, flipped):
        assert not torch.equal(averaging.fingerprint(other), print_)
    for dtype, word in ((torch.bfloat16, torch.int16), (torch.float16, torch.int16), (torch.float64, torch.int64)):
        same = values.to(dtype)
        flipped_bit = same.clone()
        flipped_bit.view(word)[-1] ^= 1  # one ulp of the last element, in that dtype's own bits
        assert torch.equal(averaging.fingerprint(same), averaging.fingerprint(same.clone()))
        assert not torch.equal(averaging.fingerprint(same), averaging.fingerprint(flipped_bit)), dtype


def test_after_a_consensus_a_copy_that_differs_fails_loudly_naming_its_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_fedhog.consensus_average as consensus_module
    from lightning_fedhog.engine import CopiesDifferError

    original = consensus_module.exchange_average_

    def with_a_stray_write(flat: torch.Tensor, group, *args, **kwargs):  # type: ignore[no-untyped-def]
        summed = original(flat, group, *args, **kwargs)
        if group.rank() == 2:
            flat[3] += 1e-6  # something wrote the parameters while the workers were parked
        return summed

    monkeypatch.setattr(consensus_module, "exchange_average_", with_a_stray_write)
    _store, _vectors, _steps, engines = engine_fleet(3, 64, 1, period=1)
    for engine in engines:
        engine.start()
    run_in_threads(lambda r: engines[r].pause(), 3)
    errors = []

    def consensus(rank: int) -> None:
        try:
            engines[rank].full_average()
        except CopiesDifferError as error:
            errors.append(str(error))

    run_in_threads(consensus, 3)
    assert len(errors) == 3, "every leader must fail, not only the one whose copy differs"
    assert all("led by global rank(s) [2] differ" in error for error in errors)
