"""Who is still alive: a registry of every rank's process in the rendezvous store, for fast, named failures.

When a worker dies without a word (SIGKILL, the out-of-memory killer), its peers only see a broken
collective, often minutes later and with a message that names whoever reported it. fedhog's workers rarely
talk to each other (only at consensus points and averaging rounds), so they also need a cheap way to notice a
death between those points. Each rank therefore publishes ``(host, pid, process start time)`` once at set-up,
and every rank looks at its same-host peers in ``/proc`` about once a second from the training loop: a
``stat`` per peer, no network, no thread. A rank that fails with an exception also leaves its reason in the
store, and a rank that finishes leaves an "exited" mark, so a survivor can tell "killed" from "crashed" from
"finished" and name the rank, its device, its pid and its host.

Peers on other hosts cannot be inspected through ``/proc``; their death still surfaces quickly, because the
workers of a device live on one host: the device's leader or workers notice, stop, and their broken averaging
rounds and barriers carry the failure to the other hosts.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass
from typing import Any, Literal

from lightning_fedhog.rendezvous import present_values

ProcessState = Literal["alive", "dead", "unknown"]


@dataclass(frozen=True)
class Peer:
    """One rank's process, as it announced itself at set-up.

    Attributes:
        rank: global rank.
        device: index of its device among all devices of the run.
        slot: its index among the workers of its device (0 is the device leader).
        host: the host name it runs on.
        pid: its process id on that host.
        start: its process start time (``/proc/<pid>/stat`` field 22), so a reused pid is not taken for it.
    """

    rank: int
    device: int
    slot: int
    host: str
    pid: int
    start: str

    def describe(self) -> str:
        role = "leader" if self.slot == 0 else f"worker {self.slot}"
        return f"rank {self.rank} (device {self.device} {role}, pid {self.pid} on {self.host})"


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` and whether it is a zombie, from ``/proc``; None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            stat = file.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces and parentheses
    if fields[0] in ("Z", "X"):  # a killed child its parent has not reaped yet is a zombie: dead
        return None
    return fields[19]


def process_state(peer: Peer, host: str) -> ProcessState:
    """Whether ``peer``'s process still runs; ``"unknown"`` for a peer on another host than ``host``."""
    if peer.host != host:
        return "unknown"
    started = _start_time(peer.pid)
    return "alive" if started is not None and started == peer.start else "dead"


