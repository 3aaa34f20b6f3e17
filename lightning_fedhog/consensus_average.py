"""How the device leaders form a consensus point's average: exactly, compressed, or from what the pause round left.

A consensus point needs every device to hold the same model. With fp32 rounds that is the exact average, one
all-reduce of the vector. While the rounds compress, the consensus sends what they send
(:func:`consensus_compressed_`): every device takes ``c = r + mean(Q(x_i - r))`` from the shared reference ``r``,
the same bits everywhere and within quantisation error of the exact average, and keeps its residual ``x_i - c``
aside until training resumes, so the mean of the copies stays exact and what quantisation dropped is sent later.

A block needs no exchange at all when the round that agreed on the pause averaged it while every device was
frozen (each leader the only worker of its device, asking for the pause from inside the consensus point): the
snapshots were final, so the reference that round left is the average of the copies as they are, exact after an
fp32 round, within quantisation error after a compressed one. With one block, the usual case, a consensus point
then costs no second transfer of the vector.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_fedhog.averaging import all_finite, exchange_average_
from lightning_fedhog.compression import PIECE, Codec, start_compressed


def consensus_compressed_(
    flat: Tensor, reference: Tensor, group: Any, world_size: int, codec: Codec, stats: dict[str, float] | None = None,
    out: Tensor | None = None,
) -> Tensor | None:
    """A consensus point that sends what the rounds send: every leader ends with the same copy ``c``.

    One compressed round of the whole vector against the shared reference ``r`` leaves ``x_i' = c + e_i`` on each
    leader, with ``c = r + mean(q)`` the same bits everywhere and ``e_i`` what quantisation dropped from this
    leader's difference. The copy becomes ``c`` (the model that is validated and saved: identical on every device,
    within half a quantisation step per element of the exact average) and ``e_i`` is returned; adding it back when
    training resumes (:func:`restore_residual_`) makes the mean of the copies exactly the mean before the point, as
    after any round, and what quantisation dropped goes out with the next round. The reference becomes ``c``.

    Worked in pieces, like the rounds: the extra memory is the residual (one fp32 copy of the vector) and a few
    pieces of workspace besides the gathered codes.

    Args:
        out: where to write the residual (fp32, ``flat``'s size); a new tensor when None.

    Returns:
        This leader's residual (fp32), or None when some leader's copy held NaN/Inf (nothing was changed).
    """
    control = torch.zeros(1, dtype=torch.float32, device=flat.device)
    finish = start_compressed(flat, reference, group, world_size, control, codec, nonfinite_slot=0)
    stats = {} if stats is None else stats
    finish(accept=lambda summed: not bool(summed[0] > 0), stats=stats)
    if "moved" not in stats:  # not applied anywhere
        return None
    values, ref = flat.view(-1), reference.view(-1)
    residual = torch.empty(values.numel(), dtype=torch.float32, device=flat.device) if out is None else out.view(-1)
    for start in range(0, values.numel(), PIECE):
        stop = start + PIECE
        agreed = ref[start:stop].to(values.dtype)
        residual[start:stop].copy_(values[start:stop].float() - agreed.float())
        values[start:stop].copy_(agreed)
    return residual


def restore_residual_(flat: Tensor, residual: Tensor) -> None:
    """Adds a consensus point's residual (:func:`consensus_compressed_`) back to the copy, in pieces."""
    values = flat.view(-1)
    for start in range(0, values.numel(), PIECE):
        values[start : start + PIECE].add_(residual[start : start + PIECE].to(values.dtype))


def form_consensus_(
    flat: Tensor,
    group: Any,
    world_size: int,
    bounds: list[tuple[int, int]],
    codec: Codec,
    reference: Tensor | None,
    settled: dict[int, str],
) -> tuple[float | None, Tensor | None]:
    """Makes every leader's ``flat`` the same: the exact average (``codec="none"``) or a compressed consensus.

    Args:
        flat: the device's vector (every worker parked).
        group: the leaders' group; ``world_size`` leaders.
        bounds: each block's ``(start, stop)``.
        codec: what the consensus sends; ``"none"``: the exact average.
        reference: the shared reference (None when the rounds keep none).
        settled: blocks the pause round averaged with every device frozen, and how (``"exact"``,
            ``"compressed"``); the same on every leader. A compressed one serves a compressed consensus only.

    Returns:
        How far the copy moved (None when some leader's copy held NaN/Inf: the average was not formed), and the
        residual to add back when training resumes (None for the exact average).
    """
    exact = codec == "none"
    skip = set() if reference is None else {b for b, kind in settled.items() if kind == "exact" or not exact}
    residual = None if exact else torch.empty(flat.numel(), dtype=torch.float32, device=flat.device)
    moved_sq = 0.0
    for start, stop in _ranges(bounds, skip):
        stats: dict[str, float] = {}
        if exact:
            finite = torch.tensor([float(all_finite(flat[start:stop]))], device=flat.device)
            exchange_average_(flat[start:stop], group, world_size, finite, exact=True, stats=stats,
                              accept=lambda summed: bool(summed[0] == world_size))
        else:
            ref = reference[start:stop]  # type: ignore[index]  # a compressed consensus needs the reference
            out = residual[start:stop]  # type: ignore[index]
            consensus_compressed_(flat[start:stop], ref, group, world_size, codec, stats, out=out)
        if "moved" not in stats:
            return None, None
        moved_sq += stats["moved"] ** 2
    for block in sorted(skip):  # after the exchanges, which may find a copy that is not finite and change nothing
        start, stop = bounds[block]
        agreed = reference[start:stop].to(flat.dtype)  # type: ignore[index]
        if residual is not None:
            residual[start:stop] = flat[start:stop].float() - agreed.float()
        flat[start:stop].copy_(agreed)
    return moved_sq**0.5, residual


def _ranges(bounds: list[tuple[int, int]], skip: set[int]) -> list[tuple[int, int]]:
    """The stretches of the vector outside the ``skip`` blocks, adjacent blocks merged (one collective each)."""
    ranges: list[tuple[int, int]] = []
    for block, (start, stop) in enumerate(bounds):
        if block in skip:
            continue
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], stop)
        else:
            ranges.append((start, stop))
    return ranges
