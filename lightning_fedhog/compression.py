"""Compressed background rounds: each leader sends its copy's difference from a reference every leader shares.

A round of plain all-reduce averaging sends a block in fp32. On a thin link that caps how often a block can be
mixed. Quantising absolute parameter values would be crude (int8 has 255 levels for the whole range of a weight
tensor), but the *differences* between a copy and the last average of that block are small and quantise well
(the outer gradients of DiLoCo-style training are sent the same way). So every leader keeps a reference ``r``
of each block, identical on every leader, and a compressed round is:

1. ``q_i = Q(s_i - r)``: this leader's snapshot ``s_i`` relative to the reference, quantised (bf16, or int8 with
   one fp32 scale per chunk of :data:`INT8_CHUNK` elements);
2. an all-gather of the encoded ``q_j`` (sums of int8 codes with different scales cannot be all-reduced), each
   leader decoding them in the same order, so every leader computes the same ``mean(q)`` bit for bit;
3. ``x_i += mean(q) - q_i``: the in-place correction of the live block (workers keep stepping meanwhile), which
   sums to zero over the leaders, so the mean of the copies is preserved whatever the quantisation dropped;
4. ``r += mean(q)`` on every leader.

Error feedback comes with this form: the part of ``s_i - r`` that quantisation dropped is never applied as a
correction, so it stays in the live copy's difference from the new reference and goes out with the next send of
that block. Nothing accumulates: after a round without training the copy is within one quantisation step of the
reference (tests/test_compression.py checks both). A block's first round has no reference yet and sends fp32
(``r`` starts at zero, so that round is an exact average). An exact consensus point leaves every copy equal to the
exact average, which becomes every block's reference; a compressed one
(:func:`~lightning_fedhog.consensus_average.consensus_compressed_`) is a round of the whole vector after which every
copy is set to the reference and keeps its residual for later.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_fedhog.averaging import any_nonfinite, completion_clock, staged_through_host

Codec = Literal["none", "bf16", "int8"]
"""What one background round sends: fp32 (``"none"``), bf16, or int8 codes with a scale per chunk."""

Compression = Literal["auto", "none", "bf16", "int8"]
"""The knob: a codec for every round, or ``"auto"`` (:mod:`~lightning_fedhog.auto_compression`)."""

COMPRESSIONS: tuple[str, ...] = get_args(Compression)

INT8_CHUNK = 1024
"""Elements that share one fp32 scale in int8 rounds (the scales add 4/1024 of the codes' bytes)."""

_CONTROL_DTYPE = torch.float32


def encoded_bytes(numel: int, codec: Codec) -> int:
    """The bytes one leader sends for a block of ``numel`` elements."""
    if codec == "none":
        return 4 * numel
    if codec == "bf16":
        return 2 * numel
    chunks = -(-numel // INT8_CHUNK)
    return numel + 4 * chunks


PIECE = 256 * INT8_CHUNK
"""Elements a round encodes or decodes at a time (1 MiB in fp32): its workspace is a few pieces, whatever the size
of the block, instead of several fp32 copies of the block."""


def encode(values: Tensor, codec: Codec) -> Tensor:
    """``values`` (a flat float tensor) as the bytes a leader sends (uint8): fp32, bf16, or int8 codes and scales.

    int8 rounds to nearest with a scale of ``max|v| / 127`` per chunk, so an element is off by at most half a
    step, ``max|v| / 254`` of its chunk's largest magnitude.
    """
    numel = values.numel()
    payload = torch.empty(encoded_bytes(numel, codec), dtype=torch.uint8, device=values.device)
    for start in range(0, numel, PIECE):
        encode_into(payload, numel, codec, start, values[start : start + PIECE])
    return payload


def encode_into(payload: Tensor, numel: int, codec: Codec, start: int, values: Tensor) -> None:
    """Writes the encoding of elements ``start .. start + len(values)`` of a block of ``numel`` into the block's
    ``payload`` (:func:`encoded_bytes` long; int8: the scales of all chunks, then the codes). ``start`` is a multiple
    of :data:`INT8_CHUNK`, so each chunk's scale depends on its own elements only: encoding in pieces gives the bytes
    encoding the block at once would."""
    count = values.numel()
    if codec == "none":
        payload[4 * start : 4 * (start + count)].view(torch.float32).copy_(values)
        return
    if codec == "bf16":
        payload[2 * start : 2 * (start + count)].view(torch.bfloat16).copy_(values)
        return
    chunks, first = -(-numel // INT8_CHUNK), start // INT8_CHUNK
    piece_chunks = -(-count // INT8_CHUNK)
    padded = torch.zeros(piece_chunks * INT8_CHUNK, dtype=torch.float32, device=values.device)
    padded[:count] = values
    padded = padded.view(piece_chunks, INT8_CHUNK)
    scales = padded.abs().amax(dim=1).div_(127.0)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero chunk: any scale works
    codes = padded.div_(scales[:, None]).round_().clamp_(-127, 127).to(torch.int8).view(-1)[:count]
    payload[4 * first : 4 * (first + piece_chunks)].view(torch.float32).copy_(scales)
    payload[4 * chunks + start : 4 * chunks + start + count].view(torch.int8).copy_(codes)


def decode(payload: Tensor, numel: int, codec: Codec) -> Tensor:
    """The fp32 values of :func:`encode`'s bytes (the same bits on every leader that decodes them)."""
    return decode_piece(payload, numel, codec, 0, numel).clone()


def decode_piece(payload: Tensor, numel: int, codec: Codec, start: int, stop: int) -> Tensor:
    """The fp32 values of elements ``start .. stop`` of a block of ``numel`` from its payload (``start`` a multiple
    of :data:`INT8_CHUNK`); an fp32 payload's values are returned as a view of it."""
    if codec == "none":
        return payload[4 * start : 4 * stop].view(torch.float32)
    if codec == "bf16":
        return payload[2 * start : 2 * stop].view(torch.bfloat16).float()
    chunks = -(-numel // INT8_CHUNK)
    scales = payload[: 4 * chunks].view(torch.float32)[start // INT8_CHUNK : -(-stop // INT8_CHUNK)]
    codes = payload[4 * chunks + start : 4 * chunks + stop].view(torch.int8).float()
    return codes.view(-1).mul_(scales.repeat_interleave(INT8_CHUNK)[: stop - start])


def _start_all_gather(
    message: Tensor, group: Any, world_size: int
) -> tuple[Callable[[], list[Tensor]], Callable[[], float | None]]:
    """Issues the all-gather of every leader's message; returns what waits for them (in leader order) and when it
    completed (:func:`~lightning_fedhog.averaging.completion_clock`). A CUDA message travels through host memory on
    a gloo group."""
    staged, device = staged_through_host(message, group), message.device
    outgoing = message.cpu() if staged else message
    gathered = torch.empty(world_size * outgoing.numel(), dtype=outgoing.dtype, device=outgoing.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in newer torch
    work: Any = gather(gathered, outgoing, group=group, async_op=True)
    completed = completion_clock(work)
    del outgoing  # held by the work until it is done, then freed

    def wait() -> list[Tensor]:
        nonlocal work
        work.wait()
        work = None
        arrived = gathered.to(device) if staged else gathered
        return list(arrived.view(world_size, -1).unbind(0))

    return wait, completed


def exchange_compressed_(
    live: Tensor,
    reference: Tensor,
    group: Any,
    world_size: int,
    control: Tensor,
    codec: Codec,
    *,
    accept: Callable[[Tensor], bool] | None = None,
    stats: dict[str, float] | None = None,
) -> Tensor:
    """One compressed averaging round of ``live`` against ``reference`` (same shape; identical on all leaders).

    Args:
        live: the block of the shared vector; read once for the snapshot, then corrected in place.
        reference: this block's shared reference; advanced in place by the round's mean (when it is applied).
        group: process group of the device leaders; ``world_size`` its size.
        control: this leader's control values, gathered with the payload and summed in leader order.
        codec: what the round sends (``"none"``: the fp32 difference, exact).
        accept: decides from the summed control whether to apply the round (the same decision on every leader).
        stats: receives ``moved`` (norm of the correction) and ``bytes`` (what this leader sent: a ring
            all-gather sends the other ``world_size - 1`` leaders' messages on).

    Returns:
        The control vectors summed over all leaders.
    """
    return start_compressed(live, reference, group, world_size, control, codec)(accept=accept, stats=stats)


def start_compressed(
    live: Tensor,
    reference: Tensor,
    group: Any,
    world_size: int,
    control: Tensor,
    codec: Codec,
    nonfinite_slot: int | None = None,
) -> Callable[..., Tensor]:
    """:func:`exchange_compressed_` in two halves: encodes and issues the all-gather; returns the second half
    (keywords ``accept``, ``stats``), which waits, decodes and applies. The correction ``mean(q) - q_i`` does not
    depend on the live values, so the workers' steps in between are kept. ``nonfinite_slot``: the control entry
    set to 1 when what is sent holds NaN/Inf.

    Both halves work in pieces of :data:`PIECE` elements, so besides the message and the gathered messages (with
    int8, a quarter of the block's fp32 bytes per leader; gloo's all-gather also makes a temporary copy of the
    gathered ones, NCCL's does not) a round needs a few pieces of workspace: with int8 and 2 leaders, 0.75 of an
    fp32 copy of the block on NCCL, 1.25 on gloo.
    """
    flat, ref = live.view(-1), reference.view(-1)
    numel = flat.numel()
    head = 4 * control.numel()
    size = encoded_bytes(numel, codec)
    message = torch.empty(head + size + (-size % 4), dtype=torch.uint8, device=flat.device)  # every part 4-aligned
    payload = message[head : head + size]
    nonfinite = torch.zeros((), dtype=torch.bool, device=flat.device)  # one host sync for all pieces, not one each
    for start in range(0, numel, PIECE):
        difference = flat[start : start + PIECE].float() - ref[start : start + PIECE].float()  # live read once
        if nonfinite_slot is not None:
            nonfinite |= any_nonfinite(difference)
        encode_into(payload, numel, codec, start, difference)
    sent = control.to(_CONTROL_DTYPE).clone()
    if nonfinite_slot is not None and bool(nonfinite):
        sent[nonfinite_slot] = 1
    message[:head].view(_CONTROL_DTYPE).copy_(sent)
    message[head + size :].zero_()
    gathered, completed = _start_all_gather(message, group, world_size)
    rank, sent_bytes = group.rank(), message.numel()
    del payload, message  # the all-gather holds what it sends until it is done

    def finish(*, accept: Callable[[Tensor], bool] | None = None, stats: dict[str, float] | None = None) -> Tensor:
        parts = gathered()
        done = completed()
        if stats is not None and done is not None:
            stats["completed"] = done
        summed = torch.stack([part[:head].view(_CONTROL_DTYPE) for part in parts]).sum(0).cpu()
        if accept is not None and not accept(summed):
            return summed
        moved_sq = torch.zeros((), dtype=torch.float32, device=flat.device)
        for start in range(0, numel, PIECE):
            stop = min(start + PIECE, numel)
            mean = torch.zeros(stop - start, dtype=torch.float32, device=flat.device)
            own = mean
            for index, part in enumerate(parts):  # added in leader order on every leader: identical bits
                decoded = decode_piece(part[head : head + size], numel, codec, start, stop)
                mean.add_(decoded)
                own = decoded if index == rank else own
            mean.div_(world_size)
            correction = mean - own
            flat[start:stop].add_(correction.to(flat.dtype))
            ref[start:stop].add_(mean.to(ref.dtype))
            moved_sq += correction.square().sum()
        if stats is not None:
            stats["moved"] = float(moved_sq) ** 0.5
            stats["bytes"] = float((world_size - 1) * sent_bytes)
        return summed

    return finish


class SharedReference:
    """Every block's reference, the same on every leader, and the compressed rounds that advance it.

    The reference is one fp32 copy of the vector, allocated by the first round that needs it, on the thread that
    runs the rounds (on a GPU: in that thread's stream, so nothing reads it before it is written). A block's first
    compressed round has no reference yet: the engine's rounds (:mod:`~lightning_fedhog.rounds`) send it as an exact
    fp32 all-reduce that stores the average as the reference (:meth:`tracked`), which sends fewer bytes than an
    all-gather of fp32; only a ready block's rounds go through :meth:`start_`. With ``compression="auto"`` the fp32
    rounds keep an allocated reference up to date (:meth:`block_to_track`), so switching codecs costs nothing.

    Args:
        numel: elements of the flat vector.
        num_blocks: blocks it is exchanged in.
        device: where the vector lives.
    """

    def __init__(self, numel: int, num_blocks: int, device: torch.device) -> None:
        self._numel, self._device = numel, device
        self._values: Tensor | None = None
        self._ready = [False] * num_blocks

    @property
    def values(self) -> Tensor:
        """The reference of the whole vector (allocated, zero, on first use)."""
        if self._values is None:
            self._values = torch.zeros(self._numel, dtype=torch.float32, device=self._device)
        return self._values

    @property
    def allocated(self) -> bool:
        return self._values is not None

    def start_(
        self,
        live: Tensor,
        bounds: tuple[int, int],
        group: Any,
        world_size: int,
        control: Tensor,
        codec: Codec,
        nonfinite_slot: int | None = None,
    ) -> Callable[..., Tensor]:
        """Starts one compressed round of the block at ``bounds`` of the flat vector (its reference :meth:`ready`)
        sending ``codec``; returns its second half, which takes ``accept`` and ``stats`` (see
        :func:`start_compressed`). Rounds in flight together hold distinct blocks."""
        start, stop = bounds
        return start_compressed(live, self.values[start:stop], group, world_size, control, codec, nonfinite_slot)

    def ready(self, block: int) -> bool:
        """Whether ``block`` has a reference every leader shares (its compressed rounds send codes)."""
        return self._ready[block]

    def block_to_track(self, bounds: tuple[int, int]) -> Tensor | None:
        """Where an exact round of the block at ``bounds`` stores its average, once the reference exists."""
        return self.values[bounds[0] : bounds[1]] if self._values is not None else None

    def tracked(self, block: int) -> None:
        """An exact round stored ``block``'s average in the reference: it is ready for compressed rounds."""
        self._ready[block] = True

    def reset_(self, flat: Tensor, allocate: bool = True) -> None:
        """After a consensus point: every copy is the exact average, which becomes every block's reference
        (unless the reference does not exist yet and ``allocate`` is False)."""
        if self._values is None and not allocate:
            return
        self.values.copy_(flat.view(-1))
        self._ready = [True] * len(self._ready)
