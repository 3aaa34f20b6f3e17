"""Fakes shared by the tests of the meetings between workers (consensus points, the stop agreement, failures).

They stand in for the collectives, the averaging engine, the rendezvous store, the peers' liveness and the clock,
and record what they were asked in a :class:`Calls` list, so a test runs in milliseconds without a process or a
thread and asserts the order of what happened.
"""

from __future__ import annotations


class Calls(list):
    """Everything the fakes were asked, in order."""


class FakeCollectives:
    def __init__(
        self, calls: Calls, anyone_stops: bool = False, fail_at: str | None = None, peer_skips: bool = False
    ) -> None:
        self.calls, self.anyone_stops, self.fail_at, self.peer_skips = calls, anyone_stops, fail_at, peer_skips

    def agree(self, flag: bool) -> bool:
        self.calls.append("agree")
        if self.fail_at == "agree":
            raise RuntimeError("Connection closed by peer")
        return flag or self.anyone_stops

    def count(self, flags: tuple[bool, ...]) -> tuple[int, ...]:
        """The epoch-end meeting's flags (stop, skipped, present) summed with one peer's: it stops if any stops,
        skips if ``peer_skips``."""
        self.calls.append("meet")
        if self.fail_at == "meet":
            raise RuntimeError("Connection closed by peer")
        peer = (self.anyone_stops, self.peer_skips, True)
        return tuple(int(mine) + int(theirs) for mine, theirs in zip(flags, peer, strict=True))

    def barrier(self, name: str) -> None:
        self.calls.append("barrier")
        if self.fail_at == "barrier":
            raise RuntimeError("Connection closed by peer")


class FakeEngine:
    def __init__(self, calls: Calls, error: BaseException | None = None) -> None:
        self.calls, self.error, self.parked = calls, error, False

    def pause(self) -> None:
        self.calls.append("engine.pause")
        self.parked = True

    def full_average(self) -> None:
        self.calls.append("engine.full_average")
        if self.error is not None:
            raise self.error

    def consensus_average(self) -> None:
        self.calls.append("engine.consensus_average")
        if self.error is not None:
            raise self.error

    def make_exact(self) -> None:
        self.calls.append("engine.make_exact")

    def resume(self) -> None:
        self.calls.append("engine.resume")
        self.parked = False


class FakeStore:
    def __init__(self) -> None:
        self.keys: dict[str, str] = {}

    def set(self, key: str, value: str) -> None:
        self.keys[key] = value

    def check(self, keys: list[str]) -> bool:
        return all(key in self.keys for key in keys)


class FakePeers:
    def __init__(self, store: FakeStore | None = None, dead: list[int] | None = None) -> None:
        self.store, self.dead, self.marks = store or FakeStore(), dead or [], []

    def dead_local_peers(self) -> list[int]:
        return self.dead

    def diagnose(self, meetings: int | None = None) -> str:
        return f"rank {self.dead} is dead" if self.dead else "every peer is alive"

    def mark(self, state: str, reason: str = "", caused_by_peer: bool = False) -> None:
        self.marks.append(state)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
