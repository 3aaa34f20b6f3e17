"""fedhog's figures reach the user's logger with plausible values."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from lightning_fedhog.metrics import fedhog_metrics
from lightning_fedhog.plot import plot, read_runs
from lightning_fedhog.telemetry import RoundFigures
from tests.conftest import load_rank, run_app


def test_metrics_aggregate_workers_devices_and_leaders() -> None:
    engine = {
        "rounds": 5.0, "rounds_per_s": 10.0, "bytes_per_s": 100.0, "seconds_per_round": 0.01, "round_distance": 0.5,
        "staleness_steps": 4.0, "consensus_distance": 0.2,
    }
    workers = [
        {"device": 0, "samples_per_s": 100.0, "parked_s": 0.1, "engine": engine},
        {"device": 0, "samples_per_s": 50.0, "parked_s": 0.3, "engine": None},
        {"device": 1, "samples_per_s": 80.0, "parked_s": 0.2, "engine": {**engine, "staleness_steps": 9.0}},
        {"device": 1, "samples_per_s": 70.0, "parked_s": 0.0, "engine": None},
    ]
    metrics = fedhog_metrics(workers, wall_time=3.0)
    assert metrics["fedhog/samples_per_s"] == 300.0
    assert metrics["fedhog/device0/samples_per_s"] == 150.0 and metrics["fedhog/worker3/samples_per_s"] == 70.0
    assert metrics["fedhog/parked_s"] == 0.3 and metrics["fedhog/staleness_steps"] == 9.0
    assert metrics["fedhog/rounds_per_s"] == 10.0 and metrics["fedhog/device1/consensus_distance"] == 0.2


def test_staleness_is_the_longest_a_block_waited_not_what_the_pause_round_left() -> None:
    figures = RoundFigures(num_blocks=2, clock=lambda: 0.0)
    for block, steps in [(0, 16), (1, 32), (0, 48), (1, 64), (0, 80), (1, 81)]:  # the last: the pause round
        figures.round_done(block, 0.01, {}, steps)
    # each block waited 32 steps between its rounds; at the consensus point they look 0 and 1 steps old
    assert figures.take(device_steps=81, period=16)["staleness_steps"] == 32.0
    figures.round_done(0, 0.01, {}, 90)
    assert figures.take(device_steps=100, period=16)["staleness_steps"] == 19.0, "block 1 waits since step 81"


def test_the_consensus_distance_counts_what_the_pause_round_already_averaged() -> None:
    figures = RoundFigures(num_blocks=1, clock=lambda: 0.0)
    figures.round_done(0, 0.01, {"moved": 7.0}, 16)  # an ordinary round: not part of the consensus
    figures.round_done(0, 0.01, {"moved": 3.0}, 20)  # the round that agreed on the pause moved the copy by 3
    figures.paused_round()
    figures.consensus(4.0, device_steps=20)  # then the exact average, by 4 more (orthogonal: other elements' steps)
    taken = figures.take(device_steps=20, period=16)
    assert taken["consensus_distance"] == 5.0
    figures.consensus(0.5, device_steps=30)  # the next consensus point had no round before it
    taken = figures.take(device_steps=40, period=16)
    assert taken["consensus_distance"] == 0.5
    assert taken["staleness_steps"] == 10.0, "the consensus point at step 30 brought the block up to date"


def _rows(out: Path) -> list[dict[str, str]]:
    (path,) = out.glob("logs/run/version_*/metrics.csv")
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _series(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(row[key]) for row in rows if row.get(key)]


@pytest.mark.parametrize(
    ("period", "compression"), [("2", "none"), ("1000000000", "none"), ("auto", "int8")],
    ids=["averaging", "averaging-off", "auto-int8-overlap"],
)
def test_a_csv_logged_run_has_every_fedhog_metric(tmp_path: Path, period: str, compression: str) -> None:
    samples = "2048" if period == "auto" else "512"  # 'auto' starts at 16 device steps: let a few rounds happen
    args = ("--devices", "2", "--workers", "2", "--epochs", "2", "--samples", samples, "--period", period, "--csv",
            "--compression", compression)
    if period == "auto":  # and two rounds in flight, of two blocks
        args += ("--in-flight", "2", "--blocks", "2")
    reports = run_app(tmp_path, *args)
    rows = _rows(tmp_path)
    for key in (
        "samples_per_s", "parked_s", "wall_time_s", "rounds", "rounds_per_s", "bytes_per_s", "seconds_per_round",
        "round_distance", "staleness_steps", "consensus_distance", "device0/samples_per_s", "worker3/samples_per_s",
        "device1/consensus_distance", "period",
    ):
        values = _series(rows, f"fedhog/{key}")
        assert len(values) == 2, f"fedhog/{key}: one value per epoch expected, got {values}"
        assert all(value >= 0 for value in values)
    assert all(value > 0 for value in _series(rows, "fedhog/samples_per_s"))
    assert _series(rows, "fedhog/wall_time_s")[1] > _series(rows, "fedhog/wall_time_s")[0]
    distances = _series(rows, "fedhog/consensus_distance")
    if period == "auto":  # the leaders chose a period and the compressed rounds ran; every copy ends the same
        assert all(value >= 1 for value in _series(rows, "fedhog/period"))
        assert sum(_series(rows, "fedhog/rounds")) > 2
        states = [load_rank(tmp_path, report["rank"])["state_dict"] for report in reports]
        assert all(torch.equal(state[key], states[0][key]) for state in states for key in states[0])
    elif period == "2":
        # every epoch has its pause round; background rounds come on top (how many depends on the threads'
        # scheduling on a loaded machine, so only their presence is asserted)
        assert sum(_series(rows, "fedhog/rounds")) > 2
        assert max(_series(rows, "fedhog/bytes_per_s")) > 0
    else:  # no background rounds: the copies drift apart until the consensus point measures it
        assert _series(rows, "fedhog/rounds") == [1.0, 1.0], "only the round that agrees on the pause"
        assert min(distances) > 0
    assert any(row.get("val_acc") for row in rows), "the user's own metrics are still logged"
    # fedhog's figures of an epoch end carry the step and the epoch of that epoch's validation metrics
    validation = {(row["step"], row["epoch"]) for row in rows if row.get("val_acc")}
    ours = [(row["step"], row["epoch"]) for row in rows if row.get("fedhog/samples_per_s")]
    assert all(epoch != "" for _, epoch in ours), ours
    assert set(ours) <= validation, (ours, validation)
    # the plot utility turns the real run's log into both charts
    written = plot(read_runs([tmp_path / "logs"]), tmp_path / "png")
    assert [path.name for path in written] == ["fedhog.png", "progress.png"]
    assert all(path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 10_000 for path in written)


def test_plot_explains_a_folder_without_logs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no metrics.csv under .* HINT: log with `CSVLogger`"):
        read_runs([tmp_path])
