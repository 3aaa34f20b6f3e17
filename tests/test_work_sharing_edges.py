"""Dynamic work sharing at the edges of ordinary pipelines, with real processes.

Each test is a pipeline that used to train the wrong data or never end under ``work_sharing="dynamic"``: a user's
own sampler, reloaded loaders with loader workers, several training loaders, a resumed or second ``fit`` whose
``max_steps`` budget is already spent, an estimate read before a checkpoint is restored, and SIGTERM while one
worker is at its epoch end and another still trains. Every case checks what a user relies on: the run ends by
itself, every worker holds the same model, and each epoch trains exactly the indices the user's sampler gives.
Counts and equalities only: nothing here depends on timing.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from lightning_fedhog.epoch_indices import permutation
from tests.conftest import assert_one_model, run_app, run_outcome, trained_in_epoch

DYNAMIC = ("--work-sharing", "dynamic")
SLOW_RANK_1 = ("--sleep-rank", "1", "--sleep", "0.02")
SEED = 1234  # the app's `seed_everything`, which Lightning's samplers take as their seed


@pytest.mark.parametrize("sampler", ["subset", "in_order"])
def test_a_users_sampler_keeps_its_indices_and_order(tmp_path: Path, sampler: str) -> None:
    """``SubsetRandomSampler`` (a train/validation split) and a user's in-order sampler: their indices, once each."""
    reports = run_app(
        tmp_path, "--devices", "2", *DYNAMIC, "--samples", "640", "--epochs", "2", "--sampler", sampler,
        *SLOW_RANK_1,
    )
    expected = list(range(0, 640, 2)) if sampler == "subset" else list(range(640))
    for epoch in (0, 1):
        assert sorted(trained_in_epoch(reports, epoch)) == expected, f"epoch {epoch}: not exactly the sampler's indices"
    if sampler == "in_order":  # every batch is one aligned run of the sampler's order
        for report in reports:
            for batch in report["batches"]["0"] + report["batches"]["1"]:
                assert batch == list(range(batch[0], batch[0] + 16)) and batch[0] % 16 == 0, batch
    assert_one_model(tmp_path, 2)


def test_a_weighted_sampler_keeps_its_weights_and_replacement(tmp_path: Path) -> None:
    reports = run_app(
        tmp_path, "--devices", "2", *DYNAMIC, "--samples", "640", "--epochs", "2", "--sampler", "weighted",
        *SLOW_RANK_1,
    )
    for epoch in (0, 1):
        trained = trained_in_epoch(reports, epoch)
        assert len(trained) == 320, f"epoch {epoch}: {len(trained)} draws, the sampler's num_samples is 320"
        assert all(index % 2 == 0 for index in trained), "an index of weight 0 was trained"
        assert max(collections.Counter(trained).values()) > 1, "drawn without replacement"
    assert sorted(trained_in_epoch(reports, 0)) != sorted(trained_in_epoch(reports, 1)), "the same draws in both epochs"
    assert_one_model(tmp_path, 2)


def test_reloaded_loaders_with_loader_workers_train_every_sample_once(tmp_path: Path) -> None:
    """Lightning builds a reloaded loader's iterator twice; the first one's prefetched claims must be trained."""
    reports = run_app(
        tmp_path, "--devices", "2", *DYNAMIC, "--samples", "640", "--epochs", "3", "--reload", "1",
        "--num-workers", "2", *SLOW_RANK_1,
    )
    for epoch in (0, 1, 2):
        assert sorted(trained_in_epoch(reports, epoch)) == list(range(640)), f"epoch {epoch}: not every sample once"
    assert_one_model(tmp_path, 2)


def test_several_training_loaders_are_refused_with_the_fix(tmp_path: Path) -> None:
    outcome = run_outcome(
        tmp_path, "--devices", "2", *DYNAMIC, "--samples", "320", "--loaders", "2", timeout=60, forked=True
    )
    assert outcome.returncode != 0
    assert "2 training loaders" in outcome.output and "HINT" in outcome.output, outcome.output[-3000:]


