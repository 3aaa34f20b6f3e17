"""A device's shared copy of the model over one ``fit``: made at set-up, equal on every device, handed back at the end.

At set-up every worker maps its device's flat vector (:class:`~lightning_fedhog.shared_buffer.SharedFlatBuffer`),
the leader copies the module's values in, and the device leaders get rank 0's values over their own group, so
every device starts from the same model. At the end, on CUDA, the leader's memory must outlive its followers' use
of it through IPC, so the leader waits (briefly, best effort) until they let go.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_fedhog.device_sync import AveragingBackend, leader_backend, settle
from lightning_fedhog.placement import Placement
from lightning_fedhog.shared_buffer import FlatLayout, SharedFlatBuffer, bind_module, hand_back

RELEASE_SECONDS = 15.0
"""The longest a device leader waits at the end of ``fit`` for its workers to let go of the shared vector."""


@dataclass
class DeviceCopy:
    """The shared vector of this worker's device, and the leaders' group it is averaged over (None: one device)."""

    buffer: SharedFlatBuffer
    leader_group: Any
    leader_backend: str | None


def share_parameters(
    module: nn.Module,
    layout: FlatLayout,
    place: Placement,
    device: torch.device,
    devices: list[torch.device],
    store: Any,
    key: str,
    timeout: timedelta,
    backend: AveragingBackend,
) -> DeviceCopy:
    """Moves ``module`` into its device's shared vector and gives every device rank 0's values.

    Every rank of the run calls it (creating the leaders' group is a collective over all of them).
    """
    buffer = SharedFlatBuffer.open(
        layout=layout, device=device, store=store, key=key, slot=place.slot, num_workers=place.workers_per_device,
        timeout=timeout,
    )
    bind_module(module, buffer.flat, layout, copy_values=place.is_leader)
    group, chosen = None, None
    if place.num_devices > 1:
        # a new group is a collective over the default group: every rank creates it, only leaders use it
        chosen = leader_backend(backend, devices)
        group = dist.new_group(place.leader_ranks, timeout=timeout, backend=chosen)
        if place.is_leader:
            dist.broadcast(buffer.flat, src=0, group=group)
    # the leader's copy and the broadcast are only queued on CUDA: done before any follower reads the buffer
    settle(device)
    return DeviceCopy(buffer, group, chosen)


def release(device: torch.device, place: Placement, store: Any, key: str, timeout: timedelta) -> None:
    """At the end of ``fit`` on CUDA: the leader keeps its memory until its followers have let go (at most 15 s).

    On CPU the ``/dev/shm`` mapping lives until the last process that holds it lets go: nothing to wait for.
    """
    if place.workers_per_device == 1 or device.type != "cuda" or not dist.is_initialized():
        return
    settle(device)
    wait_seconds = min(timeout.total_seconds(), RELEASE_SECONDS)
    hand_back(store, key, place.slot, place.workers_per_device, wait_seconds)
