"""The per-message hot paths, in C when ipcbus._speedups was built.

Each helper returns the pure-Python behaviour unchanged when the accelerator
is missing (no compiler at install time, Windows, or ``IPCBUS_NO_SPEEDUPS=1``
in the environment), so the Python code it wraps is always the reference:
the C versions handle only the common case and hand every other call to it.

    burst_send(...)   decorator for a send method (the burst path in C)
    lazy_recv(...)    decorator for a recv method (a batch's next message in C)
    messages(values)  an iterator of Message(value, None)

With ``round_trip=True`` (the blocking Channel), the two decorators also do
the round trip in C on Linux: a reply's write (``Channel._write_lone``) and
the read of the answer (``recv``'s round-trip path, parsed as
``Connection.lone_message`` does). Those read the channel's and its core's
attributes by name; ``_speedups.ROUND_TRIP_NAMES`` lists them.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from itertools import repeat
from typing import Any, TypeVar

from ._message import Message

__all__ = ["ACCELERATED", "ROUND_TRIP", "burst_send", "lazy_recv", "messages"]

F = TypeVar("F", bound=Callable[..., Any])

_speedups: Any
if os.environ.get("IPCBUS_NO_SPEEDUPS"):
    _speedups = None
else:
    try:
        from . import _speedups
    except ImportError:
        _speedups = None

#: True when the C accelerator is in use.
ACCELERATED = _speedups is not None
#: True when the round trip runs in C too (its clock is time.monotonic's
#: only on Linux, where both read CLOCK_MONOTONIC).
ROUND_TRIP = ACCELERATED and sys.platform == "linux"


def burst_send(
    *, quick: str, encode: str, full: str, plain: str, count: int, limit: int, round_trip: bool = False
) -> Callable[[F], F]:
    """Decorate a ``send(self, data, ...)`` whose path for ``send(data)`` is::

        payload = self.<encode>(data)   # TypeError etc.: the method's error
        quick_list = self.<quick>
        if quick_list and len(payload) <= limit:   # a burst is being collected
            quick_list.append(payload)
            if len(quick_list) >= count:
                self.<full>()
            return
        self.<plain>(payload)           # lone, a reply, a burst's first, large

    The C version runs exactly that for ``send(data)`` and calls the method
    itself for every other call (and when encoding fails, so that the method
    raises its own error). With ``round_trip`` (where ROUND_TRIP), a reply
    that ``Channel._write_lone`` would write at once is written in C, before
    ``self.<plain>`` is tried.
    """

    def decorate(fn: F) -> F:
        if _speedups is None:
            return fn
        fast = _speedups.BurstSend(fn, quick, encode, full, plain, count, limit, round_trip and ROUND_TRIP)
        functools.update_wrapper(fast, fn)
        return fast  # type: ignore[no-any-return]

    return decorate


def lazy_recv(*, core: str, lazy: str, failed: str, round_trip: bool = False) -> Callable[[F], F]:
    """Decorate a ``recv(self, ...)`` whose first step is::

        it = self.<core>.<lazy>
        if it is not None:
            for message in it:
                return message      # the next message of a batch
            # (an exception from it: self.<failed>(exc), then the method)

    The C version runs that for ``recv()`` and calls the method itself when
    there is no batch, at its end, and for every call with arguments. With
    ``round_trip`` (where ROUND_TRIP), a ``recv()`` that would take
    ``Channel.recv``'s round-trip path does that read in C, and parses a read
    of one plain frame there too (other reads: ``self._read_done*``).
    """

    def decorate(fn: F) -> F:
        if _speedups is None:
            return fn
        fast = _speedups.LazyRecv(fn, core, lazy, failed, Message if round_trip and ROUND_TRIP else None)
        functools.update_wrapper(fast, fn)
        return fast  # type: ignore[no-any-return]

    return decorate


def messages(values: Iterable[Any]) -> Iterator[Message]:
    """``Message(value, None)`` for each of ``values``, lazily."""
    if _speedups is not None:
        return _speedups.Messages(values, Message)  # type: ignore[no-any-return]
    return map(tuple.__new__, repeat(Message), zip(values, repeat(None)))
