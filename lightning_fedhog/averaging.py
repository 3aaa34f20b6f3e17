"""Non-blocking in-place averaging math, as free functions over tensors and a process group.

The live vector keeps changing while the exchange is in flight, because the device's workers keep stepping.
Writing the average back would erase those steps. Instead each round applies only the correction the exchange
asks for, ``x += avg(s) - s`` where ``s`` is the snapshot that was sent (Chatterjee et al., ICDCS 2024,
Alg. 1: "non-blocking in-place averaging"). With no concurrent writes this is exactly ``x = avg(s)``; with them,
the updates made during the exchange survive.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def apply_average_delta_(live: Tensor, snapshot: Tensor, averaged: Tensor) -> None:
    """In place: ``live += averaged - snapshot``."""
    live.add_(averaged - snapshot)


def exchange_average_(live: Tensor, group: Any, world_size: int, flag: float = 0.0, *, exact: bool = False) -> float:
    """Averages ``live`` over ``group`` in place and sums a control flag in the same message.

    The flag rides in the last element of the one all-reduce message, so agreeing on pause and stop needs no
    extra collective (a second channel could interleave differently on different leaders and deadlock).

    Args:
        live: the block of the shared vector (a view); read once for the snapshot, then corrected in place.
        group: process group of the device leaders.
        world_size: number of members of ``group``.
        flag: this leader's control value (e.g. 1.0 = "I want to pause").
        exact: nobody writes ``live`` meanwhile (workers are parked): overwrite it with the average, so every
            leader ends with the same bits; ``s + (avg - s)`` would differ from ``avg`` by rounding.

    Returns:
        The sum of all leaders' flags.
    """
    message = torch.empty(live.numel() + 1, dtype=live.dtype, device=live.device)
    message[:-1].copy_(live.reshape(-1))
    message[-1] = flag
    snapshot = message[:-1].clone()
    dist.all_reduce(message, op=dist.ReduceOp.SUM, group=group)
    flags = float(message[-1].item())
    averaged = message[:-1].div_(world_size)
    if exact:
        live.view(-1).copy_(averaged)
    else:
        apply_average_delta_(live.view(-1), snapshot, averaged)
    return flags
