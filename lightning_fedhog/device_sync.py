"""Where the device leaders talk, and how one party hands the shared CUDA buffer to another.

Two concerns of the CUDA path that CPU runs never show:

- **The leaders' backend.** NCCL runs one rank per GPU: it refuses two leaders on the same GPU (several devices
  mapped to one GPU for testing, MIG slices seen as one device, a GPU shared by two jobs). Gloo averages CUDA
  tensors too, through host memory, so it is the backend wherever a GPU hosts more than one device, and on CPU.
- **Stream ordering at hand-over points.** Every worker writes the shared vector from its own process and CUDA
  stream; the leader's averaging engine writes it from a side stream. A host thread that reaches a barrier has
  only *queued* its kernels: the last optimizer step may still be running when another process starts reading
  or overwriting the vector. Wherever the buffer changes hands (parking for a consensus point, the initial
  broadcast, the end of ``fit``, before a follower lets go of the leader's memory), the writer waits for its
  own stream first (:func:`settle`); kernels queued after a completed host-side wait see the writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch

AveragingBackend = Literal["auto", "nccl", "gloo"]
"""How device leaders talk: ``"auto"`` (NCCL between distinct GPUs, gloo otherwise), or forced."""

AVERAGING_BACKENDS: tuple[str, ...] = get_args(AveragingBackend)


def leader_backend(choice: AveragingBackend, devices: Sequence[torch.device]) -> Literal["nccl", "gloo"]:
    """The backend of the leaders' group for the devices of one node (every node has the same list).

    Args:
        choice: the ``averaging_backend`` knob.
        devices: the node's devices, one entry per fedhog device (repeated when several share one GPU).

    Raises:
        ValueError: ``"nccl"`` asked for CPU devices, or for devices that share a GPU.
    """
    cuda = bool(devices) and all(device.type == "cuda" for device in devices)
    shared = sorted({str(device) for device in devices if list(devices).count(device) > 1})
    if choice == "gloo":
        return "gloo"
    if choice == "nccl":
        if not cuda:
            raise ValueError(
                "`averaging_backend='nccl'` needs CUDA devices, but this run's devices are"
                f" {[str(device) for device in devices]}. HINT: use `averaging_backend='auto'` (gloo on CPU)."
            )
        if shared:
            raise ValueError(
                f"`averaging_backend='nccl'` cannot put two device leaders on one GPU ({', '.join(shared)} hosts"
                " several devices) and NCCL refuses duplicate GPUs. HINT: use `averaging_backend='auto'` or 'gloo'"
                " (leaders average through host memory), or give every device its own GPU."
            )
        return "nccl"
    return "nccl" if cuda and not shared else "gloo"


def settle(device: torch.device) -> None:
    """Waits until the work this thread queued on ``device`` is done (nothing to wait for on CPU).

    Only the calling thread's current stream: the training step's kernels (forward, backward, optimizer, AMP
    scaling) all run there; the engine's side stream has its own waits.
    """
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
