"""Unix domain sockets: ``unix:///path/to.sock`` and ``unix-abstract://name``.

The listener is careful with the file system (DESIGN.md §5): the socket file
is created under a restrictive umask (never a moment where it is world
writable), an existing file is replaced only after a probe connect finds no
live server, only the file this listener created is removed on close, a path
over the platform's ``sun_path`` limit is a clear error, and each accepted
peer's uid is checked (SO_PEERCRED) against ``allowed_uids``.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import sys
import threading
from collections.abc import Iterable
from typing import Any

from .._errors import TransportError
from ._base import AsyncListener, AsyncStream, Listener, Stream, Transport
from ._sockets import AsyncSocketStream, SocketStream, peer_credentials

__all__ = ["UnixAbstractTransport", "UnixTransport"]

log = logging.getLogger("ipcbus.transports.unix")

# sun_path is 108 bytes on Linux and 104 on the BSDs and macOS, including
# the terminating NUL.
SUN_PATH_MAX = 108 if sys.platform.startswith("linux") else 104
# Python's socket.listen() default is min(SOMAXCONN, 128); a bus that
# hundreds of workers hit at start-up wants the kernel's full queue.
DEFAULT_BACKLOG = max(128, getattr(socket, "SOMAXCONN", 128))

_umask_lock = threading.Lock()


def _check_path_length(path: str) -> None:
    raw = os.fsencode(path)
    if len(raw) >= SUN_PATH_MAX:
        raise TransportError(
            f"unix socket path is {len(raw)} bytes; the limit on this platform is "
            f"{SUN_PATH_MAX - 1}: {path!r}"
        )


def _allowed(uids: Iterable[int] | None) -> frozenset[int]:
    if uids is None:
        return frozenset({os.getuid()})
    return frozenset(uids) | {os.getuid()}


class _UnixListenerBase:
    def __init__(self, sock: socket.socket, address: str, allowed_uids: frozenset[int]) -> None:
        self._sock = sock
        self._address = address
        self._allowed = allowed_uids

    @property
    def address(self) -> str:
        return self._address

    def _admit(self, conn: socket.socket) -> bool:
        creds = peer_credentials(conn)
        if creds is None:
            return True  # no SO_PEERCRED here: the file mode is the guard
        pid, uid, _ = creds
        if uid in self._allowed:
            return True
        log.warning(
            "refused a connection to %s from pid %d: uid %d is not allowed (allowed: %s)",
            self._address, pid, uid, sorted(self._allowed),
        )
        conn.close()
        return False


class UnixListener(_UnixListenerBase, Listener):
    """A listening AF_UNIX socket (blocking accept)."""

    def __init__(
        self, sock: socket.socket, address: str, allowed_uids: frozenset[int], path: str | None, ident: Any
    ) -> None:
        super().__init__(sock, address, allowed_uids)
        self._path = path
        self._ident = ident

    def accept(self, timeout: float | None = None) -> Stream:
        while True:
            self._sock.settimeout(timeout)
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                raise TimeoutError(f"no connection to {self._address} within {timeout} s") from None
            except OSError as exc:
                raise TransportError(f"accept on {self._address}: {exc}") from exc
            conn.settimeout(None)
            if self._admit(conn):
                return SocketStream(conn, name="unix")

    def close(self) -> None:
        if self._sock.fileno() >= 0:
            self._sock.close()
            _remove_if_ours(self._path, self._ident)


class AsyncUnixListener(_UnixListenerBase, AsyncListener):
    """A listening AF_UNIX socket for trio."""

    def __init__(
        self, sock: socket.socket, address: str, allowed_uids: frozenset[int], path: str | None, ident: Any
    ) -> None:
        import trio

        super().__init__(sock, address, allowed_uids)
        self._tsock: Any = trio.socket.from_stdlib_socket(sock)
        self._path = path
        self._ident = ident

    async def accept(self) -> AsyncStream:
        while True:
            try:
                tconn, _ = await self._tsock.accept()
            except OSError as exc:
                raise TransportError(f"accept on {self._address}: {exc}") from exc
            conn = socket.socket(fileno=tconn.detach())
            if self._admit(conn):
                return AsyncSocketStream(conn, name="unix")

    async def aclose(self) -> None:
        import trio

        if self._tsock.fileno() >= 0:
            self._tsock.close()
            _remove_if_ours(self._path, self._ident)
        await trio.lowlevel.checkpoint()


def _remove_if_ours(path: str | None, ident: Any) -> None:
    # Only the file we bound: another server may have replaced it since.
    if path is None:
        return
    try:
        st = os.stat(path)
    except OSError:
        return
    if (st.st_dev, st.st_ino) == ident:
        try:
            os.unlink(path)
        except OSError:
            pass


def _probe_and_clear(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise TransportError(f"{path!r} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # stale: nobody is listening
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise TransportError(f"cannot probe existing socket {path!r}: {exc}") from exc
    else:
        raise TransportError(f"address in use: a live server answers at {path!r}")
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _bind_path(path: str, backlog: int, mode: int) -> tuple[socket.socket, Any]:
    _check_path_length(path)
    _probe_and_clear(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # umask is process-wide: hold a lock so that two listeners do not
        # restore each other's value; other threads only ever see a stricter one.
        with _umask_lock:
            old = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
        if mode != 0o600:
            os.chmod(path, mode)
        st = os.stat(path)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot listen on unix socket {path!r}: {exc}") from exc
    return sock, (st.st_dev, st.st_ino)


def _connect_path(address: str, timeout: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.settimeout(None)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot connect to unix socket {address!r}: {exc}") from exc
    return sock


class UnixTransport(Transport):
    """``unix:///absolute/path.sock`` (or ``unix://relative/path.sock``).

    listen options: ``allowed_uids`` (uids admitted besides this process's
    own), ``backlog``, ``mode`` (file mode, default 0o600).
    connect options: ``timeout`` for the connect itself.
    """

    scheme = "unix"
    can_send_handles = True

    def _path(self, address: str) -> str:
        if not address:
            raise TransportError("unix URL needs a path: unix:///path/to.sock")
        return address

    def connect(self, address: str, *, timeout: float | None = 10.0) -> Stream:
        path = self._path(address)
        _check_path_length(path)
        return SocketStream(_connect_path(path, timeout), name="unix")

    def listen(
        self,
        address: str,
        *,
        allowed_uids: Iterable[int] | None = None,
        backlog: int = DEFAULT_BACKLOG,
        mode: int = 0o600,
    ) -> Listener:
        path = self._path(address)
        sock, ident = _bind_path(path, backlog, mode)
        return UnixListener(sock, f"unix://{path}", _allowed(allowed_uids), path, ident)

    async def connect_async(self, address: str, *, timeout: float | None = 10.0) -> AsyncStream:
        import trio

        path = self._path(address)
        _check_path_length(path)
        sock = await trio.to_thread.run_sync(_connect_path, path, timeout)
        return AsyncSocketStream(sock, name="unix")

    async def listen_async(
        self,
        address: str,
        *,
        allowed_uids: Iterable[int] | None = None,
        backlog: int = DEFAULT_BACKLOG,
        mode: int = 0o600,
    ) -> AsyncListener:
        path = self._path(address)
        sock, ident = _bind_path(path, backlog, mode)
        return AsyncUnixListener(sock, f"unix://{path}", _allowed(allowed_uids), path, ident)


class UnixAbstractTransport(Transport):
    """``unix-abstract://name``: Linux's abstract socket namespace.

    No file exists, so no file mode guards it: the uid check is the only
    guard, which is why abstract names are used only when asked for.
    """

    scheme = "unix-abstract"
    can_send_handles = True

    def _name(self, address: str) -> str:
        if not sys.platform.startswith("linux"):
            raise TransportError("abstract unix socket names exist only on Linux")
        if not address:
            raise TransportError("unix-abstract URL needs a name: unix-abstract://name")
        _check_path_length("\0" + address)
        return "\0" + address

    def _bind(self, name: str, backlog: int) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(name)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot listen on abstract name {name[1:]!r}: {exc}") from exc
        return sock

    def connect(self, address: str, *, timeout: float | None = 10.0) -> Stream:
        return SocketStream(_connect_path(self._name(address), timeout), name="unix-abstract")

    def listen(
        self, address: str, *, allowed_uids: Iterable[int] | None = None, backlog: int = DEFAULT_BACKLOG
    ) -> Listener:
        name = self._name(address)
        sock = self._bind(name, backlog)
        return UnixListener(sock, f"unix-abstract://{address}", _allowed(allowed_uids), None, None)

    async def connect_async(self, address: str, *, timeout: float | None = 10.0) -> AsyncStream:
        import trio

        sock = await trio.to_thread.run_sync(_connect_path, self._name(address), timeout)
        return AsyncSocketStream(sock, name="unix-abstract")

    async def listen_async(
        self, address: str, *, allowed_uids: Iterable[int] | None = None, backlog: int = DEFAULT_BACKLOG
    ) -> AsyncListener:
        sock = self._bind(self._name(address), backlog)
        return AsyncUnixListener(sock, f"unix-abstract://{address}", _allowed(allowed_uids), None, None)
