"""``work_sharing="auto"`` with real processes: static shards until a straggler shows, then dynamic on every rank.

Counts and equalities only: which consensus point first measures the straggler is known (the slow rank sleeps from a
given epoch on, far above the threshold), and nothing here compares times.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.conftest import assert_one_model, run_app, run_outcome, trained_in_epoch

AUTO = ("--work-sharing", "auto")
STRAGGLER_FROM_EPOCH_1 = ("--sleep-rank", "1", "--sleep", "0.1", "--sleep-from-epoch", "1")


def _sharing(reports: list[dict]) -> dict[str, str]:
    modes = [report["sharing"] for report in reports]
    assert all(mode == modes[0] for mode in modes), f"the ranks shared work differently: {modes}"
    return modes[0]


def test_a_straggler_mid_run_switches_every_rank_at_one_epoch_and_a_resume_keeps_it(tmp_path: Path) -> None:
    """640 samples, 20 batches a worker: epoch 0 is short, the straggler fills the 2 s window in epoch 1."""
    settings = ("--devices", "2", *AUTO, "--samples", "640", *STRAGGLER_FROM_EPOCH_1)
    reports = run_app(tmp_path / "first", *settings, "--epochs", "3")
    assert _sharing(reports) == {"0": "static", "1": "static", "2": "dynamic"}
    for epoch in (0, 1, 2):
        assert sorted(trained_in_epoch(reports, epoch)) == list(range(640)), f"epoch {epoch}: not every sample once"
    fast, slow = (len(report["seen"]["2"]) for report in reports)
    assert fast > 1.5 * slow, "after the switch the fast device takes more batches"
    assert [len(report["seen"]["1"]) for report in reports] == [320, 320], "before it, equal static shards"
    assert_one_model(tmp_path / "first", 2)

    checkpoint = next((tmp_path / "first" / "ckpt").glob("epoch=2-*.ckpt"))
    assert torch.load(checkpoint, weights_only=False)["fedhog_work_sharing"] == "dynamic"
    resumed = run_app(tmp_path / "resumed", *settings, "--epochs", "4", "--resume", str(checkpoint))
    assert _sharing(resumed) == {"3": "dynamic"}, "the resumed run shares work as the checkpointed one did"
    assert sorted(trained_in_epoch(resumed, 3)) == list(range(640))

    # resumed with a setting that rules dynamic sharing out: static shards, said once (every rank has one step count)
    outcome = run_outcome(
        tmp_path / "blocked", *settings, "--epochs", "4", "--resume", str(checkpoint), "--val-check", "0.5",
        forked=True,
    )
    assert outcome.returncode == 0, outcome.output[-3000:]
    assert "it resumes with static shards" in outcome.output and "`val_check_interval=0.5`" in outcome.output


def test_the_max_steps_budget_and_a_step_schedule_carry_across_the_switch(tmp_path: Path) -> None:
    """max_steps=70 on 2 workers is 140 batches: epochs 0-1 static (80), the switch, then 40 and the last 20."""
    reports = run_app(
        tmp_path, "--devices", "2", *AUTO, "--samples", "640", "--epochs", "-1", "--max-steps", "70",
        "--schedule", "cosine", *STRAGGLER_FROM_EPOCH_1,
    )
    assert _sharing(reports) == {"0": "static", "1": "static", "2": "dynamic", "3": "dynamic"}
    assert sum(report["global_step"] for report in reports) == 140
    assert {report["current_epoch"] for report in reports} == {4}, "every rank ends after the same epoch"
    assert len(trained_in_epoch(reports, "3")) == 20 * 16 and sorted(trained_in_epoch(reports, "2")) == list(range(640))
    for report in reports:
        positions = report["sched_steps"]
        assert positions == sorted(positions) and positions[-1] <= 70, "the schedule went back or past its end"
        assert report["reload_dataloaders_every_n_epochs"] == 0, "the user's setting is given back"


def test_a_run_without_validation_or_checkpoints_switches_too(tmp_path: Path) -> None:
    """No consensus point before the end of `fit`: the measurement is taken at every epoch-end meeting."""
    reports = run_app(
        tmp_path, "--devices", "2", *AUTO, "--samples", "640", "--epochs", "3", "--no-val", "--no-checkpoint",
        *STRAGGLER_FROM_EPOCH_1,
    )
    assert _sharing(reports) == {"0": "static", "1": "static", "2": "dynamic"}
    assert sorted(trained_in_epoch(reports, 2)) == list(range(640))


def test_settings_that_rule_dynamic_sharing_out_keep_static_shards_and_say_why_once(tmp_path: Path) -> None:
    outcome = run_outcome(
        tmp_path, "--devices", "2", *AUTO, "--samples", "960", "--epochs", "2", "--sleep-rank", "1", "--sleep",
        "0.06", "--val-check", "0.5", forked=True,
    )
    assert outcome.returncode == 0, outcome.output[-3000:]
    assert outcome.output.count("cannot switch to `work_sharing='dynamic'` by itself here") == 1, outcome.output
    assert "`val_check_interval=0.5`" in outcome.output
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert set(_sharing(reports).values()) == {"static"}
    assert reports[0]["global_step"] == reports[1]["global_step"], "equal static shards to the end"
