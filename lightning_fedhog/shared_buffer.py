"""One flat parameter vector per device, shared by the device's K worker processes.

All floating parameters and floating buffers (e.g. BatchNorm running statistics) of the module are laid out
back to back in one contiguous tensor, and every ``Parameter`` keeps its identity while its ``.data`` becomes a
view into that tensor. Optimizers, hooks and ``state_dict`` see the same objects as before; Hogwild! updates
from any worker land in the one copy (LAP-SGD, Chatterjee et al., ICDCS 2024), and an averaging round
exchanges one contiguous slice with no packing.

On CPU the vector lives in a memory-mapped file in ``/dev/shm`` that is unlinked as soon as every worker mapped
it, so nothing is left behind even if the run is killed later. On GPU the leader allocates it and the other
workers open it through CUDA IPC. A small CPU region next to it holds each worker's step counter.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fedhog.config import MAX_WORKERS_PER_DEVICE
from lightning_fedhog.internals import cuda_ipc_handle, open_cuda_ipc_handle, registered_tensors

log = logging.getLogger(__name__)

_ALIGN_ELEMENTS = 16  # every tensor starts on a 64-byte boundary (fp32), good for vectorised kernels
_META_SLOTS = MAX_WORKERS_PER_DEVICE  # int64 counters: one step counter per worker
SHM_DIR = "/dev/shm"
SHM_PREFIX = "fedhog-"


def shm_path_prefix(pid: int) -> str:
    """The start of the path of every shared-memory file process ``pid`` creates (it leads a device)."""
    return os.path.join(SHM_DIR, f"{SHM_PREFIX}{pid}-")


@dataclass(frozen=True)
class FlatLayout:
    """Where each shared tensor lives inside the flat vector.

    Attributes:
        names: qualified names of the tensors, parameters first, then buffers, in registration order.
        shapes: their shapes.
        offsets: their first element in the flat vector.
        numel: length of the flat vector, padding included.
        dtype: the one floating dtype of all shared tensors.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    numel: int
    dtype: torch.dtype

    @property
    def num_elements(self) -> int:
        """Elements that belong to a tensor (the padding excluded)."""
        return sum(shape.numel() for shape in self.shapes)


def _shared_tensors(module: nn.Module) -> Iterator[tuple[str, nn.Module, str, Tensor]]:
    """Yields ``(qualified_name, owner, attribute, tensor)`` for floating parameters, then floating buffers."""
    seen: set[int] = set()
    for kind in (0, 1):  # parameters, then buffers
        for prefix, owner in module.named_modules(remove_duplicate=False):
            for attribute, tensor in registered_tensors(owner)[kind].items():
                if tensor is None or not tensor.is_floating_point() or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                yield (f"{prefix}.{attribute}" if prefix else attribute), owner, attribute, tensor


