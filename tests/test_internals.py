"""Canaries: every private Lightning and torch name that lightning_fedhog/internals.py relies on is still there.

Each test takes well under a second and fails with the name that moved and the function of ``internals.py`` that
uses it, so an upgrade of Lightning or torch says what to look at instead of failing somewhere in a training run.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Callable
from datetime import timedelta

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.strategies.ddp import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from lightning_fedhog import internals

HELPERS = [
    ("lightning.fabric.utilities.distributed", "_init_dist_connection"),
    ("lightning.fabric.utilities.distributed", "_set_num_threads_if_needed"),
    ("lightning.fabric.utilities.distributed", "_sync_ddp_if_available"),
    ("lightning.fabric.utilities.optimizer", "_optimizer_to_device"),
    ("lightning.fabric.utilities.optimizer", "_optimizers_to_device"),
    ("lightning.pytorch.overrides.distributed", "_sync_module_states"),
    ("lightning.pytorch.utilities.data", "_update_dataloader"),
    ("lightning.pytorch.strategies.launchers.subprocess_script", "_SubprocessScriptLauncher"),
    ("lightning.fabric.strategies", "_StrategyRegistry"),
    ("lightning.fabric.utilities.types", "_PATH"),
]

# Lightning bodies that fedhog's versions follow (FedHogStrategy.setup, FedHogLauncher.launch): when one changes
# upstream, compare it with fedhog's version, carry over what matters, then record the new fingerprint here.
FINGERPRINTS = {
    "DDPStrategy.setup": (DDPStrategy.setup, "3e1dd84901a333f1"),
    "_SubprocessScriptLauncher.launch": (_SubprocessScriptLauncher.launch, "16cdd0a2d94b8f47"),
}


@pytest.fixture(scope="module")
def trainer() -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)


def _has(owner: object, name: str, used_by: Callable) -> None:
    assert hasattr(owner, name), (
        f"{type(owner).__name__ if not isinstance(owner, type) else owner.__name__}.{name} is gone: update"
        f" lightning_fedhog.internals.{used_by.__name__}"
    )


@pytest.mark.parametrize(("module", "name"), HELPERS, ids=[name for _, name in HELPERS])
def test_lightning_helpers_still_exist(module: str, name: str) -> None:
    assert hasattr(importlib.import_module(module), name), f"{module}.{name} is gone: update lightning_fedhog.internals"


@pytest.mark.parametrize("name", list(FINGERPRINTS))
def test_lightning_bodies_that_fedhog_follows_are_unchanged(name: str) -> None:
    function, recorded = FINGERPRINTS[name]
    now = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]
    assert now == recorded, f"Lightning changed {name} ({recorded} -> {now}): review fedhog's version of it"


def test_trainer_internals(trainer: L.Trainer) -> None:
    epoch_loop = trainer.fit_loop.epoch_loop
    _has(epoch_loop, "_broadcast_sigterm_tensor", internals.replace_sigterm_broadcast)
    internals.replace_sigterm_broadcast(trainer, lambda: None)
    assert epoch_loop._broadcast_sigterm_tensor() is None
    internals.restore_sigterm_broadcast(trainer)
    assert "_broadcast_sigterm_tensor" not in epoch_loop.__dict__
    _has(trainer._signal_connector, "_original_handlers", internals.user_sigterm_handler)
    assert isinstance(trainer._signal_connector._original_handlers, dict)
    _has(trainer._checkpoint_connector, "hpc_save_path", internals.preemption_checkpoint_path)
    assert str(internals.preemption_checkpoint_path(trainer)).endswith(".ckpt")
    _has(trainer._checkpoint_connector, "dump_checkpoint", internals.dump_checkpoint)
    _has(trainer._logger_connector, "_first_loop_iter", internals.in_training_batch)
    assert internals.in_training_batch(trainer) is False
    _has(trainer._logger_connector, "_progress_bar_metrics", internals.show_in_progress_bar)
    internals.show_in_progress_bar(trainer, "canary", 1.0)
    assert trainer.progress_bar_metrics["canary"] == 1.0
    _has(epoch_loop, "_batches_that_stepped", internals.logging_step)
    assert internals.logging_step(trainer) == 0
    _has(trainer, "_val_check_time_interval", internals.time_based_val_check)
    assert internals.time_based_val_check(trainer) is None
    assert internals.time_based_val_check(L.Trainer(accelerator="cpu", val_check_interval="00:00:00:10")) == 10.0


def test_model_checkpoint_internals() -> None:
    by_steps = ModelCheckpoint(every_n_train_steps=5)
    by_time = ModelCheckpoint(train_time_interval=timedelta(seconds=3))
    for name in ("_every_n_train_steps", "_train_time_interval"):
        _has(by_steps, name, internals.step_or_time_trigger)
    for name in ("_save_last_checkpoint", "_monitor_candidates"):
        _has(by_steps, name, internals.refresh_last_checkpoint)
    assert internals.step_or_time_trigger(by_steps) == "every_n_train_steps=5"
    assert internals.step_or_time_trigger(by_time) == "train_time_interval=0:00:03"
    assert internals.step_or_time_trigger(ModelCheckpoint()) is None
    assert internals.saves_by_time(by_time) and not internals.saves_by_time(by_steps)


@pytest.mark.parametrize("name", list(internals.OVERRIDE_POINTS))
def test_strategy_and_launcher_override_points(name: str) -> None:
    owner, used_for = internals.OVERRIDE_POINTS[name]
    instance_names = set(vars(DDPStrategy())) if owner is DDPStrategy else set()
    assert hasattr(owner, name) or name in instance_names, (
        f"{owner.__name__}.{name} is gone: {used_for}; update lightning_fedhog.internals.OVERRIDE_POINTS and its user"
    )


def test_lightning_module_trainer() -> None:
    module = L.LightningModule()
    _has(module, "_trainer", internals.attached_trainer)
    assert internals.attached_trainer(module) is None and internals.attached_trainer(None) is None


def test_a_stop_on_sigterm_ends_the_script_with_status_0() -> None:
    # what the SIGTERM tests assert on the exit status, and what a SLURM requeue script sees
    assert issubclass(SIGTERMException, SystemExit) and SIGTERMException().code is None


def test_torch_internals() -> None:
    assert callable(dist.distributed_c10d._get_default_store), "update lightning_fedhog.internals.default_store"
    assert hasattr(dist, "set_timeout") or hasattr(dist.distributed_c10d, "_set_pg_timeout"), (
        "update lightning_fedhog.internals.set_default_timeout"
    )
    parameters, buffers = internals.registered_tensors(nn.BatchNorm1d(2))
    assert set(parameters) == {"weight", "bias"} and "running_mean" in buffers
    assert callable(torch.multiprocessing.reductions.reduce_tensor), "update lightning_fedhog.internals.cuda_ipc_handle"
    linear = nn.Linear(1, 1)
    linear.register_forward_hook(lambda *_: None)
    assert internals.forward_hook_count(linear) == 1, "update lightning_fedhog.internals.forward_hook_count"


def test_estimated_stepping_batches_can_be_overridden_per_trainer_and_given_back() -> None:
    assert isinstance(L.Trainer.__dict__.get("estimated_stepping_batches"), property), (
        "Trainer.estimated_stepping_batches is no longer a property: update"
        " lightning_fedhog.internals.override_estimated_stepping_batches"
    )
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, max_epochs=-1, max_steps=7)
    other = L.Trainer(accelerator="cpu", devices=1, logger=False, max_epochs=-1, max_steps=7)
    answers: list[float | None] = [42.0, None]
    internals.override_estimated_stepping_batches(trainer, lambda: answers[0])
    assert isinstance(trainer, L.Trainer) and type(trainer).__name__ == "Trainer"
    assert trainer.estimated_stepping_batches == 42
    answers[0] = answers[1]
    assert trainer.estimated_stepping_batches == 7, "None: Lightning's own estimate"
    assert other.estimated_stepping_batches == 7, "other trainers are untouched"
    internals.restore_trainer_class(trainer)
    assert type(trainer) is L.Trainer


def test_training_loop_internals_for_dynamic_work_sharing(trainer: L.Trainer) -> None:
    _has(trainer.fit_loop, "_data_fetcher", internals.restart_training_iterator)
    internals.restart_training_iterator(trainer)  # no iterator before `fit`: nothing to do
    for name in ("done", "_is_training_done"):
        assert isinstance(type(trainer.fit_loop.epoch_loop).__dict__.get(name), property), (
            f"the training epoch loop's `{name}` is no longer a property: update"
            " lightning_fedhog.internals.epoch_ends_after_this_batch"
        )
    current = trainer.fit_loop.epoch_loop.batch_progress.current
    for name in ("ready", "started"):
        _has(current, name, internals.skipped_rest_of_epoch)
    assert internals.skipped_rest_of_epoch(trainer) is False
    user_sampler = torch.utils.data.SubsetRandomSampler(range(4))
    wrapped = DistributedSamplerWrapper(user_sampler, num_replicas=2, rank=0)
    _has(wrapped.dataset, "_sampler", internals.sampler_inside_wrapper)
    assert internals.sampler_inside_wrapper(wrapped) is user_sampler
    assert internals.sampler_inside_wrapper(user_sampler) is None


def test_a_checkpoint_dumped_during_the_last_batch_can_be_reopened() -> None:
    """The rescue's two touches: the checkpoint Lightning would save now, and its `is_last_batch` flag."""
    dumped: dict = {}

    class Dump(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, module: object, batch: object, index: int) -> None:
            if index == 1:
                dumped.update(internals.dump_checkpoint(trainer))

    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[Dump()], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(BoringModel())
    assert {"state_dict", "loops", "optimizer_states", "callbacks"} <= set(dumped)
    progress = dumped["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    assert progress["is_last_batch"] is True, "update lightning_fedhog.internals.reopen_epoch"
    internals.reopen_epoch(dumped)
    assert progress["is_last_batch"] is False