class PeerRegistry:
    """Every rank's process, published in the rendezvous store, and what each one left there when it stopped.

    Args:
        store: the run's rendezvous store (a ``torch.distributed.Store``).
        prefix: store key prefix unique to this fit.
        me: this rank's own entry.
        world_size: number of ranks.
    """

    def __init__(self, store: Any, prefix: str, me: Peer, world_size: int) -> None:
        self.store = store
        self.prefix = prefix
        self.me = me
        self.world_size = world_size
        self.peers: list[Peer] = []
        self.host = me.host

    @staticmethod
    def this_process(rank: int, device: int, slot: int) -> Peer:
        """This process as a :class:`Peer`."""
        return Peer(rank, device, slot, socket.gethostname(), os.getpid(), _start_time(os.getpid()) or "")

    def announce(self) -> None:
        """Publishes this rank (call on every rank, then a barrier, then :meth:`load`)."""
        self.store.set(f"{self.prefix}/peer/{self.me.rank}", json.dumps(self.me.__dict__))

    def load(self) -> None:
        """Reads every rank's entry, in one round trip (after a barrier that follows :meth:`announce`)."""
        keys = [f"{self.prefix}/peer/{rank}" for rank in range(self.world_size)]
        self.peers = [Peer(**json.loads(raw)) for raw in self.store.multi_get(keys)]

    def local_peers(self) -> list[Peer]:
        """The other ranks on this host, whose processes can be looked at directly."""
        return [peer for peer in self.peers if peer.host == self.host and peer.rank != self.me.rank]

    def dead_local_peers(self) -> list[Peer]:
        """Same-host peers whose process is gone (a stat per peer: cheap enough to call every second)."""
        return [peer for peer in self.local_peers() if process_state(peer, self.host) == "dead"]

    def mark(self, what: Literal["failed", "exited"], reason: str = "", *, caused_by_peer: bool = False) -> None:
        """Leaves this rank's end in the store (best effort: the store may be gone with a dead rank 0).

        Args:
            what: ``"failed"`` (an exception) or ``"exited"`` (a clean end).
            reason: the exception, shortened; peers quote it.
            caused_by_peer: this rank only reports another rank's failure, so peers need not quote it.
        """
        value = json.dumps({"reason": reason[:400], "caused_by_peer": caused_by_peer})
        try:
            self.store.set(f"{self.prefix}/{what}/{self.me.rank}", value)
        except Exception:  # the store lives in rank 0 or the launcher, which may be dead too
            return

    def arrive(self, meeting: int) -> None:
        """Marks that this rank reached consensus point number ``meeting`` (best effort, one store write)."""
        with contextlib.suppress(Exception):
            self.store.set(f"{self.prefix}/arrived/{meeting}/{self.me.rank}", "")

    def missing(self, meeting: int) -> list[int] | None:
        """Ranks that have not reached consensus point ``meeting``; None when the store cannot be reached."""
        try:
            return [
                rank
                for rank in range(self.world_size)
                if not self.store.check([f"{self.prefix}/arrived/{meeting}/{rank}"])
            ]
        except Exception:  # the store's host is gone
            return None

    def _ends(self, what: str) -> dict[int, dict[str, Any]] | None:
        """What each rank left under ``what``; None when the store cannot be reached."""
        prefix = f"{self.prefix}/{what}/"
        try:
            ends = present_values(self.store, [f"{prefix}{rank}" for rank in range(self.world_size)])
        except Exception:  # a dead store host is itself the diagnosis
            return None
        return {int(key[len(prefix):]): json.loads(value) for key, value in ends.items()}

    def gone(self) -> set[int] | None:
        """Ranks known to have stopped: dead on this host, or that left a failure or an exit mark; None when the
        store cannot be reached."""
        failed, exited = self._ends("failed"), self._ends("exited")
        if failed is None or exited is None:
            return None
        marked = (set(failed) | set(exited)) - {self.me.rank}
        return {peer.rank for peer in self.dead_local_peers()} | marked

    def diagnose(self, meeting: int = 0) -> str:
        """Names the ranks that are dead or failed, as far as this rank can tell (used when a peer is lost).

        Args:
            meeting: the consensus point this rank waited at, if any: ranks that never reached it are named.
        """
        dead = [peer for peer in self.peers if peer.rank != self.me.rank and process_state(peer, self.host) == "dead"]
        failed, exited = self._ends("failed"), self._ends("exited")
        if failed is None or exited is None:
            gone = ", ".join(peer.describe() for peer in dead) or "none on this host"
            return (
                "the rendezvous store cannot be reached, so the process that hosts it is gone (rank 0 under the plain"
                " launcher and SLURM, the torchrun agent of node 0 under torchrun); processes gone: "
                f"{gone}. The first of them to fail caused this, the others stopped because of it: their logs say which"
            )
        parts: list[str] = []
        for peer in dead:
            if peer.rank in failed:
                continue
            if peer.rank in exited:
                parts.append(f"{peer.describe()} has finished and left")
            else:
                parts.append(
                    f"{peer.describe()} is dead: its process ended without an error of its own (killed by a signal,"
                    " e.g. SIGKILL or the out-of-memory killer; see `dmesg` on that host)"
                )
        for rank, end in sorted(failed.items()):
            if end["caused_by_peer"] or rank == self.me.rank:
                continue
            peer = self.peers[rank] if rank < len(self.peers) else None
            parts.append(f"{peer.describe() if peer else f'rank {rank}'} failed: {end['reason']}")
        missing = self.missing(meeting) if meeting else None
        if missing and not parts:
            names = ", ".join(self.peers[rank].describe() for rank in missing if rank < len(self.peers))
            parts.append(f"{names} did not reach this consensus point (alive, but slow or stuck)")
        if not parts:
            others = sorted({peer.host for peer in self.peers} - {self.host})
            where = f" (ranks on {', '.join(others)} cannot be checked from here)" if others else ""
            return f"no rank on this host is dead and none reported an error yet{where}; a peer may be slow"
        return "; ".join(parts)
