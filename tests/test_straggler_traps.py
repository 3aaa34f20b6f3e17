"""Dynamic work sharing and user hooks with real processes: the traps a Lightning user hits with a slow device.

Each test is a case that used to hang or train wrong silently: a worker that gets no batch in an epoch, loaders
that prefetch, schedules sized by ``trainer.estimated_stepping_batches``, a ``max_steps`` budget across reloads and
resumes, callbacks that look at the model at validation start and at the end of ``fit``, and a slow device with
static shards that nobody was told about. Counts and equalities only: nothing here depends on timing.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tests.conftest import run_app, run_outcome

DYNAMIC = ("--work-sharing", "dynamic")
SLOW_RANK_1 = ("--sleep-rank", "1", "--sleep", "0.02")


def _epochs(report: dict) -> dict[str, list[int]]:
    return report["seen"]


def test_a_worker_that_gets_no_batch_in_an_epoch_keeps_every_rank_in_step(tmp_path: Path) -> None:
    """304 samples in batches of 16 are 19 batches; max_steps=10 on 2 workers leaves 1 batch for the 2nd epoch."""
    reports = run_app(
        tmp_path, "--devices", "2", *DYNAMIC, "--samples", "304", "--epochs", "5", "--max-steps", "10",
    )
    assert {r["current_epoch"] for r in reports} == {2}, "every rank ends after the same epoch"
    for report in reports:
        assert sorted(report["seen"]) == ["0", "1"], f"rank {report['rank']} trained in every epoch"
    total = sum(r["global_step"] for r in reports)
    assert total == 19 + 2, f"19 batches, then at least one per worker in the budget's last epoch; got {total}"
    validations = [len(r["hook_sums"]["callback.on_validation_start"]) for r in reports]
    assert validations == [3, 3], "sanity check + 2 epoch ends, on every rank"


@pytest.mark.parametrize(
    ("workers", "extra", "per_epoch"),
    [
        (2, ("--limit-train", "2"), 2 * 2 * 2 * 16),  # 2 devices x 2 workers x limit 2 batches x 16 samples
        (1, ("--persistent",), 320),  # the whole data set, loader workers kept across epochs
    ],
    ids=["limit_train_batches", "persistent_workers"],
)
def test_prefetching_loaders_train_every_sample_exactly_once_per_epoch(
    tmp_path: Path, workers: int, extra: tuple[str, ...], per_epoch: int
) -> None:
    reports = run_app(
        tmp_path, "--devices", "2", "--workers", str(workers), *DYNAMIC, "--samples", "320", "--epochs", "2",
        "--num-workers", "2", *SLOW_RANK_1, *extra,
    )
    for epoch in ("0", "1"):
        seen = [index for report in reports for index in report["seen"].get(epoch, [])]
        assert len(seen) == len(set(seen)), f"epoch {epoch}: a sample trained twice"
        assert len(seen) == per_epoch, f"epoch {epoch}: {len(seen)} samples trained, not {per_epoch}"


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_schedules_sized_by_estimated_stepping_batches_span_the_run(tmp_path: Path, schedule: str) -> None:
    """A 2x slower worker does fewer steps, a fast one more; both schedules run their whole course, never past it."""
    reports = run_app(
        tmp_path, "--devices", "2", *DYNAMIC, "--samples", "320", "--epochs", "3", *SLOW_RANK_1,
        "--schedule", schedule,
    )
    assert [r["estimated"] for r in reports] == [30.0, 30.0], "20 batches an epoch / 2 workers x 3 epochs"
    fast, slow = reports
    assert len(fast["lr_trace"]) > len(slow["lr_trace"]), "the fast worker took more batches"
    for report in reports:
        trace = report["lr_trace"]
        assert max(trace) > 0.9 * 0.125, f"rank {report['rank']}: never near the peak LR: {trace}"
        if schedule == "cosine":
            assert min(trace[: len(trace) // 2]) > 0.05, f"rank {report['rank']}: LR low halfway through: {trace}"
            assert all(b <= a for a, b in itertools.pairwise(trace)), f"rank {report['rank']}: LR went up: {trace}"
        assert trace[-1] < 0.25 * max(trace), f"rank {report['rank']}: the schedule did not reach its end: {trace}"


def test_max_steps_alone_ends_the_run(tmp_path: Path) -> None:
    """`max_steps` without `max_epochs` (Lightning then allows endless epochs): the budget still ends the run."""
    reports = run_app(
        tmp_path, "--devices", "2", *DYNAMIC, "--samples", "320", "--epochs", "-1", "--max-steps", "15", *SLOW_RANK_1,
    )
    assert sum(r["global_step"] for r in reports) == 2 * 15
    assert {r["current_epoch"] for r in reports} == {2}


def test_the_max_steps_budget_survives_reloaded_loaders(tmp_path: Path) -> None:
    reports = run_app(
        tmp_path, "--devices", "2", *DYNAMIC, "--samples", "320", "--epochs", "5", "--max-steps", "15",
        "--reload", "1", *SLOW_RANK_1,
    )
    assert sum(r["global_step"] for r in reports) == 2 * 15
    assert {r["current_epoch"] for r in reports} == {2}


def test_the_max_steps_budget_survives_a_resume(tmp_path: Path) -> None:
    settings = ("--devices", "2", *DYNAMIC, "--samples", "320", "--epochs", "5", "--max-steps", "15", *SLOW_RANK_1)
    run_app(tmp_path / "first", *settings, "--epochs", "1")
    checkpoint = next((tmp_path / "first" / "ckpt").glob("epoch=0-*.ckpt"))
    resumed = run_app(tmp_path / "resumed", *settings, "--resume", str(checkpoint))
    after = sum(r["global_step"] - r["started"]["global_step"] for r in resumed)
    assert after == 2 * 15 - 20, f"the first epoch spent 20 of the 30 batches; the resumed run trained {after}"
    assert len({r["current_epoch"] for r in resumed}) == 1, "every rank ends after the same epoch"


@pytest.mark.parametrize("sharing", ["static", "dynamic"])
def test_user_hooks_see_the_consensus_model(tmp_path: Path, sharing: str) -> None:
    """No background rounds: the two devices' copies differ until a consensus point makes them equal."""
    reports = run_app(
        tmp_path, "--devices", "2", "--work-sharing", sharing, "--samples", "160", "--epochs", "2",
        "--period", "1000000",
    )
    for hook in ("callback.on_validation_start", "module.on_validation_start", "callback.on_train_end"):
        seen = [r["hook_sums"][hook] for r in reports]
        assert seen[0] == seen[1], f"{hook}: the ranks saw different models: {seen}"


def test_a_slow_device_with_static_shards_is_reported_once_with_the_fix(tmp_path: Path) -> None:
    outcome = run_outcome(
        tmp_path, "--devices", "2", "--samples", "480", "--epochs", "3", "--sleep-rank", "1", "--sleep", "0.06",
        forked=True,
    )
    assert outcome.returncode == 0, outcome.output[-3000:]
    assert outcome.output.count("idled") == 1, outcome.output[-3000:]
    assert "work_sharing='dynamic'" in outcome.output
