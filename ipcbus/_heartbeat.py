"""The one background thread that sends heartbeat pings (blocking API).

A channel opened with ``heartbeat=T`` declares its peer dead when nothing has
arrived for T seconds (checked by ``recv``). So that a live peer is never
silent that long, each end pings whenever it has written nothing for
T / PINGS_PER_PERIOD seconds, from this thread, even while the application
is busy elsewhere. The thread never blocks on a peer: it queues the ping in
the channel's core and leaves the write to the non-blocking flusher
(``_flusher``), and it skips a channel that still has unwritten output (a
peer that is not reading gains nothing from more pings).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Protocol

__all__ = ["PINGS_PER_PERIOD", "register"]

log = logging.getLogger("ipcbus")

# A live peer pings four times per heartbeat period, so that a late ping or
# two (a loaded machine, a GC pause) never looks like death.
PINGS_PER_PERIOD = 4
# The thread wakes twice per ping interval of the fastest channel.
_MIN_TICK = 0.005


class Heartbeating(Protocol):
    _heartbeat: float | None

    def _heartbeat_tick(self, now: float) -> bool:
        """Ping if idle; False once the channel is closed (stop tracking)."""


_cond = threading.Condition()
_channels: weakref.WeakSet[Heartbeating] = weakref.WeakSet()
_thread: threading.Thread | None = None
_thread_pid = 0


def register(channel: Heartbeating) -> None:
    """Send pings for ``channel`` while it is idle, until it closes.

    Channels are held weakly: one dropped without ``close`` stops pinging.
    """
    global _thread, _thread_pid
    with _cond:
        _channels.add(channel)
        pid = os.getpid()
        if _thread is None or _thread_pid != pid:
            # A forked child has no copy of the thread: start its own.
            _thread = threading.Thread(target=_run, name="ipcbus-heartbeat", daemon=True)
            _thread_pid = pid
            _thread.start()
        _cond.notify()


def _run() -> None:
    while True:
        with _cond:
            while not _channels:
                _cond.wait()
            channels = list(_channels)
        tick = max(_MIN_TICK, min((c._heartbeat or 1.0 for c in channels), default=1.0) / PINGS_PER_PERIOD / 2)
        now = time.monotonic()
        ch = None
        for ch in channels:
            try:
                keep = ch._heartbeat_tick(now)
            except Exception:  # a broken channel must not stop the others' pings
                log.debug("heartbeat tick failed", exc_info=True)
                keep = False
            if not keep:
                with _cond:
                    _channels.discard(ch)
        del channels, ch  # hold no strong reference while asleep
        with _cond:
            _cond.wait(tick)
