"""Failures of other ranks: noticed between consensus points, named when a collective breaks, and stops on SIGTERM.

fedhog's workers rarely talk to each other, so a peer that dies between two consensus points is found by looking
(:meth:`FaultWatch.watch`, about once a second from the training loop: a ``stat`` per same-host peer, one store
look-up, no collective) and a collective that breaks is turned into an error that says which rank is gone and
what to do (:meth:`FaultWatch.collective_failed`). A SIGTERM is recorded by a handler, announced in the store so
that every rank learns of it within a second, and agreed at the next consensus point
(:class:`~lightning_fedhog.consensus.ConsensusPoints`), so every rank saves the same checkpoint and stops there.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from types import FrameType
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_fedhog.engine import NonFiniteError
from lightning_fedhog.liveness import PeerRegistry

if TYPE_CHECKING:
    import lightning.pytorch as pl

AFTER_FAILURE = (
    "The survivors save what they trained since the last checkpoint as a rescue when they can (a line says where);"
    " the last checkpoint written (e.g. `last.ckpt`) is intact either way. HINT: find the cause in the failed rank's"
    " log, then resume with `trainer.fit(..., ckpt_path=\"last\")` (the newer of `last.ckpt` and the rescue), or"
    " launch with `torchrun --max-restarts=N` to restart automatically"
)

SETTLE_SECONDS = 2.0
"""How long a rank whose collective broke early waits for the peer's process to be seen gone."""

LIVENESS_INTERVAL = 1.0
"""Seconds between two looks at the same-host peers' processes (and at a stop asked by another rank)."""


class PeerLostError(RuntimeError):
    """Another rank of the run died or failed; the message names it, and this rank stops without a checkpoint."""


