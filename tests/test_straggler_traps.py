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
import torch

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


def _reference_lrs(schedule: str, total: int) -> list[float]:
    """The LR the user's schedule gives after 0, 1, ..., ``total`` steps (as the app configures it; Lightning steps
    it after the last step too, which leaves it at ``total``)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.125)
    if schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    else:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.125, total_steps=total)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(total):
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_schedules_sized_by_estimated_stepping_batches_span_the_run(tmp_path: Path, schedule: str) -> None:
    """A 2x slower worker does fewer steps, a fast one more; each worker's schedule follows the run's progress.

    Which steps a worker takes depends on timing, so nothing here looks at a particular step: at every step the LR
    is the user's schedule at the run's progress, the progress never goes back or past the end, and the workers
    together walk the whole schedule (the peak included) to its end.
    """
    reports = run_app(
        tmp_path, "--devices", "2", *DYNAMIC, "--samples", "320", "--epochs", "3", *SLOW_RANK_1,
        "--schedule", schedule,
    )
    assert [r["estimated"] for r in reports] == [30.0, 30.0], "20 batches an epoch / 2 workers x 3 epochs"
    fast, slow = reports
    assert len(fast["lr_trace"]) > len(slow["lr_trace"]), "the fast worker took more batches"
    reference = _reference_lrs(schedule, 30)
    for report in reports:
        positions, trace = report["sched_steps"], report["lr_trace"]
        assert all(b >= a for a, b in itertools.pairwise(positions)), f"rank {report['rank']}: went back {positions}"
        assert positions[-1] <= 30, f"rank {report['rank']}: the schedule ran past its end: {positions}"
        for position, lr in zip(positions, trace, strict=True):
            assert lr == pytest.approx(reference[position]), f"rank {report['rank']}: step {position}: LR {lr}"
    walked = sorted({position for report in reports for position in report["sched_steps"]})
    assert walked[0] == 0 and walked[-1] >= 28, f"the run did not walk the schedule to its end: {walked}"
    gaps = [b - a for a, b in itertools.pairwise(walked)]
    assert max(gaps) <= 2, f"the run skipped part of the schedule: {walked}"
    assert max(lr for report in reports for lr in report["lr_trace"]) > 0.9 * 0.125, "never near the peak"


def test_the_max_steps_budget_survives_reloaded_loaders(tmp_path: Path) -> None:
    reports = run_app(
        tmp_path, "--devices", "2", *DYNAMIC, "--samples", "320", "--epochs", "5", "--max-steps", "15",
        "--reload", "1", *SLOW_RANK_1,
    )
    assert sum(r["global_step"] for r in reports) == 2 * 15
    assert {r["current_epoch"] for r in reports} == {2}


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
