"""Hostile configurations and inputs: each one either trains correctly or fails fast with a clear error.

Modules fedhog cannot share and Trainer settings that would hang are refused in the launching process, before
any worker is spawned. Inputs that only the workers can see (data with no length, shards of different lengths)
fail in every worker at the start of `fit`, well before `timeout`. Manual optimization and gradient accumulation
are supported: the probe parameter proves every optimizer step landed and the consensus is the exact mean.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from lightning_fedhog import FedHogConfig, FedHogStrategy
from lightning_fedhog.checks import checked_layout
from tests.conftest import MARGIN, TIMEOUT, fit_refused, load_rank, run_app, run_outcome


class _Module(L.LightningModule):
    def __init__(self, with_layer: bool = True, integral: bool = False) -> None:
        super().__init__()
        if with_layer:
            self.layer = nn.Linear(2, 2)
        if integral:
            self.counts = nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_module_without_parameters_is_refused_before_spawning() -> None:
    message = r"_Module has none. HINT: create the layers in `__init__` or `configure_model`"
    fit_refused(_Module(with_layer=False), message)


def test_a_module_that_builds_its_layers_in_configure_model_passes_the_launcher() -> None:
    # in the launching process the layers do not exist yet; the workers check again after `configure_model`
    checked_layout(FedHogConfig(), _Module(with_layer=False), built=False)
    with pytest.raises(ValueError, match="has none"):
        checked_layout(FedHogConfig(), _Module(with_layer=False), built=True)


def test_a_non_floating_parameter_is_refused_before_spawning() -> None:
    fit_refused(_Module(integral=True), r"non-floating parameter\(s\) \['counts'\].*HINT: .*`register_buffer`")


class _LazyModule(_Module):
    def __init__(self, warmed_up: bool) -> None:
        super().__init__(with_layer=False)
        self.layer = nn.LazyLinear(2)
        if warmed_up:  # what DDP also asks for: one forward pass gives the lazy layer its shape
            self.layer(torch.zeros(1, 3))


def test_a_lazy_layer_is_refused_before_spawning_until_a_forward_pass_has_shaped_it() -> None:
    fit_refused(_LazyModule(warmed_up=False), r"lazy parameters or buffers .*\['layer.weight', 'layer.bias'\].*HINT:"
                r" run one forward pass")
    layout = checked_layout(FedHogConfig(), _LazyModule(warmed_up=True))
    assert layout.num_elements == 2 * 3 + 2


def test_a_time_based_val_check_interval_is_refused_before_spawning() -> None:
    message = r"time-based `val_check_interval` \(60.0 s\).*HINT: use a float"
    fit_refused(_Module(), message, val_check_interval="00:00:01:00")


def test_max_time_with_dynamic_work_sharing_is_refused_before_spawning() -> None:
    fit_refused(
        _Module(), r"`Trainer\(max_time=\.\.\.\)`.*would hang.*HINT: bound the run with `max_epochs`",
        strategy=FedHogStrategy(work_sharing="dynamic"), max_time="00:00:10:00",
    )


def _probe_is_the_exact_mean(out: Path, world_size: int, steps: int) -> None:
    states = [load_rank(out, rank)["state_dict"] for rank in range(world_size)]
    for state in states[1:]:
        assert all(torch.equal(state[key], value) for key, value in states[0].items())
    # probe[r] got a gradient of exactly 1 per optimizer step of rank r (lr 1/8), on r's device only
    assert torch.equal(states[0]["probe"], torch.full((world_size,), -steps * 0.125 / 2))


# K=2 workers write the probe tensor lock-free (Hogwild!): when two writes collide, one is lost, as the method
# allows; rare, but under a loaded machine the exact count can then miss a step. A rerun tells that from a bug.
@pytest.mark.flaky(reruns=2)
def test_manual_optimization_trains_to_one_consensus_model(tmp_path: Path) -> None:
    reports = run_app(tmp_path, "--devices", "2", "--workers", "2", "--kind", "manual", "--epochs", "2")
    steps = 2 * 4  # 256 samples / 4 workers / batch 16, two epochs
    assert {r["global_step"] for r in reports} == {steps}
    _probe_is_the_exact_mean(tmp_path, 4, steps)
    assert reports[0]["metrics"]["val_acc"] > 0.9


# K=2 workers write the probe tensor lock-free (Hogwild!): when two writes collide, one is lost, as the method
# allows; rare, but under a loaded machine the exact count can then miss a step. A rerun tells that from a bug.
@pytest.mark.flaky(reruns=2)
def test_gradient_accumulation_steps_every_second_batch(tmp_path: Path) -> None:
    reports = run_app(tmp_path, "--devices", "2", "--workers", "2", "--accumulate", "2", "--epochs", "2")
    steps = 2 * 4 // 2  # 8 batches per worker, one optimizer step per 2 (Lightning scales each loss by 1/2)
    assert {r["global_step"] for r in reports} == {steps}
    _probe_is_the_exact_mean(tmp_path, 4, steps)


@pytest.mark.parametrize(
    ("data", "message"),
    [("iterable", "has no length (an `IterableDataset`)"), ("uneven", "different numbers of training batches")],
)
def test_data_that_gives_workers_different_step_counts_fails_fast_in_every_worker(
    tmp_path: Path, data: str, message: str
) -> None:
    outcome = run_outcome(tmp_path, "--devices", "2", "--data", data, "--epochs", "1", forked=True)
    assert outcome.returncode != 0
    assert message in outcome.output and "HINT: give every worker the same number of batches" in outcome.output
    assert outcome.output.count(message) >= 2, "every worker must stop on its own, not wait for a peer"
    assert "did not reach" not in outcome.output  # refused at the start, not found by a timeout


def test_max_time_with_static_sharing_warns_and_stops_every_worker_together(tmp_path: Path) -> None:
    # the Timer broadcasts every step (lock-step, warned about), and stops all workers at the same step
    outcome = run_outcome(tmp_path, "--devices", "2", "--workers", "2", "--epochs", "1000", "--samples", "128",
                          "--max-time", "00:00:00:03", timeout=TIMEOUT + MARGIN, forked=True)
    assert outcome.returncode == 0, outcome.output[-3000:]
    assert "Time limit reached" in outcome.output  # (the lock-step warning: tests/test_config.py)
    steps = {load_rank(tmp_path, rank)["state_dict"]["probe"][rank].item() for rank in range(4)}
    assert len(steps) == 1, f"workers stopped after different step counts: {steps}"
    assert (tmp_path / "ckpt" / "last.ckpt").exists()


def test_a_fit_that_fails_while_the_parameters_are_shared_gives_the_module_its_memory_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A peer that died during its own set-up fails the barrier after this worker's parameters moved into the shared
    vector, before the fit knows of the copy: the module must not be left pointing into it."""
    strategy = FedHogStrategy(workers_per_device=1)
    barrier = strategy.barrier

    def failing_barrier(name: str | None = None) -> None:
        if name == "fedhog-shared":
            raise RuntimeError("a peer died during its set-up")
        barrier(name)

    monkeypatch.setattr(strategy, "barrier", failing_barrier)
    module = _Module()
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_epochs=1, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 2)), batch_size=4)
    with pytest.raises(RuntimeError, match="a peer died during its set-up"):
        trainer.fit(module, data)
    weight = module.layer.weight
    assert weight.untyped_storage().nbytes() == weight.numel() * weight.element_size(), "still a view of the vector"
