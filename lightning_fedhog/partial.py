"""Partial backprop (LPP-SGD): a step that computes and applies gradients only for the worker's own block.

``requires_grad`` is a per-process attribute of a parameter, so switching it off in one worker's process leaves
the other workers' steps untouched even though all of them share the parameter's memory. Autograd records
which leaves need gradients when the graph is built, so the flags only have to be off during the forward pass;
parameters outside the block then get no gradient, and torch optimizers skip parameters whose ``grad`` is None
(Chatterjee et al., ICDCS 2024, Sec. IV: partial backpropagation shortens the backward pass and lowers write
conflicts between the Hogwild! workers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor, nn

from lightning_fedhog.partitions import Partition, owned_block, partition_tensors, tensor_costs


def first_partial_epoch(setting: int | float, max_epochs: int | None) -> int:
    """The first epoch with partial steps: ``setting`` itself when it is an epoch number, else that share of the run.

    The paper's reference code runs full steps for about a tenth of training first (its ``prepassmepochs``: 30 of
    300 epochs on CIFAR-10, 20 of 200 on WRN-16-8, 6 of 90 on ImageNet), while the model moves fastest and a step
    that updates one block only is furthest from the full step it stands in for (Chatterjee et al., ICDCS 2024).
    A share keeps that proportion whatever ``max_epochs`` is.

    Raises:
        ValueError: a share, but the run is not bounded by ``max_epochs``.
    """
    if not isinstance(setting, float):
        return setting
    if max_epochs is None or max_epochs < 1:
        raise ValueError(
            f"`partial_backprop={setting}` starts partial steps after that share of the run's epochs, but the"
            f" Trainer has no `max_epochs` (got {max_epochs}). HINT: set `Trainer(max_epochs=...)`, or give the"
            " first epoch with partial steps as an integer, e.g. `partial_backprop=10`."
        )
    return math.ceil(setting * max_epochs)


@contextmanager
def gradients_only_for(parameters: Sequence[nn.Parameter], keep: range) -> Iterator[bool]:
    """Within the block, only ``parameters[keep]`` that currently require gradients keep requiring them.

    Whatever the user froze stays frozen, and every flag is restored on exit, also after an exception, so user
    code that freezes or unfreezes layers between steps keeps working.

    Yields:
        Whether the step is partial; False when none of the kept parameters is trainable (a full step then).
    """
    saved = [parameter.requires_grad for parameter in parameters]
    if not any(saved[index] for index in keep):
        yield False
        return
    try:
        for index, parameter in enumerate(parameters):
            if saved[index] and index not in keep:
                parameter.requires_grad_(False)
        yield True
    finally:
        for parameter, flag in zip(parameters, saved, strict=True):
            parameter.requires_grad_(flag)


def record_positions(module: nn.Module) -> tuple[dict[int, int], Callable[[], None]]:
    """Measures, on the next forward pass, at how many positions each parameter is applied per sample.

    A convolution's weight is applied at every output position, a linear layer's once per sample (per token
    for sequences). Combined with the element count this estimates a tensor's gradient work
    (:func:`~lightning_fedhog.blocks.tensor_costs`).

    Returns:
        ``{id(parameter): positions}``, filled by the forward pass, and a function that removes the hooks.
    """
    positions: dict[int, int] = {}
    handles = []

    def hook(owner: nn.Module, inputs: object, output: object) -> None:
        if not isinstance(output, Tensor) or output.dim() < 2:
            return
        params = list(owner.parameters(recurse=False))
        channels = params[0].shape[0] if params and params[0].dim() >= 1 else 1
        per_sample = output.numel() // max(output.shape[0], 1)
        count = per_sample // channels if channels and per_sample % channels == 0 else 1
        for parameter in params:
            positions.setdefault(id(parameter), max(count, 1))

    for submodule in module.modules():
        if any(True for _ in submodule.parameters(recurse=False)):
            handles.append(submodule.register_forward_hook(hook))

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return positions, remove


class PartialSteps:
    """One worker's partial-backprop schedule: odd steps from the first partial epoch on touch only the worker's block.

    The K blocks are groups of parameter tensors (:func:`~lightning_fedhog.blocks.partition_tensors`), computed once
    per ``fit`` on the first partial step; with ``partition="compute"`` the first forward pass measures where each
    parameter is applied (:func:`record_positions`) and no step is partial until it has.

    Args:
        start: ``partial_backprop``: the first epoch with partial steps, or a share of ``max_epochs``
            (:func:`first_partial_epoch`), resolved when training starts.
        partition: ``"numel"`` or ``"compute"``.
        rotate: move to the next block every epoch.
    """

    def __init__(self, start: int | float, partition: Partition, rotate: bool) -> None:
        self.start, self.partition, self.rotate = start, partition, rotate
        self.start_epoch, self.workers = 0, 0  # known when training starts (`begin`)
        self._positions: dict[int, int] = {}
        self._remove_hooks: Callable[[], None] | None = None
        self._blocks: list[range] | None = None
        self._parameters: list[nn.Parameter] = []

    def begin(self, module: nn.Module, max_epochs: int | None, workers: int) -> None:
        """Training starts: a new model may have come, and ``"compute"`` measures it on the next forward pass.

        Args:
            workers: K, the workers of a device (one block each).
        """
        self.start_epoch = first_partial_epoch(self.start, max_epochs)
        self.workers = workers
        self._blocks, self._parameters = None, []
        if self.partition == "compute":
            self._positions, self._remove_hooks = record_positions(module)

    @contextmanager
    def step(self, module: nn.Module, epoch: int, worker_steps: int, slot: int) -> Iterator[None]:
        """Runs a training step: a partial one (only this worker's block requires gradients) when it is one."""
        if self._remove_hooks is not None or epoch < self.start_epoch or worker_steps % 2 == 0:
            yield
            self._stop_measuring()  # the first forward pass measured the positions
            return
        if self._blocks is None:  # computed once per fit: the parameters do not change during it
            self._parameters = list(module.parameters())
            numels = [parameter.numel() for parameter in self._parameters]
            positions = [self._positions.get(id(parameter), 1) for parameter in self._parameters]
            self._blocks = partition_tensors(tensor_costs(numels, positions, self.partition), self.workers)
        block = owned_block(slot, epoch, self.workers, self.rotate)
        with gradients_only_for(self._parameters, self._blocks[block]):
            yield

    def clear(self) -> None:
        """The end of ``fit``: a later one may bring another model (a fit that ended before its first step still
        has the measuring hooks on the module: they go too)."""
        self._stop_measuring()
        self._blocks, self._parameters = None, []

    def _stop_measuring(self) -> None:
        if self._remove_hooks is not None:
            self._remove_hooks()
            self._remove_hooks = None
