"""Non-blocking in-place averaging math, as free functions over tensors and a process group.

The live vector keeps changing while the exchange is in flight, because the device's workers keep stepping.
Writing the average back would erase those steps. Instead each round applies only the correction the exchange
asks for, ``x += avg(s) - s`` where ``s`` is the snapshot that was sent (Chatterjee et al., ICDCS 2024,
Alg. 1: "non-blocking in-place averaging"). With no concurrent writes this is exactly ``x = avg(s)``; with them,
the updates made during the exchange survive.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def all_finite(values: Tensor) -> bool:
    """Whether every element is finite, reading each element once, so it is safe while Hogwild! workers write.

    ``torch.isfinite`` computes ``(x == x) & (x.abs() != inf)``: three reads of each element. When a worker
    changes a value between two of them, ``x == x`` is false for a finite number, and a round would be refused
    as "non-finite" for nothing (it happens in real runs). ``x * 0`` reads it once and
    is 0 exactly when ``x`` is finite (NaN for NaN and for +-inf).
    """
    return not bool(any_nonfinite(values))


def any_nonfinite(values: Tensor) -> Tensor:
    """Whether some element is NaN/Inf, as a 0-dim bool tensor: no host sync, so a check over many pieces can
    sync once (:func:`all_finite` reads each element once, the same way)."""
    return values.mul(0).ne(0).any()


def completion_clock(work: Any) -> Callable[[], float | None]:
    """When the collective behind ``work`` completed (``time.monotonic()``), once it has; None when the backend
    cannot say. A round is finished later than its collective completes when others were started meanwhile
    (``rounds_in_flight`` > 1): the link's time is up to the completion."""
    stamp: list[float] = []
    try:
        work.get_future().add_done_callback(lambda _: stamp.append(time.monotonic()))
    except (AttributeError, RuntimeError):  # a backend without futures
        return lambda: None
    return lambda: stamp[0] if stamp else None


def apply_average_delta_(live: Tensor, snapshot: Tensor, averaged: Tensor) -> Tensor:
    """In place: ``live += averaged - snapshot``. Returns the correction (how far this copy was moved)."""
    delta = averaged - snapshot
    live.add_(delta)
    return delta


def exchange_average_(
    live: Tensor,
    group: Any,
    world_size: int,
    control: Tensor | None = None,
    *,
    exact: bool = False,
    stats: dict[str, float] | None = None,
    accept: Callable[[Tensor], bool] | None = None,
) -> Tensor | None:
    """Averages ``live`` over all members of ``group`` in place; sums a small control vector in the same message.

    The control vector (pause flag, block scores) rides at the end of the one all-reduce message, so agreeing on
    pausing or on the next block needs no extra collective that could interleave differently on different leaders.

    Args:
        live: the block of the shared vector (contiguous); read once for the snapshot, then corrected in place.
        group: process group of the device leaders.
        world_size: number of members of ``group``.
        control: this leader's control values, or None.
        exact: nobody writes ``live`` meanwhile (workers are parked): overwrite it with the average, so every
            leader ends with the same bits; ``s + (avg - s)`` can differ from ``avg`` by rounding.
        accept: decides from the summed control whether to apply the average at all (every leader sees the
            same sum, so all decide alike); e.g. refuse a round in which a leader reported non-finite values.
        stats: if given (and the average was applied), receives ``moved`` (norm of the correction: this copy's
            distance to the average) and ``bytes`` (what this leader sent: a ring all-reduce sends ``2 (n-1)/n``
            times the message); and ``completed`` (when the all-reduce completed), where the backend says.

    Returns:
        The control vectors summed over all leaders (None without ``control``).
    """
    return start_average(live, group, world_size, control)(exact=exact, stats=stats, accept=accept)


