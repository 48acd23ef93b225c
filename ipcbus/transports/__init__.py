"""Transports: how bytes (and fds) get between processes, chosen by URL scheme.

Built in: ``unix`` (and ``unix-abstract`` on Linux), ``fd`` (an inherited
socket), ``pipe`` (Windows named pipes), ``tcp`` (optionally TLS; needs an authkey), and ``memory``
(in-process, for tests). Third parties add a scheme
with :func:`register_transport` or with an entry point in the group
``ipcbus.transports`` whose object is a :class:`Transport` subclass or
instance::

    [project.entry-points."ipcbus.transports"]
    quic = "mypkg.transport:QuicTransport"
"""

from __future__ import annotations

import threading
from importlib import metadata

from .._errors import TransportError
from ._base import AsyncListener as AsyncListener
from ._base import AsyncStream as AsyncStream
from ._base import Listener as Listener
from ._base import Stream as Stream
from ._base import Transport as Transport
from ._fd import FdTransport as FdTransport
from ._memory import MemoryTransport as MemoryTransport
from ._pipe import PipeTransport as PipeTransport
from ._sockets import AsyncSocketStream as AsyncSocketStream
from ._sockets import SocketStream as SocketStream
from ._tcp import TcpTransport as TcpTransport
from ._unix import UnixAbstractTransport as UnixAbstractTransport
from ._unix import UnixTransport as UnixTransport

__all__ = [
    "AsyncListener",
    "AsyncSocketStream",
    "AsyncStream",
    "FdTransport",
    "Listener",
    "MemoryTransport",
    "PipeTransport",
    "SocketStream",
    "Stream",
    "TcpTransport",
    "Transport",
    "UnixAbstractTransport",
    "UnixTransport",
    "available_transports",
    "get_transport",
    "register_transport",
    "split_url",
]

ENTRY_POINT_GROUP = "ipcbus.transports"

_registry: dict[str, Transport] = {}
_lock = threading.Lock()
_entry_points_loaded = False


def register_transport(transport: Transport | type[Transport], *, replace: bool = False) -> None:
    """Make ``transport`` serve URLs of its ``scheme`` in this process.

    A class is instantiated with no arguments. Registering a scheme that is
    taken is a ValueError unless ``replace=True``.
    """
    instance = transport() if isinstance(transport, type) else transport
    if not isinstance(instance, Transport):
        raise TypeError(f"not a Transport: {transport!r}")
    scheme = instance.scheme
    with _lock:
        if scheme in _registry and not replace:
            raise ValueError(f"a transport for {scheme!r} is already registered")
        _registry[scheme] = instance


for _t in (UnixTransport, UnixAbstractTransport, FdTransport, TcpTransport, MemoryTransport, PipeTransport):
    register_transport(_t)


def _load_entry_points() -> None:
    global _entry_points_loaded
    with _lock:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True
        eps = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    for ep in eps:
        if ep.name in _registry:
            continue
        try:
            register_transport(ep.load())
        except Exception as exc:  # a broken plugin must not break the others
            import logging

            logging.getLogger("ipcbus.transports").warning(
                "cannot load transport entry point %r: %s", ep.name, exc
            )


def split_url(url: str) -> tuple[str, str]:
    """``"unix:///tmp/x.sock"`` → ``("unix", "/tmp/x.sock")``."""
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme:
        raise TransportError(f"not a transport URL (scheme://address): {url!r}")
    return scheme.lower(), rest


def get_transport(scheme: str) -> Transport:
    """The transport for ``scheme``; TransportError naming the known schemes."""
    transport = _registry.get(scheme)
    if transport is None:
        _load_entry_points()
        transport = _registry.get(scheme)
    if transport is None:
        raise TransportError(
            f"no transport for {scheme!r}; available: {', '.join(available_transports())}"
        )
    return transport


def available_transports() -> list[str]:
    """Every registered scheme, entry points included, sorted."""
    _load_entry_points()
    return sorted(_registry)
