"""The one background thread that pushes out the tail of a burst.

A blocking ``send`` writes at once when the channel has been idle, and
otherwise leaves the message in the channel's buffer so that a burst goes out
in few writes. Whatever is still buffered when the burst stops is written
here within about a millisecond (or sooner, by the next ``send``, ``recv``,
``flush`` or ``close`` on that channel). The thread never blocks on a peer:
it writes only what the kernel takes without waiting, and comes back for the
rest.
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
    def _background_flush(self) -> bool:
        """Write without waiting; True if something is still left to write."""

    def _exit_flush(self) -> None: ...


_cond = threading.Condition()
_pending: set[Flushable] = set()
_thread: threading.Thread | None = None


def schedule(channel: Flushable) -> None:
    """Make sure ``channel``'s buffer is written soon."""
    global _thread
    with _cond:
        _pending.add(channel)
        if _thread is None:
            # (A forked child starts its own: _after_fork_in_child forgets
            # the parent's, which the child has no copy of.)
            _thread = threading.Thread(target=_run, name="ipcbus-flusher", daemon=True)
            _thread.start()
        _cond.notify()


def _run() -> None:
    global _pending
    while True:
        with _cond:
            while not _pending:
                _cond.wait()
        time.sleep(DELAY)
        with _cond:
            batch, _pending = _pending, set()
        retry = [ch for ch in batch if ch._background_flush()]
        if retry:
            with _cond:
                _pending.update(retry)


def _after_fork_in_child() -> None:
    # os.fork() copies the lock in whatever state the flusher thread left it,
    # but not the thread: start over, or the child could deadlock in schedule().
    global _cond, _pending, _thread
    _cond = threading.Condition()
    _pending = set()
    _thread = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _flush_at_exit() -> None:
    # Daemon threads die with the interpreter: write what is still buffered,
    # so that a message sent just before a normal exit is not lost.
    with _cond:
        batch = list(_pending)
        _pending.clear()
    for ch in batch:
        ch._exit_flush()