def start_average(
    live: Tensor,
    group: Any,
    world_size: int,
    control: Tensor | None = None,
    nonfinite_slot: int | None = None,
    reference: Tensor | None = None,
) -> Callable[..., Tensor | None]:
    """:func:`exchange_average_` in two halves: takes the snapshot and issues the all-reduce without waiting for
    it; returns the second half, which waits, then applies the correction (same keywords: ``exact``, ``stats``,
    ``accept``). Between the two, the workers keep writing ``live``: the correction keeps their steps.

    ``nonfinite_slot``: the control entry set to 1 when the snapshot (what is sent, not the live block, which a
    worker may change after a check) holds NaN/Inf. ``reference``: where the average of the snapshots is kept when
    the round is applied (the shared reference compressed rounds take differences from: every leader gets the same
    bits from the all-reduce, so it stays identical everywhere).
    """
    flat = live.view(-1)
    extra = 0 if control is None else control.numel()
    message = torch.empty(flat.numel() + extra, dtype=live.dtype, device=live.device)
    message[: flat.numel()].copy_(flat)
    if control is not None:
        message[flat.numel() :].copy_(control)
    snapshot = message[: flat.numel()].clone()
    if nonfinite_slot is not None and not all_finite(snapshot):
        message[flat.numel() + nonfinite_slot] = 1
    work = dist.all_reduce(message, op=dist.ReduceOp.SUM, group=group, async_op=True)
    completed = completion_clock(work)

    def finish(
        *, exact: bool = False, stats: dict[str, float] | None = None, accept: Callable[[Tensor], bool] | None = None
    ) -> Tensor | None:
        work.wait()
        done = completed()
        if stats is not None and done is not None:
            stats["completed"] = done
        summed_control = None if control is None else message[flat.numel() :].float().cpu()
        if accept is not None and summed_control is not None and not accept(summed_control):
            return summed_control
        averaged = message[: flat.numel()].div_(world_size)
        if exact:
            delta = averaged - flat
            flat.copy_(averaged)
        else:
            delta = apply_average_delta_(flat, snapshot, averaged)
        if reference is not None:
            reference.view(-1).copy_(averaged)
        if stats is not None:
            stats["moved"] = float(delta.float().norm())
            stats["bytes"] = 2.0 * (world_size - 1) / world_size * message.numel() * message.element_size()
        return summed_control

    return finish


_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int32}  # 64-bit values as two 32-bit words
_FINGERPRINT_CHUNK = 1 << 20
_WEIGHT_PERIOD = 65521  # a prime: the two position weights below tell every pair of positions apart


