"""``fd://N``: a stream socket this process inherited as fd N (a socketpair
end from a parent), and ``socketpair()`` for making such pairs."""

from __future__ import annotations

import os
import socket
import stat

from .._errors import TransportError
from ._base import AsyncStream, Listener, Stream, Transport
from ._sockets import AsyncSocketStream, SocketStream

__all__ = ["FdTransport", "socketpair_sockets"]


def socketpair_sockets() -> tuple[socket.socket, socket.socket]:
    """A connected AF_UNIX stream pair, both ends close-on-exec."""
    try:
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        raise TransportError(f"socketpair failed: {exc}") from exc


def adopt_fd(fd: int) -> socket.socket:
    """Wrap inherited fd ``fd`` (a stream socket) and make it close-on-exec,
    so that it is not inherited further by accident."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise TransportError(f"fd {fd} is not open: {exc}") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise TransportError(f"fd {fd} is not a socket")
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise TransportError(f"fd {fd} is not a stream socket")
    os.set_inheritable(fd, False)
    return sock


def _parse_fd(address: str) -> int:
    try:
        fd = int(address)
    except ValueError:
        raise TransportError(f"fd URL needs a number: fd://3, not fd://{address}") from None
    if fd < 0:
        raise TransportError(f"fd URL needs a non-negative number, not {fd}")
    return fd


class FdTransport(Transport):
    """``fd://N`` connects to the peer at the other end of inherited fd N.
    There is nothing to listen on."""

    scheme = "fd"
    can_send_handles = True

    def connect(self, address: str) -> Stream:
        return SocketStream(adopt_fd(_parse_fd(address)), name="fd", trusted=True)

    def listen(self, address: str) -> Listener:
        raise TransportError("the fd transport connects to an inherited fd; it cannot listen")

    async def connect_async(self, address: str) -> AsyncStream:
        return AsyncSocketStream(adopt_fd(_parse_fd(address)), name="fd", trusted=True)
