"""TCP: ``tcp://host:port`` (IPv6 as ``tcp://[::1]:port``), with optional TLS.

TCP crosses machines, so the transport declares ``requires_auth``:
``ipcbus.listen`` / ``connect`` refuse to run without an ``authkey`` unless
the caller opts out with ``allow_unauthenticated=True`` on a loopback
address (DESIGN.md §5). TCP carries bytes only: a handle is refused with a
HandleError. TCP_NODELAY is on, since the channel core already coalesces
small messages into few writes.

TLS: pass ``ssl_context=`` (an :class:`ssl.SSLContext`; a server-side one to
``listen``, a client-side one to ``connect``). Mutual TLS is the server
context's ``verify_mode = ssl.CERT_REQUIRED`` plus a client certificate in
the client context. The listener runs the TLS handshakes of the peers it
accepted side by side, each bounded by ``tls_handshake_timeout``, and hands
out only finished ones, so one slow or hostile peer never stalls the accept
loop. TLS streams use plain send/recv (SSLSocket has no sendmsg/recvmsg);
their socket is non-blocking, and every call into the TLS object is made
under a lock, since ``send`` and ``recv`` may run in two threads at once.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from .._errors import ChannelClosed, HandleError, HandshakeError, HandshakeTimeout, TransportError
from ._base import AsyncListener, AsyncStream, Listener, Stream, Transport
from ._sockets import AsyncSocketStream, SocketStream, _translate

__all__ = [
    "AsyncTlsStream",
    "TcpListener",
    "TcpStream",
    "TcpTransport",
    "TlsStream",
    "format_address",
    "parse_address",
]

log = logging.getLogger("ipcbus.transports.tcp")

DEFAULT_BACKLOG = max(128, getattr(socket, "SOMAXCONN", 128))
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_TLS_HANDSHAKE_TIMEOUT = 10.0
# TLS handshakes a listener runs at once; further peers wait in the
# kernel's accept queue until some finish.
MAX_TLS_HANDSHAKES = 128
# One TLS write is capped so that the lock is never held for long; a write
# that must be retried is retried with the same bytes (OpenSSL's rule).
TLS_WRITE_MAX = 64 * 1024

_NO_HANDLES = "the tcp transport cannot carry handles (fds cannot cross a TCP connection)"


def parse_address(address: str) -> tuple[str, int]:
    """``"127.0.0.1:80"`` / ``"[::1]:80"`` / ``"host:0"`` → (host, port)."""
    address = address.rstrip("/")
    if address.startswith("["):
        end = address.find("]")
        if end < 0 or address[end + 1 : end + 2] != ":":
            raise TransportError(f"bad tcp address {address!r}: use tcp://[ipv6]:port")
        host, port_text = address[1:end], address[end + 2 :]
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep:
            raise TransportError(f"tcp URL needs host:port, not {address!r} (e.g. tcp://127.0.0.1:0)")
        if ":" in host:
            raise TransportError(f"bad tcp address {address!r}: IPv6 addresses go in brackets, tcp://[::1]:port")
    if not host:
        raise TransportError(f"tcp URL needs a host, not {address!r} (0.0.0.0 for every interface)")
    try:
        port = int(port_text)
    except ValueError:
        raise TransportError(f"bad tcp port {port_text!r} in {address!r}") from None
    if not 0 <= port <= 65535:
        raise TransportError(f"tcp port {port} is outside 0..65535")
    return host, port


def format_address(host: str, port: int) -> str:
    """(host, port) → ``tcp://host:port``, with brackets around IPv6."""
    if ":" in host:
        return f"tcp://[{host}]:{port}"
    return f"tcp://{host}:{port}"


def _resolve(host: str, port: int, *, passive: bool) -> list[tuple[Any, ...]]:
    try:
        return socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE if passive else 0
        )
    except socket.gaierror as exc:
        raise TransportError(f"cannot resolve tcp host {host!r}: {exc}") from exc


def _peer_name(sock: socket.socket) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return "tcp peer (unknown)"
    return "tcp peer " + format_address(peer[0], peer[1])[len("tcp://") :]


def _nodelay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


_HAVE_POLL = hasattr(select, "poll")
# poll()'s event bits (the same on every platform that has poll; Windows has not).
_POLLIN = getattr(select, "POLLIN", 0x001)
_POLLOUT = getattr(select, "POLLOUT", 0x004)
_POLLERR = getattr(select, "POLLERR", 0x008)
_POLLHUP = getattr(select, "POLLHUP", 0x010)


