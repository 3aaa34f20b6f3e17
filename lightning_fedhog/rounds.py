"""One background averaging round of a device leader: its control message, its collective, and its correction.

A round is *started* (the block is read, the message built and the collective issued without waiting) and
*finished* later (waited for, then applied if every leader's block was finite). In between the workers keep
stepping, and the correction the round applies keeps their steps (:mod:`~lightning_fedhog.averaging`). With
``rounds_in_flight > 1`` the engine starts the next round before it finishes the last one, so a link whose rounds
spend their time waiting (latency, not bandwidth) carries several at once; the blocks in flight are distinct, so
no two rounds correct the same elements.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_fedhog.auto_compression import CodecChoice, agreed
from lightning_fedhog.averaging import all_finite, exchange_with_peer_, start_average, sum_control
from lightning_fedhog.compression import Codec, Compression, SharedReference
from lightning_fedhog.telemetry import RoundFigures
from lightning_fedhog.topology import Topology, peers


@dataclass
class InFlight:
    """A started round: its block, what finishes it (returns the summed control), what the round whose link
    figures its control message carries had sent (``compression="auto"``), and what the round leaves in the block's
    shared reference when applied: the average of the snapshots (``"exact"``), the compressed average
    (``"compressed"``), or nothing."""

    block: int
    finish: Callable[[], Tensor]
    measured: Codec = "none"
    reference: str = ""


class Rounds:
    """Builds, starts and finishes the rounds of one leader (all-reduce, compressed all-gather, or gossip).

    Args:
        flat: the device's shared flat vector.
        group: the leaders' process group (this engine's thread only); ``world_size`` leaders.
        bounds: each block's ``(start, stop)`` in ``flat``.
        topology: None for all-reduce rounds, else the gossip peer schedule; ``seed`` shared by all leaders.
        compression: what all-reduce rounds send (``"auto"``: fp32 until the leaders agree the link limits them,
            :mod:`~lightning_fedhog.auto_compression`); ``track_change``: keep each block's value at its last
            exchange (the ``"largest_change"`` rule's scores).
        figures: where each finished round is recorded.
    """

    def __init__(
        self,
        flat: Tensor,
        group: Any,
        world_size: int,
        bounds: list[tuple[int, int]],
        *,
        topology: Topology | None,
        seed: int,
        compression: Compression,
        track_change: bool,
        figures: RoundFigures,
    ) -> None:
        self.flat, self._group, self._world_size, self._bounds = flat, group, world_size, bounds
        self._topology, self._seed, self.figures = topology, seed, figures
        # per block: exchanges so far (gossip schedules advance per block, so the block cycle and the topology
        # cycle cannot alias) and the round of the last exchange (tie-break of "largest_change")
        self.exchanges = [0] * len(bounds)
        self.last_round = [-1] * len(bounds)
        self._reference: Tensor | None = flat.clone() if track_change else None
        self._fixed: Codec | None = None if compression == "auto" else compression
        self.choice: CodecChoice | None = CodecChoice() if compression == "auto" and topology is None else None
        self.last_seconds = 0.0  # how long the last finished round took (its leader's share of the link figures)
        self.last_sent: Codec = "none"  # what the last finished round sent (the same on every leader)
        self.shared = (  # compressed rounds: each block's difference from a reference every leader holds
            SharedReference(flat.numel(), len(bounds), flat.device)
            if compression != "none" and topology is None else None
        )

    @property
    def codec(self) -> Codec:
        """What a round started now sends (gossip rounds send fp32)."""
        if self.choice is not None:
            return self.choice.codec
        return self._fixed if self._fixed is not None and self._topology is None else "none"

    @property
    def link_slots(self) -> int:
        """Control entries for ``compression="auto"``: each leader's round load and round time."""
        return 2 * self._world_size if self.choice is not None else 0

    def agree_codec(self, link: Tensor, measured: Codec) -> None:
        """Steps the codec choice with a finished round's summed link slots (the same on every leader), which
        measured a round that sent ``measured``."""
        if self.choice is None:
            return
        leaders = self._world_size
        load, seconds = agreed(link[:leaders].tolist()), agreed(link[leaders:].tolist())
        self.choice = self.choice.after_round(load, seconds, measured)

    def control(
        self, want_pause: bool, block: int, proposal: float, steps: float, link: tuple[float, float] = (0.0, 0.0),
        frozen: bool = False,
    ) -> Tensor:
        """This leader's control vector, summed over all leaders by the round's message:
        ``[pause flag, one-hot "my block is not finite" per leader, proposed period per leader (auto: the largest is
        agreed), device steps since the previous round, (compression="auto") round load per leader and round time
        per leader, change score per block (largest_change), frozen]``; ``link``: this leader's load and time of its
        last finished round; ``frozen``: nothing but the rounds writes this device's copy until the pause ends (the
        sum says how many leaders' snapshots are final)."""
        start, stop = self._bounds[block]
        rank = self._group.rank()
        values = [float(want_pause)] + [0.0] * self._world_size
        if self._topology is not None and not all_finite(self.flat[start:stop]):  # all-reduce: checked as sent
            values[1 + rank] = 1.0
        proposals = [0.0] * self._world_size  # one slot per leader
        proposals[rank] = proposal
        values += [*proposals, steps]
        if self.choice is not None:
            loads, times = [0.0] * self._world_size, [0.0] * self._world_size
            loads[rank], times[rank] = link
            values += [*loads, *times]
        if self._reference is not None:
            values += [float((self.flat[a:b] - self._reference[a:b]).norm()) for a, b in self._bounds]
        values.append(float(frozen))
        return torch.tensor(values, dtype=self.flat.dtype, device=self.flat.device)

    def accept(self, summed: Tensor) -> bool:
        """Apply a round only if every leader's block was finite (the same decision on every leader)."""
        return not bool((summed[1 : 1 + self._world_size] > 0).any())

    def start(self, block: int, index: int, control: Tensor, device_steps: Callable[[], int]) -> InFlight:
        """Starts round ``index`` on ``block``; gossip rounds run whole here (one round at a time)."""
        start, stop = self._bounds[block]
        live = self.flat[start:stop]
        began = time.monotonic()
        stats: dict[str, float] = {}
        codec, tracked, measured, reference = self.codec, None, self.last_sent, ""
        if self._topology is None:
            mine = 1 + self._group.rank()  # this leader's "not finite" entry: set if what it sends is not
            if codec != "none" and self.shared is not None and self.shared.ready(block):
                pending = self.shared.start_(live, (start, stop), self._group, self._world_size, control, codec, mine)
                reference = "compressed"
            else:  # fp32: an all-reduce, which sets a block's reference (its first compressed round) or keeps it
                if self.shared is not None:
                    tracked = self.shared.values[start:stop] if codec != "none" else self.shared.block_to_track(
                        (start, stop))
                codec = "none"
                reference = "exact" if tracked is not None else ""
                pending = start_average(live, self._group, self._world_size, control, mine, reference=tracked)
        else:
            gossiped = sum_control(control, self._group)
            schedule = peers(self._world_size, self.exchanges[block], self._topology, self._seed + block)
            peer = schedule[self._group.rank()]
            if peer is not None and self.accept(gossiped):
                exchange_with_peer_(live, self._group, peer, tag=index % 65536, stats=stats)

        def finish() -> Tensor:
            summed = pending(accept=self.accept, stats=stats) if self._topology is None else gossiped
            if tracked is not None and self.shared is not None and self.accept(summed):
                self.shared.tracked(block)
            self.last_seconds = stats.get("completed", time.monotonic()) - began  # up to the collective's end
            self.last_sent = codec
            self.figures.round_done(block, self.last_seconds, stats, device_steps(), compressed=codec != "none")
            if self._reference is not None:
                self._reference[start:stop].copy_(live)
            self.exchanges[block] += 1
            self.last_round[block] = index
            return summed  # type: ignore[return-value]  # never None when a control vector is sent

        return InFlight(block, finish, measured, reference)

    @property
    def consensus_codec(self) -> Codec:
        """What a consensus point may send: the rounds' codec once every block has a shared reference, else fp32
        (the same on every leader: the codec and the references' readiness change in agreed rounds only)."""
        codec = self.codec
        if codec == "none" or self.shared is None or not all(map(self.shared.ready, range(len(self._bounds)))):
            return "none"
        return codec

    def consensus_done(self, exact: bool = True) -> None:
        """After a consensus average of the whole vector: it is every block's reference (a compressed consensus
        has already advanced the shared reference to it)."""
        if self._reference is not None:
            self._reference.copy_(self.flat)
        if self.shared is not None and exact:  # "auto" keeps no reference before it first compresses
            self.shared.reset_(self.flat, allocate=self.choice is None)
