"""Partial backprop (LPP-SGD): a step that computes and applies gradients only for the worker's own block.

``requires_grad`` is a per-process attribute of a parameter, so switching it off in one worker's process leaves
the other workers' steps untouched even though all of them share the parameter's memory. Autograd records
which leaves need gradients when the graph is built, so the flags only have to be off during the forward pass;
parameters outside the block then get no gradient, and torch optimizers skip parameters whose ``grad`` is None
(Chatterjee et al., ICDCS 2024, Sec. IV: partial backpropagation shortens the backward pass and lowers write
conflicts between the Hogwild! workers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor, nn


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