def _poll(fd: int, events: int, deadline: float | None) -> bool:
    """Wait for ``events`` on ``fd`` until ``deadline`` (monotonic); False
    if it passed first."""
    timeout = None if deadline is None else deadline - time.monotonic()
    if timeout is not None and timeout <= 0:
        return False
    poller = _poller()
    poller.register(fd, events | _POLLHUP | _POLLERR)
    return bool(poller.poll(None if timeout is None else timeout * 1000))


class _SelectPoller:
    """select.poll()'s interface over select.select(), for Windows (no poll()
    there; select() takes sockets)."""

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}

    def register(self, fd: int, events: int) -> None:
        self._fds[fd] = events

    def poll(self, timeout_ms: float | None = None) -> list[tuple[int, int]]:
        rd = [fd for fd, ev in self._fds.items() if ev & _POLLIN]
        wr = [fd for fd, ev in self._fds.items() if ev & _POLLOUT]
        if not rd and not wr:
            time.sleep(0 if timeout_ms is None else timeout_ms / 1000)
            return []
        r, w, x = select.select(rd, wr, list(self._fds), None if timeout_ms is None else timeout_ms / 1000)
        out: dict[int, int] = {}
        for fds, ev in ((r, _POLLIN), (w, _POLLOUT), (x, _POLLERR)):
            for fd in fds:
                out[fd] = out.get(fd, 0) | ev
        return list(out.items())


def _poller() -> Any:
    return select.poll() if _HAVE_POLL else _SelectPoller()


# --------------------------------------------------------------------- plain


class TcpStream(SocketStream):
    """A blocking stream over a connected TCP socket (no handles)."""

    def __init__(self, sock: socket.socket) -> None:
        _nodelay(sock)
        super().__init__(sock, name="tcp")
        self._peer = _peer_name(sock)

    def send(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = (), *, block: bool = True) -> int:
        if fds:
            raise HandleError(_NO_HANDLES)
        return super().send(data, (), block=block)

    def describe_peer(self) -> str:
        return self._peer


# ----------------------------------------------------------------------- TLS


