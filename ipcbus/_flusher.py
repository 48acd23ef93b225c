"""The one background thread that pushes out the tail of a burst.

A blocking ``send`` writes at once when the channel has been idle, and
otherwise leaves the message in the channel's buffer so that a burst goes out
in few writes. Whatever is still buffered when the burst stops is written
here within about a millisecond (or sooner, by the next ``send``, ``recv``,
``flush`` or ``close`` on that channel). The thread never blocks on a peer:
it writes only what the kernel takes without waiting, and comes back for the
rest.

Each wake-up of this thread takes the GIL from the threads that send, so it
sleeps until the next channel is due rather than in fixed ticks, and a
channel may ask for a later visit (``_background_flush`` returns the delay):
a long burst that its sender writes in full batches itself is looked at up
to HOLD_WINDOW (8 ms) apart, and its tail written within about that.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from typing import Protocol

__all__ = ["schedule"]

DELAY = 0.0005  # seconds a burst may accumulate before the thread writes it


class Flushable(Protocol):
    def _background_flush(self) -> float | None:
        """Write without waiting. None when done; else seconds until the
        thread should come back (something is left, or the channel asked
        for time)."""

    def _exit_flush(self) -> None: ...


_cond = threading.Condition()
_due: dict[Flushable, float] = {}  # channel -> monotonic time of its next visit
_thread: threading.Thread | None = None
_waiting_until: float | None = None  # the thread's wake-up time while it waits


def schedule(channel: Flushable) -> None:
    """Make sure ``channel``'s buffer is written soon (in DELAY seconds)."""
    global _thread
    with _cond:
        if channel in _due:
            return
        due = _due[channel] = time.monotonic() + DELAY
        if _thread is None:
            # (A forked child starts its own: _after_fork_in_child forgets
            # the parent's, which the child has no copy of.)
            _thread = threading.Thread(target=_run, name="ipcbus-flusher", daemon=True)
            _thread.start()
        if _waiting_until is None or due < _waiting_until:
            _cond.notify()


def _run() -> None:
    global _waiting_until
    while True:
        with _cond:
            # Each wake-up takes the GIL from the threads that send: sleep
            # until the first visit is due, not in fixed ticks.
            now = time.monotonic()
            first = min(_due.values(), default=None)
            if first is None or first > now:
                _waiting_until = first if first is not None else float("inf")
                _cond.wait(None if first is None else first - now)
                _waiting_until = None
                continue
            ready = [ch for ch, due in _due.items() if due <= now]
            for ch in ready:
                del _due[ch]
        for ch in ready:
            again = ch._background_flush()
            if again is not None:
                with _cond:
                    due = time.monotonic() + again
                    _due[ch] = min(due, _due.get(ch, due))


def _after_fork_in_child() -> None:
    # os.fork() copies the lock in whatever state the flusher thread left it,
    # but not the thread: start over, or the child could deadlock in schedule().
    global _cond, _due, _thread, _waiting_until
    _cond = threading.Condition()
    _due = {}
    _thread = None
    _waiting_until = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _flush_at_exit() -> None:
    # Daemon threads die with the interpreter: write what is still buffered,
    # so that a message sent just before a normal exit is not lost.
    with _cond:
        batch = list(_due)
        _due.clear()
    for ch in batch:
        ch._exit_flush()
