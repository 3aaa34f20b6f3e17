"""Rescue on peer loss: when a worker dies, the survivors save what they trained before they stop.

Without it, a lost worker costs everything trained since the last checkpoint (an epoch, by default): the survivors
stop, the launcher starts the run again, and ``ckpt_path="last"`` goes back to that checkpoint. Yet in federated SGD
with local asynchrony every device's copy is a model on its own and their average is the model the method trains
(Chatterjee, Kungurtsev and Alistarh, ICDCS 2024): nothing needs the lost worker to agree step by step. So, before
they stop, the survivors meet without it and save a checkpoint of their own average, every surviving worker's
optimizer state, the loops' counters and what of the interrupted epoch was trained. Only the lost device's work since
its last averaging round is gone.

The broken default group cannot be used (a collective over it waits for the dead rank), so the meeting goes over the
run's rendezvous store, which outlives any worker except the one that hosts it (rank 0 under the plain launcher and
SLURM, the torchrun agent under torchrun):

1. Every survivor marks itself in the store (the first also raises a flag that peers still training notice within a
   second, :class:`~lightning_fedhog.faults.FaultWatch`, and peers waiting in a consensus point's collective within
   a quarter of a second) and waits until every rank has either joined or is known gone (dead on its host as some
   survivor sees it, or left a failure or exit mark), or :data:`JOIN_SECONDS` passed.
2. The first survivor to finish waiting writes the set of members (``compare_set``: one set for everybody); a rank
   that joins later is not in it and stops as before.
3. The members build a fresh gloo group over the store, without the lost ranks; each device's lowest member sends
   its device's copy, every member its optimizer state, to the lowest member, which writes the checkpoint
   atomically (:func:`~lightning_fedhog.checkpoints.write_rescue`).

Any failure on the way (the store is gone, a second worker dies during the rescue, a timeout) means no rescue: the
reason is logged and the last checkpoint stays as it is.
"""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lightning_fedhog.rendezvous import present_values

JOIN_SECONDS = 15.0
"""How long survivors wait for ranks whose fate they cannot see (on another host, or stuck in a collective)."""

GROUP_TIMEOUT = timedelta(seconds=60)
"""The rescue group's collective timeout (the run's ``timeout`` when that is shorter): a second failure during a
rescue must not hold the survivors for the run's full timeout."""


class RescueError(RuntimeError):
    """No rescue could be agreed or written; the message says why."""


@dataclass(frozen=True)
class Member:
    """A survivor that joined the rescue."""

    rank: int
    device: int