def _tls_failure(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return str(exc) or type(exc).__name__


class TlsStream(Stream):
    """A blocking stream over a TLS connection whose handshake is done.

    ``peer_certificate()`` gives the peer's verified certificate (a dict, as
    :meth:`ssl.SSLSocket.getpeercert` returns), ``tls_version`` the version.
    """

    transport_name = "tcp"
    can_send_handles = False
    trusted = False

    def __init__(self, ssock: ssl.SSLSocket, peer: str) -> None:
        ssock.setblocking(False)
        self._ssl = ssock
        self._fd = ssock.fileno()
        self._peer = peer
        self._lock = threading.Lock()

    @property
    def ssl_socket(self) -> ssl.SSLSocket:
        return self._ssl

    @property
    def tls_version(self) -> str | None:
        return self._ssl.version()

    def peer_certificate(self) -> dict[str, Any] | None:
        """The peer's certificate if one was sent and verified, else None."""
        return self._ssl.getpeercert() or None

    def fileno(self) -> int:
        return self._fd

    def send(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = (), *, block: bool = True) -> int:
        if fds:
            raise HandleError(_NO_HANDLES)
        chunk = data[:TLS_WRITE_MAX]
        while True:
            with self._lock, _translate("tcp"):
                try:
                    return self._ssl.send(chunk)
                except ssl.SSLWantWriteError:
                    events = _POLLOUT
                except ssl.SSLWantReadError:
                    events = _POLLIN
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError) as exc:
                    raise ChannelClosed(f"tcp: peer closed the TLS connection ({exc})") from exc
                except ssl.SSLError as exc:
                    raise TransportError(f"tcp: TLS error: {_tls_failure(exc)}") from exc
                except ValueError as exc:  # the SSL socket was closed under us
                    raise ChannelClosed("tcp: the stream is closed") from exc
            if not block:
                return 0
            _poll(self._fd, events, None)

    def receive(self, max_bytes: int, max_fds: int, timeout: float | None = None) -> tuple[bytes, list[int]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # Try before waiting: the TLS object may hold decrypted bytes the
            # socket no longer shows as readable.
            with self._lock, _translate("tcp"):
                try:
                    return self._ssl.recv(max_bytes), []
                except ssl.SSLWantReadError:
                    events = _POLLIN
                except ssl.SSLWantWriteError:
                    events = _POLLOUT
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return b"", []
                except ssl.SSLError as exc:
                    raise TransportError(f"tcp: TLS error: {_tls_failure(exc)}") from exc
                except ValueError as exc:
                    raise ChannelClosed("tcp: the stream is closed") from exc
            if not _poll(self._fd, events, deadline):
                raise TimeoutError(f"tcp: no data within {timeout} s")

    def wait_writable(self, timeout: float | None) -> bool:
        return _poll(self._fd, _POLLOUT, None if timeout is None else time.monotonic() + timeout)

    def shutdown_write(self) -> None:
        pass  # TLS has no half-close that the peer's TLS layer would honour

    def interrupt_reads(self) -> None:
        # The plain socket's shutdown: SSLSocket.shutdown would also drop
        # the TLS object under the reading thread.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self._ssl, socket.SHUT_RD)

    def close(self) -> None:
        try:
            self._ssl.close()
        except OSError:
            pass

    def describe_peer(self) -> str:
        return self._peer + " (TLS)"


def _client_handshake(ssock: ssl.SSLSocket, deadline: float | None, where: str, timeout: float | None) -> None:
    while True:
        try:
            ssock.do_handshake()
            return
        except ssl.SSLWantReadError:
            events = _POLLIN
        except ssl.SSLWantWriteError:
            events = _POLLOUT
        except (ssl.SSLError, OSError) as exc:
            raise HandshakeError(f"TLS handshake with {where} failed: {_tls_failure(exc)}") from exc
        if not _poll(ssock.fileno(), events, deadline):
            raise HandshakeTimeout(f"TLS handshake with {where} did not finish within {timeout} s")


# ------------------------------------------------------------------ listener


class TcpListener(Listener):
    """A listening TCP socket (blocking accept), optionally TLS.

    Several threads may call :meth:`accept` at once; :meth:`close` from
    another thread wakes them (TransportError).
    """

    def __init__(
        self, sock: socket.socket, ssl_context: ssl.SSLContext | None, tls_handshake_timeout: float
    ) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        host, port = sock.getsockname()[:2]
        self._address = format_address(host, port)
        self._ctx = ssl_context
        self._tls_timeout = tls_handshake_timeout
        self._accept_lock = threading.Lock()  # one TLS acceptor drives the handshakes
        self._state = threading.Lock()
        self._closed = False
        # fd -> [ssl socket, deadline, events to wait for, peer name]
        self._handshaking: dict[int, list[Any]] = {}
        self._ready: deque[TlsStream] = deque()

    @property
    def address(self) -> str:
        return self._address

    def _closed_error(self) -> TransportError:
        return TransportError(f"accept on {self._address}: the listener is closed")

    def _accept_one(self) -> socket.socket | None:
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except ConnectionAbortedError:
            return None  # the peer gave up while queued
        except OSError as exc:
            if self._closed:
                raise self._closed_error() from exc
            raise TransportError(f"accept on {self._address}: {exc}") from exc
        _nodelay(conn)
        return conn

    def accept(self, timeout: float | None = None) -> Stream:
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._ctx is None:
            while True:
                if self._closed:
                    raise self._closed_error()
                conn = self._accept_one()
                if conn is not None:
                    return TcpStream(conn)
                if not _poll(self._fd, _POLLIN, deadline):
                    raise TimeoutError(f"no connection to {self._address} within {timeout} s")
        with self._accept_lock:
            return self._accept_tls(deadline, timeout)

    def _accept_tls(self, deadline: float | None, timeout: float | None) -> Stream:
        assert self._ctx is not None
        while True:
            with self._state:
                if self._closed:
                    raise self._closed_error()
                if self._ready:
                    return self._ready.popleft()
                self._expire(time.monotonic())
                poller = _poller()
                if len(self._handshaking) < MAX_TLS_HANDSHAKES:
                    poller.register(self._fd, _POLLIN)
                wake = deadline
                for fd, entry in self._handshaking.items():
                    poller.register(fd, entry[2])
                    wake = entry[1] if wake is None else min(wake, entry[1])
            wait = None if wake is None else max(0.0, wake - time.monotonic())
            ready = poller.poll(None if wait is None else wait * 1000)
            with self._state:
                if self._closed:
                    raise self._closed_error()
                for fd, _mask in ready:
                    if fd == self._fd:
                        self._start_handshakes()
                    elif fd in self._handshaking:
                        self._step(fd)
                if self._ready:
                    return self._ready.popleft()
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"no connection to {self._address} within {timeout} s")

    def _start_handshakes(self) -> None:
        assert self._ctx is not None
        while len(self._handshaking) < MAX_TLS_HANDSHAKES:
            conn = self._accept_one()
            if conn is None:
                return
            peer = _peer_name(conn)
            conn.setblocking(False)
            try:
                ssock = self._ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            except (ssl.SSLError, OSError) as exc:
                conn.close()
                log.warning("TLS setup for %s failed: %s", peer, exc)
                continue
            fd = ssock.fileno()
            self._handshaking[fd] = [ssock, time.monotonic() + self._tls_timeout, _POLLIN, peer]
            self._step(fd)

    def _step(self, fd: int) -> None:
        entry = self._handshaking[fd]
        ssock, peer = entry[0], entry[3]
        try:
            ssock.do_handshake()
        except ssl.SSLWantReadError:
            entry[2] = _POLLIN
        except ssl.SSLWantWriteError:
            entry[2] = _POLLOUT
        except (ssl.SSLError, OSError) as exc:
            del self._handshaking[fd]
            ssock.close()
            log.warning("TLS handshake with %s failed: %s", peer, _tls_failure(exc))
        else:
            del self._handshaking[fd]
            self._ready.append(TlsStream(ssock, peer))

    def _expire(self, now: float) -> None:
        for fd, entry in list(self._handshaking.items()):
            if entry[1] <= now:
                del self._handshaking[fd]
                entry[0].close()
                log.warning(
                    "TLS handshake with %s did not finish within %s s; dropped", entry[3], self._tls_timeout
                )

    def close(self) -> None:
        with self._state:
            if self._closed:
                return
            self._closed = True
            pending = [e[0] for e in self._handshaking.values()] + list(self._ready)
            self._handshaking.clear()
            self._ready.clear()
        for obj in pending:
            obj.close()
        try:
            # shutdown wakes threads blocked in poll/accept; close alone would not.
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


