"""Compressed rounds: the math alone, then on thread gloo groups and engine fleets."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from lightning_fedhog.compression import (
    INT8_CHUNK,
    PIECE,
    decode,
    decode_piece,
    encode,
    encoded_bytes,
    exchange_compressed_,
)
from lightning_fedhog.config import FedHogConfig
from tests.conftest import engine_fleet, forkserver, run_in_threads, thread_groups

APPS = Path(__file__).resolve().parent / "apps"


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


@pytest.mark.parametrize("codec", ["none", "bf16", "int8"])
def test_a_block_of_several_pieces_encodes_as_its_chunks_and_decodes_piece_by_piece(codec: str) -> None:
    numel = 2 * PIECE + 1500  # two whole pieces and a partial one, whose last chunk is partial too
    values = _values(numel, seed=3)
    values[PIECE : PIECE + 5] *= 1000  # one chunk of the second piece has a coarse step, the rest a fine one
    payload = encode(values, codec)  # type: ignore[arg-type]
    back = decode(payload, numel, codec)  # type: ignore[arg-type]
    for start, stop in [(0, PIECE), (PIECE, 2 * PIECE), (2 * PIECE, numel), (INT8_CHUNK, 3 * INT8_CHUNK + 7)]:
        assert torch.equal(decode_piece(payload, numel, codec, start, stop), back[start:stop])  # type: ignore[arg-type]
    if codec == "int8":  # each chunk's scale is its own: the coarse chunk does not coarsen its neighbours
        chunk = slice(PIECE + INT8_CHUNK, PIECE + 2 * INT8_CHUNK)
        step = float(values[chunk].abs().max()) / 127
        assert float((back[chunk] - values[chunk]).abs().max()) <= step / 2 + 1e-7
    elif codec == "none":
        assert torch.equal(back, values)


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
    _store, vectors, steps, engines = engine_fleet(world_size, numel, 2, period=1, compression="int8")
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
    references = [engine._rounds.shared.values for engine in engines]
    assert all(torch.equal(reference, vectors[0]) for reference in references), "a consensus resets the reference"
    run_in_threads(lambda r: engines[r].stop(), world_size)


@pytest.mark.parametrize("codec", ["int8", "bf16"])
def test_a_compressed_consensus_gives_every_device_one_model_and_keeps_the_exact_mean(codec: str) -> None:
    world_size, numel = 3, 3 * INT8_CHUNK + 77
    _store, vectors, steps, engines = engine_fleet(world_size, numel, 1, period=1, compression=codec)
    for engine in engines:
        engine.start()
    for _ in range(400):
        if min(engine.rounds for engine in engines) >= 3:
            break
        for rank, counter in enumerate(steps):
            vectors[rank].add_(_values(numel, seed=rank, scale=1e-3))  # the devices keep training apart
            counter[0] += 1
        time.sleep(0.002)
    run_in_threads(lambda r: engines[r].pause(), world_size)
    for rank in range(world_size):  # steps after the last round: copies differ from the shared reference
        vectors[rank].add_(_values(numel, seed=10 + rank, scale=1e-2))
    before = [vector.clone() for vector in vectors]
    mean = torch.stack(before).mean(0)
    run_in_threads(lambda r: engines[r].consensus_average(), world_size)
    assert all(engine.lossy_consensus for engine in engines)
    assert all(torch.equal(vector, vectors[0]) for vector in vectors), "every device validates the same bits"
    # within quantisation error of the exact mean (differences of about 0.04: a step of 3e-4 in int8), not equal
    off = float((vectors[0] - mean).abs().max())
    assert 1e-5 < off <= 0.04 * (2.0**-8 if codec == "bf16" else 1 / 127), off
    run_in_threads(lambda r: engines[r].resume(), world_size)  # what quantisation dropped goes back in
    torch.testing.assert_close(torch.stack(vectors).mean(0), mean, rtol=0, atol=1e-6)  # fp32 rounding only
    assert not any(torch.equal(vector, vectors[0]) for vector in vectors[1:])
    run_in_threads(lambda r: engines[r].pause(), world_size)
    mean = torch.stack(vectors).mean(0)
    run_in_threads(lambda r: engines[r].consensus_average(), world_size)
    run_in_threads(lambda r: engines[r].make_exact(), world_size)  # the end of fit: the exact mean
    assert not any(engine.lossy_consensus for engine in engines)
    assert all(torch.equal(vector, vectors[0]) for vector in vectors)
    torch.testing.assert_close(vectors[0], mean, rtol=0, atol=1e-6)
    run_in_threads(lambda r: engines[r].stop(), world_size)


@pytest.mark.parametrize(("num_blocks", "sole_worker", "exchanges"), [(1, True, 0), (2, True, 1), (1, False, 1)])
def test_a_block_the_pause_round_averaged_with_every_device_frozen_is_not_sent_again(
    monkeypatch: pytest.MonkeyPatch, num_blocks: int, sole_worker: bool, exchanges: int
) -> None:
    import lightning_fedhog.consensus_average as consensus_module

    calls: list[str] = []
    for name in ("exchange_average_", "consensus_compressed_"):
        original = getattr(consensus_module, name)
        def counted(*args, _call=original, _name=name, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(_name)
            return _call(*args, **kwargs)

        monkeypatch.setattr(consensus_module, name, counted)
    world_size, numel = 2, 3 * INT8_CHUNK + 77
    # no round between consensus points: the only rounds are those that agree on a pause, while the devices wait
    _store, vectors, _steps, engines = engine_fleet(world_size, numel, num_blocks, period=10**6, compression="int8",
                                                    sole_worker=sole_worker)
    for engine in engines:
        engine.start()
    for cycle in range(2):  # the first pause round sends fp32 (no reference yet), the second int8 codes
        for rank in range(world_size):
            vectors[rank].add_(_values(numel, seed=20 + 2 * cycle + rank, scale=1e-2))  # the devices train apart
        mean = torch.stack(vectors).mean(0)
        run_in_threads(lambda r: engines[r].pause(), world_size)
        calls.clear()
        run_in_threads(lambda r: engines[r].consensus_average(), world_size)
        assert len(calls) == world_size * exchanges, calls  # every leader runs the same collectives
        assert all(torch.equal(vector, vectors[0]) for vector in vectors), "every device validates the same bits"
        off = float((vectors[0] - mean).abs().max())
        assert off <= (1e-6 if cycle == 0 else 0.04 / 127), off  # the fp32 pause round: the exact mean
        run_in_threads(lambda r: engines[r].resume(), world_size)
        torch.testing.assert_close(torch.stack(vectors).mean(0), mean, rtol=0, atol=1e-6)
    run_in_threads(lambda r: engines[r].stop(), world_size)


def test_a_consensus_is_exact_while_the_rounds_send_fp32() -> None:
    world_size, numel = 2, 1000
    _store, vectors, _steps, engines = engine_fleet(world_size, numel, 1, period=1, compression="none")
    for engine in engines:
        engine.start()
    run_in_threads(lambda r: engines[r].pause(), world_size)
    vectors[1].add_(0.5)
    mean = torch.stack(vectors).mean(0)
    run_in_threads(lambda r: engines[r].consensus_average(), world_size)
    assert not any(engine.lossy_consensus for engine in engines)
    assert torch.equal(vectors[0], vectors[1])
    torch.testing.assert_close(vectors[0], mean, rtol=0, atol=0)
    run_in_threads(lambda r: engines[r].stop(), world_size)


def test_compression_and_auto_are_validated_at_construction() -> None:
    assert FedHogConfig(averaging_period="auto", compression="int8").compression == "int8"
    with pytest.raises(ValueError, match=r"compression='zip'.*HINT: choose one of 'auto', 'none', 'bf16', 'int8'"):
        FedHogConfig(compression="zip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"compression='int8'.*averaging='gossip'.*HINT"):
        FedHogConfig(compression="int8", averaging="gossip")
    with pytest.raises(ValueError, match=r"averaging_period.*'auto'"):
        FedHogConfig(averaging_period="fast")  # type: ignore[arg-type]
    assert FedHogConfig(averaging_period="auto", averaging_warmup_epochs=1).period_at(0) == 1
    assert FedHogConfig(averaging_period="auto", averaging_warmup_epochs=1).period_at(1) == "auto"


def test_a_compressed_round_needs_less_than_one_more_fp32_copy_of_the_block_on_one_leader(tmp_path: Path) -> None:
    numel = 1 << 23  # 32 MiB in fp32: a round that held its old fp32 temporaries would add about 145 MiB
    script = APPS / "compressed_round_peak.py"
    status, output = forkserver().run(script, [str(numel), "int8"], 1, dict(os.environ), tmp_path, 120)
    assert status == 0, output[-3000:]
    extra = int(output.split()[-1])
    # int8 messages are a quarter of the block's fp32 bytes: its own, the gathered ones (one leader: one) and gloo's
    # temporary copy of those, plus a few pieces of workspace (a whole-block encoding needed about 4.5 fp32 copies)
    assert extra <= 3 * numel + 16 * 2**20, f"the round raised the peak by {extra / 2**20:.0f} MiB"
