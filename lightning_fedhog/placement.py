"""Where a worker sits in the run: its device, its place among the device's K workers, the device leaders.

Each node runs ``devices x K`` processes; worker ``local_rank`` uses device ``local_rank // K`` and the first
worker of a device (slot 0) is its *leader*, which also runs the averaging engine. All of it follows from four
numbers, so it is one frozen value computed once, not arithmetic repeated where it is needed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """One worker's place in the run.

    Attributes:
        workers_per_device: K, the workers sharing one device's parameter copy.
        devices_per_node: fedhog devices on each node (every node has the same number).
        local_rank: the worker's rank on its node.
        node_rank: its node.
        world_size: workers in the run, all nodes together.
    """

    workers_per_device: int
    devices_per_node: int
    local_rank: int
    node_rank: int
    world_size: int

    @property
    def slot(self) -> int:
        """The worker's index among the K workers of its device (0 is the leader)."""
        return self.local_rank % self.workers_per_device

    @property
    def is_leader(self) -> bool:
        return self.slot == 0

    @property
    def local_device(self) -> int:
        """Index of the worker's device among its node's devices (into ``parallel_devices``)."""
        return self.local_rank // self.workers_per_device

    @property
    def device_index(self) -> int:
        """Index of the worker's device among all devices of the run."""
        return self.node_rank * self.devices_per_node + self.local_device

    @property
    def num_devices(self) -> int:
        return self.world_size // self.workers_per_device

    @property
    def leader_ranks(self) -> list[int]:
        """Global ranks of every device's leader, in device order."""
        return list(range(0, self.world_size, self.workers_per_device))