class RescueMeeting:
    """The survivors' agreement over the run's store: who takes part, and a process group of their own.

    Args:
        store: the run's rendezvous store.
        prefix: a store key prefix unique to this fit.
        rank: this worker's global rank.
        device: its device index.
        world_size: workers in the run.
        gone: the ranks this worker knows are gone (dead, failed or finished), None if it cannot tell.
        timeout: the rescue group's collective timeout.
        wait: seconds to wait for ranks whose fate is unknown.
        clock, sleep: injected for tests.
    """

    def __init__(
        self,
        store: Any,
        prefix: str,
        *,
        rank: int,
        device: int,
        world_size: int,
        gone: Callable[[], set[int] | None],
        timeout: timedelta = GROUP_TIMEOUT,
        wait: float = JOIN_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store, self.prefix = store, prefix
        self.rank, self.device, self.world_size = rank, device, world_size
        self._gone, self._timeout, self._wait = gone, timeout, wait
        self._clock, self._sleep = clock, sleep

    @staticmethod
    def started_key(prefix: str) -> str:
        """The flag the first survivor raises (peers still training notice it and join)."""
        return f"{prefix}/started"

    def members(self) -> list[Member]:
        """Joins, waits for the others, and returns the agreed members.

        Raises:
            RescueError: the store cannot be reached, or the members were agreed without this rank.
        """
        try:
            self.store.compare_set(self.started_key(self.prefix), "", str(self.rank))
            self.store.set(f"{self.prefix}/joined/{self.rank}", str(self.device))
            deadline, told = self._clock() + self._wait, None
            while True:
                joined = self._joined()
                seen = self._gone() or set()
                if seen != told:  # what this rank sees (its own host's dead processes) helps the other hosts
                    self.store.set(f"{self.prefix}/gone/{self.rank}", json.dumps(sorted(seen)))
                    told = seen
                gone = seen | self._gone_elsewhere(joined)
                unknown = set(range(self.world_size)) - set(joined) - gone
                if not unknown or self._clock() >= deadline:
                    break
                self._sleep(0.05)
            proposal = json.dumps(sorted(joined.items()))
            agreed = self.store.compare_set(f"{self.prefix}/members", "", proposal)
        except RescueError:
            raise
        except Exception as error:  # the store's host is gone with the lost worker
            raise RescueError(f"the rendezvous store cannot be reached ({error})") from error
        members = [Member(int(rank), int(device)) for rank, device in json.loads(agreed)]
        if self.rank not in {member.rank for member in members}:
            raise RescueError("the other survivors agreed on a rescue before this worker joined")
        return members

    def _joined(self) -> dict[int, int]:
        """Every joined rank's device."""
        prefix = f"{self.prefix}/joined/"
        joined = present_values(self.store, [f"{prefix}{rank}" for rank in range(self.world_size)])
        return {int(key[len(prefix):]): int(device) for key, device in joined.items()}

    def _gone_elsewhere(self, joined: dict[int, int]) -> set[int]:
        """The ranks the other joined survivors saw gone (dead processes on their hosts)."""
        keys = [f"{self.prefix}/gone/{rank}" for rank in joined if rank != self.rank]
        return {rank for seen in present_values(self.store, keys).values() for rank in json.loads(seen)}

    def group(self, members: list[Member]) -> Any:
        """The members' own gloo group (index in ``members`` as rank), over the store, without the lost ranks."""
        index = [member.rank for member in members].index(self.rank)
        store = dist.PrefixStore(f"{self.prefix}/group", self.store)
        return dist.ProcessGroupGloo(store, index, len(members), self._timeout)


@dataclass(frozen=True)
class Rescued:
    """What the writer of a rescue receives (the other members receive None)."""

    average: torch.Tensor  # the mean of the surviving devices' copies, float32 on the CPU
    optimizer_states: list[Any]  # every member's, in member order


def gather_rescue(
    group: Any, members: list[Member], me: int, flat: torch.Tensor, optimizer_states: Any
) -> Rescued | None:
    """Averages the surviving devices' copies and gathers every member's optimizer state on the first member.

    Args:
        group: the members' group (:meth:`RescueMeeting.group`).
        members: the agreed members.
        me: this worker's global rank.
        flat: this worker's device copy (the shared flat vector).
        optimizer_states: this worker's optimizer states (picklable, on the CPU).

    Returns:
        On the first member, the average and the states; on the others, None.
    """
    index = [member.rank for member in members].index(me)
    first_of_device = {}
    for member in members:
        first_of_device.setdefault(member.device, member.rank)
    total = flat.detach().to("cpu", torch.float32, copy=True)
    if first_of_device[members[index].device] != me:
        total.zero_()  # the device's copy is counted once, by its lowest member
    options = dist.ReduceOptions()
    options.rootRank, options.reduceOp = 0, dist.ReduceOp.SUM
    group.reduce([total], options).wait()
    states = _gather_objects(group, index, len(members), optimizer_states)
    if index != 0:
        return None
    return Rescued(total / len(first_of_device), states)


def _gather_objects(group: Any, index: int, size: int, value: Any) -> list[Any]:
    """Every member's ``value`` on member 0 (an empty list elsewhere), pickled into byte tensors."""
    payload = torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
    group.allgather([sizes], [torch.tensor([payload.numel()])]).wait()
    longest = max(int(length) for length in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: payload.numel()] = payload
    outputs = [[torch.zeros(longest, dtype=torch.uint8) for _ in range(size)]] if index == 0 else []
    options = dist.GatherOptions()
    options.rootRank = 0
    group.gather(outputs, [padded], options).wait()
    if index != 0:
        return []
    return [pickle.loads(out[: int(length)].numpy().tobytes()) for out, length in zip(outputs[0], sizes, strict=True)]


def describe_trained(trained: dict[str, Any] | None) -> str:
    """`` (k of n batches of it trained)`` for a rescue's record of its epoch under dynamic sharing, else ``""``."""
    if trained is None:
        return ""
    return f" ({len(trained['chunks_trained'])} of its {trained['chunks']} batches trained)"
