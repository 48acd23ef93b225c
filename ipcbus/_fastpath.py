"""The per-message hot paths, in C when ipcbus._speedups was built.

Each helper returns the pure-Python behaviour unchanged when the accelerator
is missing (no compiler at install time, Windows, or ``IPCBUS_NO_SPEEDUPS=1``
in the environment), so the Python code it wraps is always the reference:
the C versions handle only the common case and hand every other call to it.

    burst_send(...)   decorator for a send method (the burst path in C)
    lazy_recv(...)    decorator for a recv method (a batch's next message in C)
    messages(values)  an iterator of Message(value, None)
    msgpack_pack(pack)
                      the msgpack codec's encoder: the same bytes as
                      ``pack`` (a Packer(use_bin_type=True).pack), common
                      values encoded in C
    msgpack_unpackb(unpackb)
                      the msgpack codec's decoder of one value: the same
                      values as ``unpackb``, common values decoded in C
    msgpack_values(data, rest)
                      the values of a msgpack batch, as ``rest(data, 0)``
                      gives them, common values decoded in C
    FrontSlots        base of a frontend: ``_core``, ``_quick``, ``_fast_encode``
    CoreSlots         base of a protocol core: ``_lazy``
                      (both: C fields that the fast methods read directly)

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

__all__ = [
    "ACCELERATED", "CORE_FIELDS", "FRONT_FIELDS", "ROUND_TRIP", "CoreSlots", "FrontSlots", "burst_send", "lazy_recv",
    "messages", "msgpack_pack", "msgpack_unpackb", "msgpack_values",
]

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

#: The fields of FrontSlots and CoreSlots: the C types' member descriptors,
#: and the pure-Python twins' __slots__.
FRONT_FIELDS = ("_core", "_quick", "_fast_encode")
CORE_FIELDS = ("_lazy",)

if _speedups is not None:
    FrontSlots: type = _speedups.FrontSlots
    CoreSlots: type = _speedups.CoreSlots
else:

    class FrontSlots:  # type: ignore[no-redef]
        """A frontend's base: the slots of its protocol core, burst list and
        send encoder."""

        __slots__ = FRONT_FIELDS

    class CoreSlots:  # type: ignore[no-redef]
        """A protocol core's base: the slot of its batch iterator."""

        __slots__ = CORE_FIELDS


def burst_send(*, full: str, plain: str, count: int, limit: int, round_trip: bool = False) -> Callable[[F], F]:
    """Decorate a ``send(self, data, ...)`` of a :class:`FrontSlots` whose
    path for ``send(data)`` is::

        payload = self._fast_encode(data)   # TypeError etc.: the method's error
        quick_list = self._quick
        if quick_list and len(payload) <= limit:   # a burst is being collected
            quick_list.append(payload)
            if len(quick_list) >= count:
                self.<full>()
            return
        self.<plain>(payload)           # lone, a reply, a burst's first, large

    The C version runs exactly that for ``send(data)`` (reading the two C
    fields, not looking the names up) and calls the method itself for every
    other call, for instances of other classes, and when encoding fails (so
    that the method raises its own error). With ``round_trip`` (where
    ROUND_TRIP), a reply that ``Channel._write_lone`` would write at once is
    written in C, before ``self.<plain>`` is tried.
    """

    def decorate(fn: F) -> F:
        if _speedups is None:
            return fn
        fast = _speedups.BurstSend(fn, full, plain, count, limit, round_trip and ROUND_TRIP)
        functools.update_wrapper(fast, fn)
        return fast  # type: ignore[no-any-return]

    return decorate


def lazy_recv(*, failed: str, round_trip: bool = False) -> Callable[[F], F]:
    """Decorate a ``recv(self, ...)`` of a :class:`FrontSlots` whose core is
    a :class:`CoreSlots`, whose first step is::

        it = self._core._lazy
        if it is not None:
            for message in it:
                return message      # the next message of a batch
            # (an exception from it: self.<failed>(exc), then the method)

    The C version runs that for ``recv()`` (reading the two C fields, not
    looking the names up) and calls the method itself when there is no
    batch, at its end, for every call with arguments, and for instances of
    other classes (a core of another kind). With
    ``round_trip`` (where ROUND_TRIP), a ``recv()`` that would take
    ``Channel.recv``'s round-trip path does that read in C, and parses a read
    of one plain frame there too (other reads: ``self._read_done*``).
    """

    def decorate(fn: F) -> F:
        if _speedups is None:
            return fn
        fast = _speedups.LazyRecv(fn, failed, Message if round_trip and ROUND_TRIP else None)
        functools.update_wrapper(fast, fn)
        return fast  # type: ignore[no-any-return]

    return decorate


def messages(values: Iterable[Any]) -> Iterator[Message]:
    """``Message(value, None)`` for each of ``values``, lazily."""
    if _speedups is not None:
        return _speedups.Messages(values, Message)  # type: ignore[no-any-return]
    return map(tuple.__new__, repeat(Message), zip(values, repeat(None)))


def msgpack_pack(pack: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """An encoder returning what ``pack``, a ``msgpack.Packer(use_bin_type=True)``'s
    ``pack``, returns, byte for byte: in C for values made only of None,
    bool, int, float, str, bytes, list, tuple and dict (exact types, at most
    32 containers deep); ``pack(value)`` itself, and so its errors, for every
    other value."""
    if _speedups is not None:
        return _speedups.MsgpackPack(pack)  # type: ignore[no-any-return]
    return pack


def msgpack_unpackb(unpackb: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A decoder returning what ``unpackb``, ``msgpack.unpackb`` with
    ``strict_map_key=False``, returns for a bytes-like object holding one
    value: in C when the data is one value made only of nil, bool, int,
    float, str, bin, array and map; ``unpackb(data)`` itself, and so its
    errors, for any other data."""
    if _speedups is not None:
        return _speedups.MsgpackUnpackb(unpackb)  # type: ignore[no-any-return]
    return unpackb


def msgpack_values(
    data: bytes | bytearray | memoryview, rest: Callable[[bytes | bytearray | memoryview, int], Iterator[Any]]
) -> Iterator[Any]:
    """The values of ``data``, msgpack values back to back: what ``rest(data,
    0)`` gives, ``rest(data, offset)`` being msgpack's decoding of them from
    ``offset`` on. In C, values made only of nil, bool, int, float, str,
    bin, array and map are decoded to the same Python values (from a copy
    of data); from the first other one (an ext type, invalid UTF-8, damaged
    bytes) on, the iterator ``rest(data, offset)`` gives the rest, with its
    own errors."""
    if _speedups is not None:
        return _speedups.MsgpackValues(bytes(data), rest)  # type: ignore[no-any-return]
    return rest(data, 0)
