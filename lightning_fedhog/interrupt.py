"""Ctrl-C in the launching process: the workers it started stop at once, and it says so.

Under Lightning's plain launcher the launching process is rank 0 and the parent of the other workers. A terminal's
Ctrl-C reaches every process of the foreground group, but one delivered to the launching process only (``kill
-INT``, an IDE's stop button) reaches the workers only through the launching process, and Python runs its SIGINT
handler (the ``KeyboardInterrupt``) in the main thread only, between two bytecodes: while that thread waits in
native code, e.g. for every worker to join the default process group at start-up, nothing happens until the wait
ends. Python's C-level handler, though, writes the signal's number to the *wakeup fd* at once, whatever the main
thread is doing; :class:`InterruptWatch` reads it in a thread and acts:

* it calls ``stop_workers`` at once (the launcher prints one line and kills its workers, as Lightning ends DDP's
  workers after an interrupt: nothing is saved; a SIGTERM is the signal that stops with a checkpoint);
* during start-up (the main thread in the rendezvous, which can no longer complete) it ends this process at once,
  with status 130 (128 + SIGINT);
* otherwise the main thread takes the ``KeyboardInterrupt`` and Lightning shuts down as it does for DDP; should it
  still be inside ``fit`` ``grace`` seconds later (blocked in native code), or on a second Ctrl-C, this process
  ends at once too.

Only SIGINTs that would raise ``KeyboardInterrupt`` count: a user's own SIGINT handler, or Lightning's ``SIG_IGN``
during its shutdown, leaves them alone. Nothing is installed outside the main thread or when something else (an
asyncio loop) already owns the wakeup fd: the ``KeyboardInterrupt`` is then the only notice.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable

INTERRUPT_GRACE = 5.0
"""Seconds the main thread gets to take the ``KeyboardInterrupt`` and leave ``fit`` before this process ends."""

INTERRUPTED_STATUS = 130
"""The exit status of a process that ends on SIGINT without Python's own handling (128 + SIGINT, as shells use)."""

_STOP = 0  # the byte `close` writes to end the thread (no signal has number 0)


def exit_now(status: int = INTERRUPTED_STATUS) -> None:
    """Ends this process at once (no ``atexit``, no ``finally``), after flushing what it printed."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


class InterruptWatch(threading.Thread):
    """Acts on a SIGINT to this process as soon as it arrives, from a thread (see the module's docstring).

    Args:
        stop_workers: ends the workers; called from this thread on a SIGINT, with whether it is start-up.
        in_startup: whether the main thread waits in the rendezvous (a wait it cannot leave on its own).
        in_fit: whether the main thread is still inside ``fit`` (it leaves on the ``KeyboardInterrupt``).
        grace: seconds the main thread gets to leave ``fit``.
        exit: ends this process (injected for tests).
    """

    def __init__(
        self,
        read_fd: int,
        write_fd: int,
        *,
        stop_workers: Callable[[bool], None],
        in_startup: Callable[[], bool],
        in_fit: Callable[[], bool],
        grace: float = INTERRUPT_GRACE,
        exit: Callable[[], None] = exit_now,
    ) -> None:
        super().__init__(daemon=True, name="fedhog-interrupt")
        self._read, self._write = read_fd, write_fd
        self._stop_workers, self._in_startup, self._in_fit = stop_workers, in_startup, in_fit
        self._grace, self._exit = grace, exit
        self.interrupts = 0

    @classmethod
    def install(cls, **kwargs: object) -> InterruptWatch | None:
        """Becomes the wakeup fd's reader and starts; None (nothing installed) outside the main thread or when the
        wakeup fd is taken. Call :meth:`close` from the main thread to uninstall."""
        if threading.current_thread() is not threading.main_thread():
            return None
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # Python's C handler must never block
        previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        if previous != -1:  # someone else's (an asyncio loop): give it back
            signal.set_wakeup_fd(previous)
            os.close(read_fd)
            os.close(write_fd)
            return None
        watch = cls(read_fd, write_fd, **kwargs)  # type: ignore[arg-type]
        watch.start()
        return watch

    def run(self) -> None:
        deadline: float | None = None
        while True:
            wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            ready, _, _ = select.select([self._read], [], [], wait)
            if not ready:  # the grace ran out
                deadline = None
                if self._in_fit():
                    print(
                        f"fedhog: the main thread is still blocked (in native code) {self._grace:.0f} s after the"
                        " interrupt; exiting without Lightning's shutdown.", file=sys.stderr, flush=True,
                    )
                    self._exit()
                continue
            data = os.read(self._read, 64)
            if not data or _STOP in data:
                return
            if signal.SIGINT not in data or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
                continue  # another signal, or a SIGINT that raises no KeyboardInterrupt
            self.interrupts += 1
            if self.interrupts > 1 and self._in_fit():  # a second Ctrl-C while the first has not got through
                self._exit()
                continue
            startup = self._in_startup()
            self._stop_workers(startup)
            if startup:  # the rendezvous waits for workers that are gone: it would only time out
                self._exit()
            else:
                deadline = time.monotonic() + self._grace

    def close(self) -> None:
        """Uninstalls (from the main thread) and ends the thread."""
        current = signal.set_wakeup_fd(-1)
        if current != self._write:  # replaced since: not ours to remove
            signal.set_wakeup_fd(current)
        with contextlib.suppress(OSError):
            os.set_blocking(self._write, True)
            os.write(self._write, bytes([_STOP]))
        self.join(timeout=5.0)
        os.close(self._write)
        os.close(self._read)