class FaultWatch:
    """Liveness of the peers and the stop flag of one rank, between and at consensus points.

    Args:
        peers: the run's peer registry (None before set-up: failures are then reported without names).
        rank: this rank's global rank.
        world_size: ranks in the run.
        timeout: the run's collective timeout.
        stop_key: the store key a rank sets when it received SIGTERM.
        rescue_key: the store key the first survivor of a lost peer sets (:mod:`~lightning_fedhog.rescue`).
        meetings: the number of consensus points met so far (the same sequence on every rank).
        clock, sleep: injected for tests.
    """

    def __init__(
        self,
        peers: PeerRegistry | None,
        *,
        rank: int,
        world_size: int,
        timeout: timedelta,
        stop_key: str,
        meetings: Callable[[], int],
        rescue_key: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.peers = peers
        self.signal: int | None = None  # SIGTERM received here (or announced by a peer): stop at a consensus point
        self.failed = False  # this rank failed: peers quote its reason, and the end of `fit` waits for nobody
        self.rank = rank
        self._world_size, self._timeout = world_size, timeout
        self._stop_key = stop_key
        self._rescue_key = rescue_key
        self._meetings = meetings
        self._clock, self._sleep = clock, sleep
        self._announced = False
        self._next_look = 0.0
        self.waited_out = False  # a collective failed after waiting `timeout`: every live rank had time to come

    @property
    def stop_requested(self) -> bool:
        return self.signal is not None

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Called from the signal handler: only records the signal (no I/O, no collective)."""
        self.signal = signum

    def watch(self) -> None:
        """About once a second: stops if a same-host peer's process is gone or another worker started a rescue;
        announces or picks up a stop.

        Raises:
            PeerLostError: a same-host peer's process is gone, or another rank found one gone (on its own host).
        """
        now = self._clock()
        if self.peers is None or now < self._next_look:
            return
        self._next_look = now + min(LIVENESS_INTERVAL, self._timeout.total_seconds() / 4)
        if self.peers.dead_local_peers():
            raise PeerLostError(f"fedhog: rank {self.rank} stops: {self.peers.diagnose()}. {AFTER_FAILURE}")
        with contextlib.suppress(Exception):  # an unreachable store is caught by the next collective
            if self.signal is not None and not self._announced:
                self.peers.store.set(self._stop_key, str(self.rank))
                self._announced = True
            elif self.signal is None and self.peers.store.check([self._stop_key]):
                self.signal = signal.SIGTERM  # another rank (maybe on another host) was asked to stop
        if self._rescue_started():
            raise PeerLostError(
                f"fedhog: rank {self.rank} stops: another worker found a peer gone and the survivors are saving a"
                f" rescue ({self.peers.diagnose()}). {AFTER_FAILURE}"
            )

    def collective_failed(self, what: str, error: BaseException, elapsed: float | None = None) -> PeerLostError:
        """The error of a collective that broke, naming the dead or failed peers this rank can find.

        A killed peer's sockets close while its process is still exiting, before ``/proc`` shows it dead: when the
        collective broke before ``timeout`` (a closed connection, not a wait that ran out), give it a moment, or
        it would be reported as alive but stuck.

        Args:
            elapsed: seconds the collective ran before it failed; None when unknown (then it may have broken early).
        """
        self.waited_out = elapsed is not None and elapsed >= 0.9 * self._timeout.total_seconds()
        if self.peers is not None and not self.waited_out:
            deadline = self._clock() + SETTLE_SECONDS
            while not self.peers.dead_local_peers() and self._clock() < deadline:
                self._sleep(0.05)
        diagnosis = self.peers.diagnose(self._meetings()) if self.peers is not None else "no peer registry yet"
        return PeerLostError(
            f"fedhog: rank {self.rank} could not {what}: another worker of the {self._world_size} is gone or did not"
            f" arrive within `timeout={self._timeout}`: {diagnosis}. {AFTER_FAILURE} ({error})"
        )

    def engine_failed(self, what: str, error: BaseException) -> BaseException:
        """The error to raise for a failed averaging-engine command: its own when a copy went non-finite (and no
        peer is gone), else one that names the lost peer."""
        dead = self.peers.dead_local_peers() if self.peers is not None else []
        if isinstance(error, NonFiniteError) and not dead:
            return error
        return self.collective_failed(what, error)

    def run_engine_command(self, command: Callable[[], None], what: str) -> None:
        """Runs an averaging-engine command; a failure caused by a lost peer is raised as one that names it."""
        try:
            command()
        except RuntimeError as error:
            failure = self.engine_failed(what, error)
            if failure is error:
                raise
            raise failure from error

    def stop_waiting(self) -> str | None:
        """Why a collective this rank waits in will not complete: a same-host peer is dead, or another rank started
        a rescue (it found a peer gone). None when neither is known."""
        if self.peers is None:
            return None
        if dead := self.peers.dead_local_peers():
            return f"{', '.join(peer.describe() for peer in dead)} is gone"
        if self._rescue_started():
            return "another worker found a peer gone and started a rescue"
        return None

    def peer_lost(self, error: BaseException) -> bool:
        """Whether ``fit`` ended on this rank because a peer is gone (so the survivors should save a rescue): the
        error says so, or a same-host peer is dead, or another rank started a rescue. Not on a stop, a Ctrl-C or
        a non-finite copy (a rescue would save it)."""
        if self.peers is None or isinstance(error, (KeyboardInterrupt, SIGTERMException, NonFiniteError)):
            return False
        return isinstance(error, PeerLostError) or bool(self.peers.dead_local_peers()) or self._rescue_started()

    def _rescue_started(self) -> bool:
        """Whether another rank raised the rescue flag in the store (False when the store cannot be reached: a
        collective then fails on its own, and no rescue can be agreed)."""
        if self.peers is None or self._rescue_key is None:
            return False
        try:
            return bool(self.peers.store.check([self._rescue_key]))
        except Exception:  # the store's host is gone
            return False

    def on_failure(self, error: BaseException, *, caused_by_peer: bool) -> str | None:
        """Records this rank's failure for its peers; returns a diagnosis to log when a peer is found dead."""
        self.failed = True
        if self.peers is None:
            return None
        self.peers.mark("failed", f"{type(error).__name__}: {error}", caused_by_peer=caused_by_peer)
        if not caused_by_peer and isinstance(error, RuntimeError) and self.peers.dead_local_peers():
            return f"{self.peers.diagnose()}. {AFTER_FAILURE}"
        return None

    def on_exit(self) -> None:
        if self.peers is not None and not self.failed:
            self.peers.mark("exited")


def check_sigterm_locally(trainer: pl.Trainer) -> None:
    """Stands in for Lightning's per-batch SIGTERM broadcast, which would put every worker in lock-step.

    Each worker receives the signal itself (the launcher forwards it to its children). fedhog's own handler
    (installed at train start) never sets ``received_sigterm``; the stop is agreed at a consensus point. A SIGTERM
    caught by Lightning's handler before that still ends this rank, locally.
    """
    if trainer.received_sigterm:
        raise SIGTERMException()


def install_stop_handler(watch: FaultWatch, previous: Any) -> None:
    """Makes SIGTERM only record the stop (``watch.request_stop``), then call ``previous`` (the user's handler).

    Lightning's own handler broadcasts on the default group from inside the handler; that only pairs with its
    per-batch broadcast, which fedhog removes, and from a signal handler it would block or pair with an unrelated
    collective. Handlers can only be installed from the main thread; elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        watch.request_stop(signum)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, handler)