def fingerprint(values: Tensor) -> Tensor:
    """Three int64 checksums of the bits of ``values``: their sum and two position-weighted sums.

    Two copies with the same fingerprint are the same bits but for a vanishing chance; any difference in one
    element, a swap of two elements or a flipped sign changes it. Position ``i`` is weighted by ``i mod p + 1`` in
    one sum and by ``i div p + 1`` in the other (``p`` prime): no two positions share both weights, so a swap of
    any two different words changes one of the sums, and each product stays far below 2**63 (a word is at most
    32 bits: a 64-bit value is read as two). Summing integers in wrap-around arithmetic gives the same result in any
    order, so it does not depend on the device or on how a sum is split. The vector is read in chunks, so the extra
    memory is a few chunk-sized int64 temporaries whatever the model's size.
    """
    words = values.detach().reshape(-1).view(_WORDS[values.element_size()])
    sums = torch.zeros(3, dtype=torch.int64, device=values.device)
    for offset in range(0, words.numel(), _FINGERPRINT_CHUNK):
        chunk = words[offset : offset + _FINGERPRINT_CHUNK].to(torch.int64)
        positions = torch.arange(offset, offset + chunk.numel(), dtype=torch.int64, device=values.device)
        sums[0] += chunk.sum()
        sums[1] += (chunk * (positions % _WEIGHT_PERIOD + 1)).sum()
        sums[2] += (chunk * (positions // _WEIGHT_PERIOD + 1)).sum()
    return sums


def differing_copies(values: Tensor, group: Any, world_size: int) -> list[int]:
    """Gathers every leader's :func:`fingerprint` of ``values`` (one small all-reduce) and returns the ranks, within
    ``group``, whose copy differs from the copy most leaders hold (every leader when no copy is held by more than
    half, as with two leaders); empty when all agree."""
    prints = torch.zeros(world_size, 3, dtype=torch.int64, device=values.device)
    prints[group.rank()] = fingerprint(values)
    dist.all_reduce(prints, op=dist.ReduceOp.SUM, group=group)  # one non-zero row per leader: exact in int64
    rows = [tuple(row) for row in prints.cpu().tolist()]
    majority = max(rows, key=rows.count)
    if len(set(rows)) > 1 and 2 * rows.count(majority) <= world_size:  # no majority (two leaders): name them all
        return list(range(world_size))
    return [rank for rank, row in enumerate(rows) if row != majority]


def sum_control(control: Tensor, group: Any) -> Tensor:
    """All-reduces a small control vector alone (gossip rounds, whose payload goes to one peer only)."""
    message = control.clone()
    dist.all_reduce(message, op=dist.ReduceOp.SUM, group=group)
    return message.float().cpu()


def group_backend(group: Any) -> str:
    """The backend of a leaders' group: ``"gloo"`` or ``"nccl"``.

    A bare ``ProcessGroupGloo`` (made without ``init_process_group``, as the thread-based tests do) is not
    registered with ``torch.distributed`` and cannot be asked; it is gloo by construction.
    """
    if isinstance(group, dist.ProcessGroupGloo):
        return "gloo"
    return str(dist.get_backend(group))


def staged_through_host(tensor: Tensor, group: Any) -> bool:
    """Whether ``tensor`` must travel through host memory: gloo's point-to-point calls and all-gathers take host
    tensors, so a CUDA block exchanged that way on a gloo group (several devices on one GPU) is copied there and
    back."""
    return tensor.is_cuda and group_backend(group) == "gloo"


def post_pair(group: Any, send: Tensor, receive: Tensor, peer: int, tag: int = 0) -> list[Any]:
    """Posts the send to and the receive from ``peer`` (a rank within ``group``) together; returns their works.

    NCCL's point-to-point calls occupy the communicator's stream until the peer posts the matching call, so two
    leaders that each send first and receive second wait on their sends for ever. Posted as one batch
    (``batch_isend_irecv`` groups them into one NCCL group call) the two directions are matched together.
    Gloo sends and receives are asynchronous, so posting both before waiting on either is already a pair.
    """
    if group_backend(group) == "gloo":
        return [group.send([send], peer, tag), group.recv([receive], peer, tag)]
    return dist.batch_isend_irecv(
        [
            dist.P2POp(dist.isend, send, group=group, group_peer=peer, tag=tag),
            dist.P2POp(dist.irecv, receive, group=group, group_peer=peer, tag=tag),
        ]
    )


def exchange_with_peer_(
    live: Tensor, group: Any, peer: int, tag: int = 0, stats: dict[str, float] | None = None
) -> None:
    """Pairwise gossip: averages ``live`` with the copy of leader ``peer`` (a rank *within* ``group``) in place.

    Both sides compute ``s_i + s_j`` (addition commutes, so both get the same bits) and apply the delta, which
    keeps the sum over the pair and therefore the mean over all devices. Gloo moves host memory only for
    point-to-point calls, so a CUDA block travels through a host copy on a gloo group (several devices on one
    GPU); NCCL sends it from the GPU.
    """
    flat = live.view(-1)
    snapshot = flat.clone()
    staged = staged_through_host(live, group)
    outgoing = snapshot.cpu() if staged else snapshot
    incoming = torch.empty_like(outgoing)
    for work in post_pair(group, outgoing, incoming, peer, tag):
        work.wait()
    received = incoming.to(flat.device) if staged else incoming
    averaged = (snapshot + received).div_(2)
    delta = apply_average_delta_(flat, snapshot, averaged)
    if stats is not None:
        stats["moved"] = float(delta.float().norm())
        stats["bytes"] = float(snapshot.numel() * snapshot.element_size())