# ---------------------------------------------------------------------- trio


class AsyncTlsStream(AsyncStream):
    """A trio stream over TLS (trio.SSLStream). The handshake runs on first
    use and is bounded by ``handshake_timeout`` (HandshakeTimeout)."""

    transport_name = "tcp"
    can_send_handles = False
    trusted = False

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None,
        handshake_timeout: float,
        peer: str,
    ) -> None:
        import trio

        self._tcp = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._ssl = trio.SSLStream(
            self._tcp,
            context,
            server_side=server_side,
            server_hostname=server_hostname,
            # Like the blocking side: an EOF without close_notify is an EOF
            # (the framing above detects a cut inside a frame).
            https_compatible=True,
        )
        self._timeout = handshake_timeout
        self._peer = peer
        self._handshaken = False

    @property
    def ssl_stream(self) -> Any:
        return self._ssl

    async def do_handshake(self) -> None:
        """Finish the TLS handshake (idempotent; safe from several tasks)."""
        import trio

        if self._handshaken:
            return
        try:
            with trio.fail_after(self._timeout):
                await self._ssl.do_handshake()
        except trio.TooSlowError:
            self.close_nowait()
            raise HandshakeTimeout(
                f"TLS handshake with {self._peer} did not finish within {self._timeout} s"
            ) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            cause = exc.__cause__ or exc
            log.warning("TLS handshake with %s failed: %s", self._peer, _tls_failure(cause))
            raise HandshakeError(f"TLS handshake with {self._peer} failed: {_tls_failure(cause)}") from exc
        self._handshaken = True

    async def send(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> int:
        import trio

        if fds:
            raise HandleError(_NO_HANDLES)
        await self.do_handshake()
        try:
            await self._ssl.send_all(data)
        except trio.ClosedResourceError as exc:
            raise ChannelClosed("tcp: the stream is closed") from exc
        except trio.BrokenResourceError as exc:
            raise ChannelClosed(f"tcp: peer closed the connection ({exc.__cause__ or exc})") from exc
        return len(data)

    async def receive(self, max_bytes: int, max_fds: int) -> tuple[bytes, list[int]]:
        import trio

        await self.do_handshake()
        try:
            return bytes(await self._ssl.receive_some(max_bytes)), []
        except trio.ClosedResourceError as exc:
            raise ChannelClosed("tcp: the stream is closed") from exc
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__
            if isinstance(cause, (ConnectionResetError, BrokenPipeError)):
                return b"", []  # a reset reads as an end of stream, as on the blocking side
            raise TransportError(f"tcp: {_tls_failure(cause or exc)}") from exc

    async def aclose(self) -> None:
        import trio

        # close_notify is a courtesy: never wait long on a peer for it.
        with trio.move_on_after(1.0):
            try:
                await self._ssl.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        self.close_nowait()
        await trio.lowlevel.checkpoint()

    def close_nowait(self) -> None:
        self._tcp.socket.close()

    def describe_peer(self) -> str:
        return self._peer + " (TLS)"


class _AsyncTcpStream(AsyncSocketStream):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, name="tcp")
        self._peer = _peer_name(sock)

    async def send(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> int:
        if fds:
            raise HandleError(_NO_HANDLES)
        return await super().send(data)

    def describe_peer(self) -> str:
        return self._peer


class AsyncTcpListener(AsyncListener):
    """A listening TCP socket for trio (TLS handshakes run on first use)."""

    def __init__(
        self, sock: socket.socket, ssl_context: ssl.SSLContext | None, tls_handshake_timeout: float
    ) -> None:
        import trio

        self._tsock: Any = trio.socket.from_stdlib_socket(sock)
        host, port = sock.getsockname()[:2]
        self._address = format_address(host, port)
        self._ctx = ssl_context
        self._tls_timeout = tls_handshake_timeout

    @property
    def address(self) -> str:
        return self._address

    async def accept(self) -> AsyncStream:
        while True:
            try:
                tconn, _ = await self._tsock.accept()
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                raise TransportError(f"accept on {self._address}: {exc}") from exc
            conn = socket.socket(fileno=tconn.detach())
            _nodelay(conn)
            if self._ctx is None:
                return _AsyncTcpStream(conn)
            return AsyncTlsStream(
                conn,
                self._ctx,
                server_side=True,
                server_hostname=None,
                handshake_timeout=self._tls_timeout,
                peer=_peer_name(conn),
            )

    async def aclose(self) -> None:
        import trio

        self._tsock.close()
        await trio.lowlevel.checkpoint()


# ----------------------------------------------------------------- transport


def _check_context(ssl_context: Any, *, server: bool) -> None:
    if ssl_context is None:
        return
    if not isinstance(ssl_context, ssl.SSLContext):
        raise TypeError(f"ssl_context must be an ssl.SSLContext, not {type(ssl_context).__name__}")
    if server and ssl_context.protocol == ssl.PROTOCOL_TLS_CLIENT:
        raise ValueError(
            "listen() needs a server-side context: ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) or "
            "ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), with load_cert_chain()"
        )
    if not server and ssl_context.protocol == ssl.PROTOCOL_TLS_SERVER:
        raise ValueError(
            "connect() needs a client-side context: ssl.create_default_context(cafile=...)"
        )


def _bind(host: str, port: int, backlog: int, reuse_address: bool) -> socket.socket:
    errors = []
    for family, type_, proto, _, sockaddr in _resolve(host, port, passive=True):
        sock = socket.socket(family, type_, proto)
        try:
            if reuse_address and hasattr(socket, "SO_REUSEADDR") and not hasattr(socket, "SO_EXCLUSIVEADDRUSE"):
                # POSIX: rebind at once after a restart (TIME_WAIT); Windows'
                # SO_REUSEADDR means something else (port stealing).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            errors.append(exc)
            continue
        return sock
    raise TransportError(f"cannot listen on {format_address(host, port)}: {errors[-1] if errors else 'no address'}")


def _connect(host: str, port: int, timeout: float | None) -> socket.socket:
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise TransportError(f"cannot connect to {format_address(host, port)}: {exc}") from exc
    sock.settimeout(None)
    _nodelay(sock)
    return sock


class TcpTransport(Transport):
    """``tcp://host:port``; ``tcp://[v6addr]:port``. Port 0 picks a free port
    (``listener.address`` has the real one).

    listen options: ``ssl_context`` (server side), ``backlog``,
    ``tls_handshake_timeout`` (seconds, default 10), ``reuse_address``
    (default True). connect options: ``timeout`` (connect plus TLS
    handshake, default 10 s), ``ssl_context`` (client side),
    ``server_hostname`` (what the server certificate must name; default the
    URL's host).
    """

    scheme = "tcp"
    can_send_handles = False
    #: The channel layer refuses a TCP channel without authkey (see
    #: ``ipcbus.listen``), except on loopback with allow_unauthenticated=True.
    requires_auth = True

    def is_loopback(self, address: str) -> bool:
        """True if every address ``address``'s host resolves to is loopback."""
        host, port = parse_address(address)
        infos = _resolve(host, port, passive=False)
        try:
            return bool(infos) and all(
                ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos
            )
        except ValueError:
            return False

    def connect(
        self,
        address: str,
        *,
        timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> Stream:
        host, port = parse_address(address)
        _check_context(ssl_context, server=False)
        deadline = None if timeout is None else time.monotonic() + timeout
        sock = _connect(host, port, timeout)
        if ssl_context is None:
            return TcpStream(sock)
        peer = _peer_name(sock)
        sock.setblocking(False)
        try:
            ssock = ssl_context.wrap_socket(
                sock, server_hostname=server_hostname or host, do_handshake_on_connect=False
            )
        except (ssl.SSLError, OSError, ValueError) as exc:
            sock.close()
            raise TransportError(f"TLS setup for {format_address(host, port)} failed: {exc}") from exc
        try:
            _client_handshake(ssock, deadline, format_address(host, port), timeout)
        except BaseException:
            ssock.close()
            raise
        return TlsStream(ssock, peer)

    def listen(
        self,
        address: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = DEFAULT_BACKLOG,
        tls_handshake_timeout: float = DEFAULT_TLS_HANDSHAKE_TIMEOUT,
        reuse_address: bool = True,
    ) -> Listener:
        host, port = parse_address(address)
        _check_context(ssl_context, server=True)
        return TcpListener(_bind(host, port, backlog, reuse_address), ssl_context, tls_handshake_timeout)

    async def connect_async(
        self,
        address: str,
        *,
        timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> AsyncStream:
        import trio

        host, port = parse_address(address)
        _check_context(ssl_context, server=False)
        where = format_address(host, port)
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise TransportError(f"cannot resolve tcp host {host!r}: {exc}") from exc
        errors: list[BaseException] = []
        sock: socket.socket | None = None
        with trio.move_on_after(float("inf") if timeout is None else timeout) as scope:
            for family, type_, proto, _, sockaddr in infos:
                tsock = trio.socket.socket(family, type_, proto)
                try:
                    await tsock.connect(sockaddr)
                except OSError as exc:
                    tsock.close()
                    errors.append(exc)
                    continue
                except BaseException:
                    tsock.close()
                    raise
                sock = socket.socket(fileno=tsock.detach())
                break
        if sock is None:
            reason: Any = errors[-1] if errors else "no address"
            if scope.cancelled_caught:
                reason = f"no answer within {timeout} s"
            raise TransportError(f"cannot connect to {where}: {reason}")
        _nodelay(sock)
        if ssl_context is None:
            return _AsyncTcpStream(sock)
        stream = AsyncTlsStream(
            sock,
            ssl_context,
            server_side=False,
            server_hostname=server_hostname or host,
            handshake_timeout=DEFAULT_TLS_HANDSHAKE_TIMEOUT if timeout is None else timeout,
            peer=_peer_name(sock),
        )
        try:
            await stream.do_handshake()  # errors (a distrusted server) surface at connect
        except BaseException:
            stream.close_nowait()
            raise
        return stream

    async def listen_async(
        self,
        address: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = DEFAULT_BACKLOG,
        tls_handshake_timeout: float = DEFAULT_TLS_HANDSHAKE_TIMEOUT,
        reuse_address: bool = True,
    ) -> AsyncListener:
        host, port = parse_address(address)
        _check_context(ssl_context, server=True)
        return AsyncTcpListener(_bind(host, port, backlog, reuse_address), ssl_context, tls_handshake_timeout)