@pytest.mark.parametrize("stage", ["resume_finished", "max_steps_0"])
def test_a_spent_budget_ends_fit_at_once(tmp_path: Path, stage: str) -> None:
    settings = ("--devices", "2", *DYNAMIC, "--samples", "320", "--epochs", "-1", *SLOW_RANK_1)
    if stage == "resume_finished":  # an idempotent restart script: the same command after the run finished
        first = run_app(tmp_path / "first", *settings, "--max-steps", "10")
        assert sum(r["global_step"] for r in first) == 20
        reports = run_app(
            tmp_path / "again", *settings, "--max-steps", "10",
            "--resume", str(tmp_path / "first" / "ckpt" / "last.ckpt"), timeout=90,
        )
    else:
        reports = run_app(tmp_path / "again", *settings, "--max-steps", "0", timeout=90)
    assert all(report["seen"] == {} for report in reports), "a batch was trained"
    assert len({report["global_step"] for report in reports}) == 1
    assert_one_model(tmp_path / "again", 2)


def test_a_second_fit_continues_one_budget_on_every_rank(tmp_path: Path) -> None:
    """max_steps 15, then raised to 25 on the same Trainer: 2 x 10 more steps, every rank ends in the same epoch.

    20 batches an epoch: the first fit trains epoch 0 and 10 batches of epoch 1, the second fit all of epoch 2."""
    reports = run_app(
        tmp_path, "--devices", "2", *DYNAMIC, "--samples", "320", "--epochs", "-1", "--max-steps", "15",
        "--refit-max-steps", "25", *SLOW_RANK_1, timeout=120,
    )
    assert sum(r["global_step"] for r in reports) == 2 * 25
    assert len({r["current_epoch"] for r in reports}) == 1, "the ranks ended in different epochs"
    for epoch in (0, 2):
        assert sorted(trained_in_epoch(reports, epoch)) == list(range(320)), f"epoch {epoch}: not every sample once"
    assert len(set(trained_in_epoch(reports, 1))) == len(trained_in_epoch(reports, 1)) == 10 * 16
    assert_one_model(tmp_path, 2)


def test_an_estimate_read_in_setup_before_a_resume_keeps_the_resumed_epoch_and_budget(tmp_path: Path) -> None:
    settings = ("--devices", "2", *DYNAMIC, "--samples", "320", "--epochs", "5", "--max-steps", "15", *SLOW_RANK_1)
    run_app(tmp_path / "first", *settings, "--epochs", "1")
    checkpoint = next((tmp_path / "first" / "ckpt").glob("epoch=0-*.ckpt"))
    resumed = run_app(tmp_path / "resumed", *settings, "--estimate-in-setup", "--resume", str(checkpoint))
    assert [r["setup_estimate"] for r in resumed] == [15.0, 15.0]
    after = sum(r["global_step"] - r["started"]["global_step"] for r in resumed)
    assert after == 2 * 15 - 20, f"the first epoch spent 20 of the 30 batches; the resumed run trained {after}"
    order = permutation(320, SEED, 1)  # epoch 1's order: the first 10 chunks are the budget's rest
    expected = sorted(sorted(order[16 * chunk : 16 * chunk + 16]) for chunk in range(10))
    trained = sorted(sorted(batch) for report in resumed for batch in report["batches"]["1"])
    assert trained == expected, "the resumed epoch did not train epoch 1's first 10 chunks"
    assert_one_model(tmp_path / "resumed", 2)


@pytest.mark.parametrize("sharing", ["static", "dynamic"])
def test_sigterm_at_one_workers_epoch_end_stops_every_worker_at_one_point(tmp_path: Path, sharing: str) -> None:
    """No validation, an epoch-end ``sync_dist`` metric: rank 0 ends its epoch first (rank 1 is slow) and SIGTERMs
    every process from its ``on_train_epoch_end``; rank 1 may still be training."""
    outcome = run_outcome(
        tmp_path, "--devices", "2", "--work-sharing", sharing, "--samples", "320", "--epochs", "3", "--no-val",
        "--sleep-rank", "1", "--sleep", "0.05", "--sigterm-rank", "0", "--sigterm-epoch-end", "0", timeout=20,
        forked=True,
    )
    assert outcome.returncode == 0, outcome.output[-3000:]
    assert "fedhog: stopped by SIGTERM at epoch 0" in outcome.output, outcome.output[-3000:]
    checkpoint = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=False)
    assert checkpoint["fedhog"]["world_size"] == 2