def flat_layout(module: nn.Module) -> FlatLayout:
    """Computes the layout of ``module``'s floating parameters and buffers.

    Raises:
        ValueError: if the floating tensors do not share one dtype.
    """
    names, shapes, offsets, dtypes = [], [], [], set()
    cursor = 0
    for name, _, _, tensor in _shared_tensors(module):
        names.append(name)
        shapes.append(tensor.shape)
        offsets.append(cursor)
        dtypes.add(tensor.dtype)
        cursor += -(-tensor.numel() // _ALIGN_ELEMENTS) * _ALIGN_ELEMENTS
    if len(dtypes) > 1:
        raise ValueError(
            f"fedhog shares all floating parameters and buffers in one flat vector, but the model mixes dtypes"
            f" {sorted(map(str, dtypes))}. HINT: cast the module to one dtype (or use a `precision=` setting"
            " that does it for you)."
        )
    return FlatLayout(tuple(names), tuple(shapes), tuple(offsets), cursor, dtypes.pop() if dtypes else torch.float32)


def bind_module(module: nn.Module, flat: Tensor, layout: FlatLayout, *, copy_values: bool) -> None:
    """Makes every shared tensor of ``module`` a view into ``flat``.

    Parameters keep their identity (``param.data`` is swapped); buffers are replaced by views.

    Args:
        copy_values: copy the module's current values into ``flat`` first (the leader does; the other workers
            adopt what the leader wrote).
    """
    tensors = list(_shared_tensors(module))
    if len(tensors) != len(layout.names):
        raise RuntimeError(f"fedhog: the module has {len(tensors)} shared tensors, the layout {len(layout.names)}")
    for (name, owner, attribute, tensor), offset, shape in zip(tensors, layout.offsets, layout.shapes, strict=True):
        if tensor.shape != shape:
            raise RuntimeError(f"fedhog: tensor {name!r} changed shape from {tuple(shape)} to {tuple(tensor.shape)}")
        view = _alias(flat, offset, shape)
        if copy_values:
            view.copy_(tensor.detach())
        parameters, buffers = registered_tensors(owner)
        if attribute in parameters:
            tensor.data = view
        else:
            buffers[attribute] = view


def _alias(flat: Tensor, offset: int, shape: torch.Size) -> Tensor:
    """A tensor over ``flat[offset:]`` that is *not* an autograd view of it.

    A view would share ``flat``'s version counter, so any in-place write to the buffer (a BatchNorm statistics
    update, an averaging round) between a forward and its backward would fail autograd's saved-tensor check.
    Hogwild! lets those writes happen by design; a tensor set on the same storage has its own counter.
    """
    alias = torch.empty(0, dtype=flat.dtype, device=flat.device)
    return alias.set_(flat.untyped_storage(), flat.storage_offset() + offset, shape)


def unbind_module(module: nn.Module) -> None:
    """Gives every shared tensor private memory again (the values are kept), so the module outlives the run."""
    for _, owner, attribute, tensor in list(_shared_tensors(module)):
        parameters, buffers = registered_tensors(owner)
        if attribute in parameters:
            tensor.data = tensor.data.clone()
        else:
            buffers[attribute] = tensor.clone()


def _tensor_in(storage: torch.UntypedStorage, byte_offset: int, numel: int, dtype: torch.dtype) -> Tensor:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(storage, byte_offset // itemsize, (numel,))


def _wait_for(store: Any, key: str, timeout: timedelta, what: str) -> bytes:
    try:
        store.wait([key], timeout)
    except RuntimeError as error:
        raise RuntimeError(f"fedhog: timed out after {timeout} waiting for {what}: {error}") from error
    return store.get(key)


class SharedFlatBuffer:
    """The device's flat vector and the workers' step counters, opened by all K workers of one device.

    Attributes:
        flat: the flat parameter vector (CPU shared memory or a CUDA tensor shared by IPC).
        steps: ``int64[K]`` in CPU shared memory; worker ``k`` increments only ``steps[k]``.
    """

    def __init__(self, flat: Tensor, steps: Tensor) -> None:
        self.flat = flat
        self.steps = steps

    @classmethod
    def open(
        cls,
        *,
        layout: FlatLayout,
        device: torch.device,
        store: Any,
        key: str,
        slot: int,
        num_workers: int,
        timeout: timedelta,
    ) -> SharedFlatBuffer:
        """Creates (``slot == 0``) or attaches to the buffer of one device; a collective over its K workers.

        The leader creates the memory and publishes how to reach it under ``key`` in the rendezvous ``store``;
        every worker maps it and checks in; the leader then unlinks the file, so the mapping disappears with the
        last process that holds it, also after a crash.
        """
        if num_workers > _META_SLOTS:  # refused by FedHogConfig before any process starts; an invariant here
            raise RuntimeError(f"fedhog: {num_workers} workers per device, at most {_META_SLOTS} supported")
        on_cpu = device.type == "cpu"
        itemsize = torch.empty((), dtype=layout.dtype).element_size()
        meta_bytes = _META_SLOTS * 8
        nbytes = meta_bytes + (layout.numel * itemsize if on_cpu else 0)
        if slot == 0:
            path = shm_path_prefix(os.getpid()) + uuid.uuid4().hex[:12]
            try:
                storage = torch.UntypedStorage.from_file(path, True, nbytes)
                flat = (
                    _tensor_in(storage, meta_bytes, layout.numel, layout.dtype)
                    if on_cpu
                    else torch.zeros(layout.numel, dtype=layout.dtype, device=device)
                )
                ipc = None if on_cpu else cuda_ipc_handle(flat)
                store.set(f"{key}/path", path)
                store.set(f"{key}/ipc", ipc or b"")
                store.add(f"{key}/attached", 1)
                cls._wait_attached(store, key, num_workers, timeout)
            finally:
                if os.path.exists(path):
                    os.unlink(path)
        else:
            path = _wait_for(store, f"{key}/path", timeout, "the device leader's shared buffer").decode()
            if not os.path.exists(path):  # mapping a missing path would silently create a private buffer
                raise RuntimeError(
                    f"fedhog: the device leader's shared buffer {path} is gone before this worker mapped it."
                    " HINT: the leader failed or timed out during set-up; see its log."
                )
            storage = torch.UntypedStorage.from_file(path, True, nbytes)
            if on_cpu:
                flat = _tensor_in(storage, meta_bytes, layout.numel, layout.dtype)
            else:
                flat = open_cuda_ipc_handle(_wait_for(store, f"{key}/ipc", timeout, "the CUDA IPC handle"))
            store.add(f"{key}/attached", 1)
        steps = _tensor_in(storage, 0, num_workers, torch.int64)
        return cls(flat, steps)

    @staticmethod
    def _wait_attached(store: Any, key: str, num_workers: int, timeout: timedelta) -> None:
        deadline = time.monotonic() + timeout.total_seconds()
        while (attached := store.add(f"{key}/attached", 0)) < num_workers:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"fedhog: only {attached} of {num_workers} workers of this device mapped the shared buffer"
                    f" within {timeout}. HINT: check that every worker process started."
                )
            time.sleep(0.005)

    def device_steps(self) -> int:
        """Optimizer steps taken by all workers of the device so far (polled often: read through numpy)."""
        return int(self.steps.numpy().sum())


def hand_back(store: Any, key: str, slot: int, num_workers: int, wait_seconds: float) -> int | None:
    """At the end of ``fit``: every follower says it let go of the leader's memory; the leader waits for all of them.

    On CUDA the followers map the leader's allocation through IPC: a leader that freed it, or exited, while a
    follower still copied its parameters out would leave that follower reading freed memory. Store counters, not a
    collective, so no rank's sequence of collectives changes. Call it after this worker's copies have landed.
    Best effort: a store that is gone (its host, rank 0, finished first) ends the wait without an error.

    Returns:
        None when done; on the leader, the number of followers that had let go when ``wait_seconds`` ran out (it
        frees the memory anyway, with a warning).
    """
    released = 0
    try:
        if slot != 0:
            store.add(key, 1)
            return None
        deadline = time.monotonic() + wait_seconds
        while (released := store.add(key, 0)) < num_workers - 1:
            if time.monotonic() > deadline:
                log.warning(
                    "fedhog: only %d of the %d other workers of this device let go of its shared parameters within"
                    " %.0f s; freeing them anyway.", released, num_workers - 1, wait_seconds,
                )
                return released
            time.sleep(0.005)
    except (RuntimeError, OSError):  # DistNetworkError is a RuntimeError
        return None
    return None
