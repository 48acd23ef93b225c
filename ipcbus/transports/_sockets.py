"""Streams over stream sockets (AF_UNIX, and AF_INET for TCP), blocking and trio.

fds travel as SCM_RIGHTS on AF_UNIX sockets: every read uses ``recvmsg`` with
room for SCM_MAX_FD descriptors and MSG_CMSG_CLOEXEC, so a descriptor is
never silently dropped by a plain ``recv`` (node-ipc.md §3.2), and a
truncated control message is an error, never a short count.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import select
import socket
import struct
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .._errors import ChannelClosed, HandleError, TransportError
from ._base import AsyncStream, Stream

__all__ = ["AsyncSocketStream", "SocketStream", "recv_with_fds"]

SCM_MAX_FD = 253
_ANC_SPACE = socket.CMSG_SPACE(SCM_MAX_FD * 4) if hasattr(socket, "CMSG_SPACE") else 0
# Plain ints: the MSG_* names are IntFlag members, and every | or & on them
# is a Python-level call (a measurable share of one passed handle).
_RECV_FLAGS = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_SEND_FLAGS = int(getattr(socket, "MSG_NOSIGNAL", 0))
_DONTWAIT = int(getattr(socket, "MSG_DONTWAIT", 0))
_SEND_NOWAIT = _SEND_FLAGS | _DONTWAIT
_WINDOWS = sys.platform == "win32"
_CTRUNC = int(getattr(socket, "MSG_CTRUNC", 0))
_CLOSED_ERRNOS = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN}
# recv of a large max_bytes allocates that much for every call: past glibc's
# mmap threshold (128 KiB) that is an mmap, page faults and a shrink each time
# (measured: ~20 us per recvmsg of 256 KiB, against ~5 us for 64 KiB, which is
# most of the cost of one passed handle). So a read asks for SMALL_READ
# unless the previous read filled its buffer, the sign of a bulk transfer.
SMALL_READ = 64 * 1024
_SOL_SOCKET = socket.SOL_SOCKET
_SCM_RIGHTS = getattr(socket, "SCM_RIGHTS", -1)


def _translated(name: str, exc: OSError) -> Exception:
    # One place turns OS errors into the ipcbus hierarchy; the caller raises
    # the result ``from exc``, keeping the OSError as __cause__ (the
    # trio/httpcore pattern).
    if isinstance(exc, (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)) or exc.errno in _CLOSED_ERRNOS:
        return ChannelClosed(f"{name}: peer closed the connection ({exc.strerror})")
    # A closed socket object: EBADF, or on Windows WSAENOTSOCK (10038).
    if exc.errno == errno.EBADF or getattr(exc, "winerror", None) == 10038:
        return ChannelClosed(f"{name}: the stream is closed")
    return TransportError(f"{name}: {exc}")


@contextmanager
def _translate(name: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise _translated(name, exc) from exc


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def recv_with_fds(sock: socket.socket, max_bytes: int, name: str) -> tuple[bytes, list[int]]:
    """One ``recvmsg`` with room for SCM_MAX_FD fds; a truncated control
    message is a HandleError (after closing whatever did arrive)."""
    data, ancdata, flags, _ = sock.recvmsg(max_bytes, _ANC_SPACE, _RECV_FLAGS)
    return data, _fds_received(ancdata, flags, name)


def _fds_received(ancdata: list[tuple[int, int, bytes]], flags: int, name: str) -> list[int]:
    fds: list[int] = []
    for level, ctype, cdata in ancdata:
        if level == _SOL_SOCKET and ctype == _SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(cdata[: len(cdata) - (len(cdata) % arr.itemsize)])
            fds.extend(arr)
    if flags & _CTRUNC:
        _close_fds(fds)
        raise HandleError(f"{name}: control data truncated (MSG_CTRUNC); fds were lost")
    if fds and not _RECV_FLAGS:
        for fd in fds:  # platforms without MSG_CMSG_CLOEXEC: close the window now
            os.set_inheritable(fd, False)
    return fds


def _ancillary(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def peer_credentials(sock: socket.socket) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of an AF_UNIX peer via SO_PEERCRED, where available."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None or sock.family != getattr(socket, "AF_UNIX", None):
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, opt, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class SocketStream(Stream):
    """A blocking stream over a connected stream socket that this object owns."""

    def __init__(self, sock: socket.socket, *, name: str, trusted: bool = False) -> None:
        # Windows has no MSG_DONTWAIT, and a blocking send() there waits
        # until it has taken every byte: the socket stays non-blocking and
        # the blocking calls wait with select() (_win_send, _win_recv).
        sock.setblocking(sys.platform != "win32")
        self._sock = sock
        self.transport_name = name
        self.trusted = trusted
        self.can_send_handles = sock.family == getattr(socket, "AF_UNIX", None)
        self._fd = sock.fileno()
        self._big_read = False

    @property
    def socket(self) -> socket.socket:
        return self._sock

    def fileno(self) -> int:
        return self._fd

    def send(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = (), *, block: bool = True) -> int:
        # try/except rather than the _translate context manager: this is the
        # hot path of every write.
        if _WINDOWS:  # pragma: no cover - Windows
            if fds:
                raise HandleError(f"{self.transport_name}: this socket cannot carry handles (no SCM_RIGHTS on Windows)")
            return self._win_send(data, block)
        try:
            if fds:
                return self._sock.sendmsg([data], _ancillary(fds), _SEND_FLAGS if block else _SEND_NOWAIT)
            return self._sock.send(data, _SEND_FLAGS if block else _SEND_NOWAIT)
        except BlockingIOError:
            if block:
                raise
            return 0
        except OSError as exc:
            raise _translated(self.transport_name, exc) from exc

    def send_parts(self, parts: list[memoryview]) -> int:
        """Blocking scatter-gather write of a prefix of ``parts`` (one
        ``sendmsg``, no fds); returns how many bytes went out."""
        try:
            return self._sock.sendmsg(parts, (), _SEND_FLAGS)
        except OSError as exc:
            raise _translated(self.transport_name, exc) from exc

    def receive(self, max_bytes: int, max_fds: int, timeout: float | None = None) -> tuple[bytes, list[int]]:
        if timeout is not None and not self._wait_readable(timeout):
            raise TimeoutError(f"{self.transport_name}: no data within {timeout} s")
        size = max_bytes if self._big_read or max_bytes < SMALL_READ else SMALL_READ
        try:
            if self.can_send_handles:
                # recv_with_fds inlined for the common case (no fds): this
                # is half of every round trip.
                data, ancdata, flags, _ = self._sock.recvmsg(size, _ANC_SPACE, _RECV_FLAGS)
                fds = _fds_received(ancdata, flags, self.transport_name) if ancdata or flags & _CTRUNC else []
            elif _WINDOWS:  # pragma: no cover - Windows
                data, fds = self._win_recv(size), []
            else:
                data, fds = self._sock.recv(size), []
        except OSError as exc:
            raise _translated(self.transport_name, exc) from exc
        self._big_read = len(data) >= size
        return data, fds

    def fds_received(self, ancdata: list[tuple[int, int, bytes]], flags: int) -> list[int]:
        """The fds of a ``recvmsg`` done outside this object (ipcbus's C
        round trip) on its socket: what :meth:`receive` makes of them."""
        return _fds_received(ancdata, flags, self.transport_name)

    def receive_into(self, buffer: memoryview, max_fds: int, timeout: float | None = None) -> tuple[int, list[int]]:
        if _WINDOWS:  # pragma: no cover - Windows: a non-blocking socket
            return super().receive_into(buffer, max_fds, timeout)
        if timeout is not None and not self._wait_readable(timeout):
            raise TimeoutError(f"{self.transport_name}: no data within {timeout} s")
        try:
            if self.can_send_handles:
                nbytes, ancdata, flags, _ = self._sock.recvmsg_into([buffer], _ANC_SPACE, _RECV_FLAGS)
                fds = _fds_received(ancdata, flags, self.transport_name) if ancdata or flags & _CTRUNC else []
            else:
                nbytes, fds = self._sock.recv_into(buffer), []
        except OSError as exc:
            raise _translated(self.transport_name, exc) from exc
        return nbytes, fds

    def _win_send(self, data: bytes | bytearray | memoryview, block: bool) -> int:  # pragma: no cover - Windows
        while True:
            try:
                return self._sock.send(data)
            except BlockingIOError:
                if not block:
                    return 0
            except OSError as exc:
                raise _translated(self.transport_name, exc) from exc
            self._wait(None, write=True)

    def _win_recv(self, size: int) -> bytes:  # pragma: no cover - Windows
        while True:
            try:
                return self._sock.recv(size)
            except BlockingIOError:
                self._wait(None, write=False)

    def _wait_readable(self, timeout: float) -> bool:
        return self._wait(timeout, write=False)

    def wait_writable(self, timeout: float | None) -> bool:
        return self._wait(timeout, write=True)

    def _wait(self, timeout: float | None, *, write: bool) -> bool:
        if sys.platform == "win32":  # pragma: no cover - select works on sockets there
            sets = ([], [self._sock]) if write else ([self._sock], [])
            r, w, _ = select.select(sets[0], sets[1], [], None if timeout is None else max(timeout, 0))
            return bool(r or w)
        poller = select.poll()
        mask = select.POLLOUT if write else select.POLLIN
        poller.register(self._fd, mask | select.POLLHUP | select.POLLERR)
        return bool(poller.poll(None if timeout is None else max(timeout, 0) * 1000))

    def shutdown_write(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def interrupt_reads(self) -> None:
        # Closing the fd would not wake a recvmsg blocked on it; a shutdown
        # of the reading side does.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RD)

    def close(self) -> None:
        self._sock.close()

    def peer_credentials(self) -> tuple[int, int, int] | None:
        return peer_credentials(self._sock)

    def describe_peer(self) -> str:
        try:
            peer = self._sock.getpeername()
        except OSError:
            peer = None
        creds = self.peer_credentials()
        if creds:
            return f"{self.transport_name} peer pid {creds[0]} uid {creds[1]}"
        return f"{self.transport_name} peer {peer!r}" if peer else self.transport_name


class AsyncSocketStream(AsyncStream):
    """A trio stream over a connected stream socket that this object owns."""

    def __init__(self, sock: socket.socket, *, name: str, trusted: bool = False) -> None:
        import trio

        self._stdlib = sock
        self._sock: Any = trio.socket.from_stdlib_socket(sock)
        self._big_read = False
        self.transport_name = name
        self.trusted = trusted
        self.can_send_handles = sock.family == getattr(socket, "AF_UNIX", None)

    @property
    def socket(self) -> socket.socket:
        return self._stdlib

    async def send(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> int:
        with _translate(self.transport_name):
            if fds:
                return await self._sock.sendmsg([data], _ancillary(fds), _SEND_FLAGS)
            return await self._sock.send(data, _SEND_FLAGS)

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        if _WINDOWS:  # pragma: no cover - no MSG_DONTWAIT there: the writer task writes
            return 0
        try:
            return self._stdlib.send(data, _SEND_NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise _translated(self.transport_name, exc) from exc

    async def receive(self, max_bytes: int, max_fds: int) -> tuple[bytes, list[int]]:
        import trio

        size = max_bytes if self._big_read else min(max_bytes, SMALL_READ)
        with _translate(self.transport_name):
            if not self.can_send_handles:
                data = await self._sock.recv(size)
                self._big_read = len(data) >= size
                return data, []
            # Like trio's own socket methods: try first, wait only when the
            # kernel has nothing (one syscall per read under load, not two).
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                try:
                    data, fds = recv_with_fds(self._stdlib, size, self.transport_name)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self._stdlib)
                    continue
                break
            await trio.lowlevel.cancel_shielded_checkpoint()
            self._big_read = len(data) >= size
            return data, fds

    async def aclose(self) -> None:
        import trio

        self._sock.close()
        await trio.lowlevel.checkpoint()

    def close_nowait(self) -> None:
        self._sock.close()

    def peer_credentials(self) -> tuple[int, int, int] | None:
        return peer_credentials(self._stdlib)

    def describe_peer(self) -> str:
        creds = self.peer_credentials()
        if creds:
            return f"{self.transport_name} peer pid {creds[0]} uid {creds[1]}"
        try:
            return f"{self.transport_name} peer {self._stdlib.getpeername()!r}"
        except OSError:
            return self.transport_name
