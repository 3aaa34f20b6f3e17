"""Partial backprop: only the worker's block gets gradients and changes; frozen parameters stay frozen."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_fedhog import internals
from lightning_fedhog.partial import PartialSteps, first_partial_epoch, gradients_only_for, record_positions
from lightning_fedhog.partitions import partition_tensors, tensor_costs


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4),
    )


def _step(model: nn.Module, keep: range | None) -> tuple[list[bool], bool]:
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    before = [p.detach().clone() for p in params]
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    partial = False
    if keep is None:
        loss = nn.functional.cross_entropy(model(x), y)
    else:
        with gradients_only_for(params, keep) as partial:
            loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return [not torch.equal(p, b) for p, b in zip(params, before, strict=True)], partial


def test_partial_step_changes_only_the_block_and_full_steps_change_everything() -> None:
    model = _cnn()
    blocks = partition_tensors([p.numel() for p in model.parameters()], 2)
    for block in blocks:
        changed, partial = _step(model, block)
        assert partial
        assert changed == [index in block for index in range(len(changed))]
        assert all(p.requires_grad for p in model.parameters()), "flags must be restored after the step"
    changed, _ = _step(model, None)
    assert all(changed)


def test_frozen_parameters_stay_frozen_and_unchanged() -> None:
    model = _cnn()
    params = list(model.parameters())
    params[0].requires_grad_(False)  # the user froze the first convolution's weight
    frozen = params[0].detach().clone()
    changed, partial = _step(model, range(0, 2))
    assert partial and changed == [False, True] + [False] * (len(params) - 2)
    assert not params[0].requires_grad and torch.equal(params[0], frozen)
    # a block made only of frozen tensors: the step falls back to a full step of what is trainable
    changed, partial = _step(model, range(0, 1))
    assert not partial and changed == [False] + [True] * (len(params) - 1)
    assert not params[0].requires_grad


def test_positions_measure_where_each_weight_is_applied() -> None:
    model = _cnn()
    positions, remove = record_positions(model)
    model(torch.randn(2, 3, 8, 8))
    remove()
    per_tensor = [positions[id(p)] for p in model.parameters()]
    assert per_tensor == [64, 64, 64, 64, 1, 1, 1, 1]
    costs = tensor_costs([p.numel() for p in model.parameters()], per_tensor, "compute")
    assert costs[0] == 8 * 3 * 3 * 3 * 64
    model(torch.randn(2, 3, 8, 8))
    assert len(positions) == len(per_tensor), "hooks must be gone after remove()"


def _hooks(module: nn.Module) -> int:
    return sum(internals.forward_hook_count(layer) for layer in module.modules())


def test_the_measuring_hooks_go_after_the_first_step_or_at_the_end_of_a_fit_that_took_none() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    steps = PartialSteps(start=0, partition="compute", rotate=False)
    steps.begin(model, max_epochs=5, workers=2)
    assert _hooks(model) > 0
    steps.clear()  # the fit ended before its first training step
    assert _hooks(model) == 0
    steps.begin(model, max_epochs=5, workers=2)
    with steps.step(model, epoch=0, worker_steps=1, slot=0):
        model(torch.ones(3, 4))  # the first forward pass measures, then the hooks go
    assert _hooks(model) == 0


def test_a_share_of_the_run_starts_partial_steps_after_that_many_epochs() -> None:
    assert first_partial_epoch(3, None) == 3  # an epoch number needs no bound
    assert first_partial_epoch(0.1, 100) == 10  # the reference's 30 of 300 epochs
    assert first_partial_epoch(0.1, 90) == 9
    assert first_partial_epoch(0.1, 5) == 1  # at least one epoch of full steps
    for unbounded in (None, -1):
        with pytest.raises(ValueError, match=r"has no `max_epochs` \(got .*\). HINT: set `Trainer\(max_epochs=...\)`"):
            first_partial_epoch(0.1, unbounded)


def _partial_step_seen(steps: PartialSteps, model: nn.Module, epoch: int, worker_steps: int) -> bool:
    with steps.step(model, epoch=epoch, worker_steps=worker_steps, slot=0):
        return not all(p.requires_grad for p in model.parameters())


def test_full_steps_until_the_first_partial_epoch_then_every_other_step_is_partial() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    steps = PartialSteps(start=0.25, partition="numel", rotate=False)
    steps.begin(model, max_epochs=8, workers=2)
    assert steps.start_epoch == 2
    seen = {(epoch, step): _partial_step_seen(steps, model, epoch, step) for epoch in range(4) for step in range(4)}
    assert seen == {(epoch, step): epoch >= 2 and step % 2 == 1 for epoch in range(4) for step in range(4)}
