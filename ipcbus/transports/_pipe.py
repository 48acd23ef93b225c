"""``pipe://name``: Windows named pipes (``\\\\.\\pipe\\name``), with overlapped I/O.

The blocking streams drive ``_winapi`` overlapped reads and writes; the trio
streams use trio's IOCP primitives (``register_with_iocp``,
``readinto_overlapped``, ``write_overlapped``, ``WaitForSingleObject``).
Both carry the same native protocol as every other transport.

A named pipe cannot carry handles beside the bytes, so the pipe is a
sequence of *records* (docs/PROTOCOL.md §8): ``u8 tag, u32 length, body``.
A data record (tag 0) is a piece of the protocol byte stream; a handle
record (tag 1) holds the handles (``socket.share`` blobs, or handle values
duplicated into the receiving process: ipcbus/_winhandles.py) that ride
with the first byte of the next data record, as SCM_RIGHTS fds ride with
the first byte of their frame on POSIX.

Security: a listener's first instance is created with
FILE_FLAG_FIRST_PIPE_INSTANCE (nobody can have squatted the name), every
instance with PIPE_REJECT_REMOTE_CLIENTS and a DACL granting access to the
current user only (the default DACL would also let Everyone read), and at
most ``max_instances`` instances exist at once. Clients open the pipe with
SECURITY_IDENTIFICATION, so a server cannot impersonate them.

Importable everywhere (the scheme is registered on every platform); opening
anything needs Windows and raises TransportError elsewhere.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from .._errors import ChannelClosed, HandleError, ProtocolError, TransportError
from ._base import AsyncListener, AsyncStream, Listener, Stream, Transport

__all__ = [
    "AsyncPipeListener",
    "AsyncPipeStream",
    "PipeListener",
    "PipeStream",
    "PipeTransport",
    "pipe_pair",
]

PIPE_PREFIX = "\\\\.\\pipe\\"
RECORD = struct.Struct(">BI")
TAG_DATA = 0
TAG_HANDLES = 1
# A handle record holds at most SCM_MAX_FD entries of at most 4 KiB each.
MAX_HANDLE_RECORD = 1 + 253 * (5 + 4096)
BUFSIZE = 64 * 1024
# The pipe's buffer quota: about what a Unix socket buffers, so that a burst sent
# before the peer reads does not block the sender.
PIPE_BUFFER = 1024 * 1024
DEFAULT_MAX_INSTANCES = 64
DEFAULT_CONNECT_TIMEOUT = 10.0

# Win32 error codes and flags _winapi does not name (or names late).
ERROR_FILE_NOT_FOUND = 2
ERROR_ACCESS_DENIED = 5
ERROR_HANDLE_EOF = 38
ERROR_NETNAME_DELETED = 64
ERROR_BROKEN_PIPE = 109
ERROR_SEM_TIMEOUT = 121
ERROR_PIPE_BUSY = 231
ERROR_NO_DATA = 232
ERROR_PIPE_NOT_CONNECTED = 233
ERROR_PIPE_CONNECTED = 535
ERROR_OPERATION_ABORTED = 995
ERROR_IO_PENDING = 997
_GONE = {ERROR_BROKEN_PIPE, ERROR_NO_DATA, ERROR_PIPE_NOT_CONNECTED, ERROR_HANDLE_EOF, ERROR_NETNAME_DELETED}
PIPE_REJECT_REMOTE_CLIENTS = 0x8
SECURITY_SQOS_PRESENT = 0x00100000
SECURITY_IDENTIFICATION = 0x00010000
WAIT_OBJECT_0 = 0
WAIT_TIMEOUT = 0x102
INFINITE = 0xFFFFFFFF


def _need_windows() -> None:
    if sys.platform != "win32":
        raise TransportError("pipe:// (Windows named pipes) is available only on Windows")


def pipe_path(address: str) -> str:
    """``name`` (or a full ``\\\\.\\pipe\\name``) → the pipe's Win32 path."""
    if address.lower().startswith(PIPE_PREFIX):
        address = address[len(PIPE_PREFIX) :]
    if not address:
        raise TransportError("pipe URL needs a name: pipe://myapp-bus")
    if len(address) > 240:
        raise TransportError(f"pipe name of {len(address)} characters; the limit is 240 (256 with the prefix)")
    return PIPE_PREFIX + address


def _winerror(exc: OSError) -> int:
    return getattr(exc, "winerror", None) or 0


def _translate(exc: OSError, what: str) -> Exception:
    if _winerror(exc) in _GONE:
        return ChannelClosed(f"pipe: the peer closed the pipe ({what}: {exc})")
    return TransportError(f"pipe: {what} failed: {exc}")


# ------------------------------------------------------------------ records


def build_records(data: bytes | bytearray | memoryview, fds: Sequence[int], peer_pid: int | None) -> bytes:
    """The bytes to write for ``data`` (and ``fds``, riding on its first byte)."""
    head = b""
    if fds:
        if peer_pid is None:
            raise HandleError(
                "pipe: the peer's pid is not known yet (it comes with its hello): "
                "call wait_handshake() before sending handles"
            )
        from .._winhandles import export

        body = export(data, list(fds), peer_pid)
        head = RECORD.pack(TAG_HANDLES, len(body)) + body
    return head + RECORD.pack(TAG_DATA, len(data)) + bytes(data)


class RecordReader:
    """Turns the records read from a pipe back into (bytes, fds) chunks, each
    chunk starting where its handles ride (sans-IO; shared by both streams)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._left = 0  # bytes still to come in the current data record
        self._fds: list[int] = []  # adopted, waiting for the next data byte

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk

    def take(self, max_bytes: int, max_fds: int) -> tuple[bytes, list[int]] | None:
        """The next chunk of protocol bytes and its handles; None when the
        buffer holds no complete piece. ProtocolError for bytes that are not
        records; HandleError for a bad handle record."""
        buf = self._buf
        pos = 0
        out = bytearray()
        fds: list[int] = []
        try:
            while len(out) < max_bytes:
                if self._left:
                    n = min(self._left, len(buf) - pos, max_bytes - len(out))
                    if n == 0:
                        break
                    if self._fds:
                        if out:
                            break  # these handles ride with the next chunk's first byte
                        fds, self._fds = self._fds, []
                    out += buf[pos : pos + n]
                    pos += n
                    self._left -= n
                    continue
                if len(buf) - pos < RECORD.size:
                    break
                tag, length = RECORD.unpack_from(buf, pos)
                if tag == TAG_DATA:
                    if length == 0:
                        raise ProtocolError("pipe: empty data record")
                    self._left = length
                    pos += RECORD.size
                elif tag == TAG_HANDLES:
                    if self._fds:
                        raise ProtocolError("pipe: two handle records with no data between them")
                    if length > MAX_HANDLE_RECORD:
                        raise ProtocolError(f"pipe: handle record of {length} bytes (limit {MAX_HANDLE_RECORD})")
                    if len(buf) - pos < RECORD.size + length:
                        break
                    from .._winhandles import adopt

                    body = bytes(buf[pos + RECORD.size : pos + RECORD.size + length])
                    pos += RECORD.size + length
                    self._fds = adopt(body, max_fds)
                else:
                    raise ProtocolError(
                        f"pipe: record tag {tag:#04x} is neither data (0) nor handles (1): "
                        "the peer does not speak ipcbus over pipes"
                    )
        finally:
            del buf[:pos]
        if out:
            return bytes(out), fds
        return None

    def at_eof(self) -> list[int]:
        """Check the end of the stream: ProtocolError inside a record; else
        the handles that never got their data byte (the core reports them)."""
        if self._buf or self._left:
            raise ProtocolError(
                f"pipe: EOF inside a record ({len(self._buf)} bytes buffered, {self._left} missing)"
            )
        fds, self._fds = self._fds, []
        return fds

    def discard(self) -> None:
        """Close handles adopted but never handed out."""
        fds, self._fds = self._fds, []
        if fds:
            from .._winhandles import close_received

            for fd in fds:
                close_received(fd)


# ---------------------------------------------------------------- security

_sa_lock = threading.Lock()
_sa_cache: list[Any] = []


def _security_attributes() -> int:
    """Address of a SECURITY_ATTRIBUTES whose DACL grants the current user
    (only) full access; built once per process and kept for its lifetime."""
    with _sa_lock:
        if _sa_cache:
            return int(_sa_cache[0])
        import ctypes
        from ctypes import wintypes

        advapi32 = ctypes.WinDLL("advapi32", use_last_error=True)
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.GetCurrentProcess.restype = wintypes.HANDLE
        kernel32.LocalFree.argtypes = [ctypes.c_void_p]
        advapi32.OpenProcessToken.argtypes = [wintypes.HANDLE, wintypes.DWORD, ctypes.POINTER(wintypes.HANDLE)]
        advapi32.GetTokenInformation.argtypes = [
            wintypes.HANDLE, ctypes.c_int, ctypes.c_void_p, wintypes.DWORD, ctypes.POINTER(wintypes.DWORD)]
        advapi32.ConvertSidToStringSidW.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_wchar_p)]
        advapi32.ConvertStringSecurityDescriptorToSecurityDescriptorW.argtypes = [
            wintypes.LPCWSTR, wintypes.DWORD, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]

        def fail(what: str) -> TransportError:
            return TransportError(f"pipe: cannot build the pipe's security descriptor ({what}: "
                                  f"{ctypes.FormatError(ctypes.get_last_error())})")

        token = wintypes.HANDLE()
        if not advapi32.OpenProcessToken(kernel32.GetCurrentProcess(), 0x0008, ctypes.byref(token)):
            raise fail("OpenProcessToken")
        try:
            size = wintypes.DWORD()
            advapi32.GetTokenInformation(token, 1, None, 0, ctypes.byref(size))  # TokenUser
            buf = ctypes.create_string_buffer(size.value or 256)
            if not advapi32.GetTokenInformation(token, 1, buf, len(buf), ctypes.byref(size)):
                raise fail("GetTokenInformation")
        finally:
            kernel32.CloseHandle(token)
        sid_ptr = ctypes.c_void_p.from_buffer(buf).value  # TOKEN_USER.User.Sid
        sid_str = ctypes.c_wchar_p()
        if not advapi32.ConvertSidToStringSidW(sid_ptr, ctypes.byref(sid_str)):
            raise fail("ConvertSidToStringSid")
        sid = sid_str.value
        kernel32.LocalFree(sid_str)
        # Protected DACL, one ACE: generic-all for this user. No Everyone read.
        sddl = f"D:P(A;;GA;;;{sid})"
        sd = ctypes.c_void_p()
        if not advapi32.ConvertStringSecurityDescriptorToSecurityDescriptorW(sddl, 1, ctypes.byref(sd), None):
            raise fail("ConvertStringSecurityDescriptorToSecurityDescriptor")

        class SECURITY_ATTRIBUTES(ctypes.Structure):
            _fields_ = [("nLength", wintypes.DWORD), ("lpSecurityDescriptor", ctypes.c_void_p),
                        ("bInheritHandle", wintypes.BOOL)]

        sa = SECURITY_ATTRIBUTES(ctypes.sizeof(SECURITY_ATTRIBUTES), sd, False)
        _sa_cache.extend([ctypes.addressof(sa), sa, sd, sddl])
        return int(_sa_cache[0])


def _create_instance(path: str, *, first: bool, max_instances: int) -> int:
    import _winapi

    open_mode = _winapi.PIPE_ACCESS_DUPLEX | _winapi.FILE_FLAG_OVERLAPPED
    if first:
        open_mode |= _winapi.FILE_FLAG_FIRST_PIPE_INSTANCE
    # PIPE_TYPE_BYTE and PIPE_READMODE_BYTE are 0: a byte stream, like a socket.
    pipe_mode = _winapi.PIPE_WAIT | PIPE_REJECT_REMOTE_CLIENTS
    return _winapi.CreateNamedPipe(
        path, open_mode, pipe_mode, max_instances, PIPE_BUFFER, PIPE_BUFFER,
        _winapi.NMPWAIT_WAIT_FOREVER, _security_attributes(),
    )


def _open_client(path: str, timeout: float | None) -> int:
    import _winapi

    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            return _winapi.CreateFile(
                path,
                _winapi.GENERIC_READ | _winapi.GENERIC_WRITE,
                0,
                _winapi.NULL,
                _winapi.OPEN_EXISTING,
                _winapi.FILE_FLAG_OVERLAPPED | SECURITY_SQOS_PRESENT | SECURITY_IDENTIFICATION,
                _winapi.NULL,
            )
        except OSError as exc:
            err = _winerror(exc)
            if err == ERROR_FILE_NOT_FOUND:
                raise TransportError(f"pipe: nobody listens on {path}") from exc
            if err != ERROR_PIPE_BUSY:
                raise TransportError(f"pipe: cannot open {path}: {exc}") from exc
        # Every instance is taken: wait for the listener to offer another.
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TransportError(f"pipe: {path} stayed busy for {timeout:g} s")
        try:
            _winapi.WaitNamedPipe(path, 1000 if left is None else max(1, min(1000, int(left * 1000))))
        except OSError as exc:
            if _winerror(exc) not in (ERROR_SEM_TIMEOUT, ERROR_FILE_NOT_FOUND, ERROR_PIPE_BUSY):
                raise TransportError(f"pipe: cannot open {path}: {exc}") from exc


def _os_peer_pid(handle: int, server_end: bool) -> int | None:
    # The other end's pid as the kernel knows it (a fallback for handle
    # passing before the peer's hello was read).
    try:
        import ctypes
        from ctypes import wintypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        fn = kernel32.GetNamedPipeClientProcessId if server_end else kernel32.GetNamedPipeServerProcessId
        fn.argtypes = [wintypes.HANDLE, ctypes.POINTER(wintypes.ULONG)]
        pid = wintypes.ULONG()
        if fn(handle, ctypes.byref(pid)) and pid.value:
            return int(pid.value)
    except (OSError, AttributeError, ImportError):
        pass
    return None


def pipe_pair(*, inheritable_second: bool = False) -> tuple[int, int]:
    """Two connected overlapped pipe handles (server end, client end), the
    pipe made under a random name with one instance only. With
    ``inheritable_second`` the client end can be inherited by a child."""
    _need_windows()
    import _winapi

    path = pipe_path(f"ipcbus-{os.getpid()}-{os.urandom(8).hex()}")
    server = _create_instance(path, first=True, max_instances=1)
    try:
        client = _open_client(path, 5.0)
        try:
            ov = _winapi.ConnectNamedPipe(server, overlapped=True)
            _, err = ov.GetOverlappedResult(True)
            if err:
                raise TransportError(f"pipe: ConnectNamedPipe failed with error {err}")
            if inheritable_second:
                proc = _winapi.GetCurrentProcess()
                dup = _winapi.DuplicateHandle(proc, client, proc, 0, True, _winapi.DUPLICATE_SAME_ACCESS)
                _winapi.CloseHandle(client)
                client = dup
        except BaseException:
            _winapi.CloseHandle(client)
            raise
    except BaseException:
        _winapi.CloseHandle(server)
        raise
    return server, client


class _PipeEnd:
    """What both pipe streams share: the handle, the record reader, and where
    the peer's pid comes from: given (pair, fork), the handshake (the core a
    channel binds), or the kernel."""

    _core: Any = None
    transport_name: str

    def __init__(
        self,
        handle: int,
        *,
        name: str = "pipe",
        trusted: bool = False,
        peer_pid: int | None = None,
        server_end: bool = False,
    ) -> None:
        _need_windows()
        self._h = handle
        self.transport_name = name
        self.trusted = trusted
        self._peer_pid = peer_pid
        self._server_end = server_end
        self._reader = RecordReader()
        self._eof = False
        self._closed = False

    def bind_core(self, core: Any) -> None:
        """Called by the channel: the peer's hello names its pid."""
        self._core = core

    @property
    def peer_pid(self) -> int | None:
        if self._peer_pid is not None:
            return self._peer_pid
        peer = getattr(self._core, "peer", None)
        if peer is not None and peer.peer_pid:
            return int(peer.peer_pid)
        return _os_peer_pid(self._h, self._server_end)

    def describe_peer(self) -> str:
        return f"{self.transport_name} (pid {self.peer_pid})"


# ------------------------------------------------------------- blocking side


class _WriteIssuer:
    """Issues WriteFile calls for threads that may exit before the write
    completes: Windows cancels a thread's pending I/O on a handle without a
    completion port when that thread exits, so a non-blocking write left
    pending by a short-lived thread would be lost. One long-lived thread
    issues those writes instead; the caller still waits on the write's event.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Any = None

    def issue(self, winapi: Any, handle: int, buf: bytes) -> tuple[Any, int]:
        import queue

        with self._lock:
            if self._requests is None:
                self._requests = queue.SimpleQueue()
                threading.Thread(target=self._run, name="ipcbus-pipe-writes", daemon=True).start()
        done: Any = queue.SimpleQueue()
        self._requests.put((winapi, handle, buf, done))
        ok, result = done.get()
        if not ok:
            raise result
        return result

    def _run(self) -> None:
        while True:
            winapi, handle, buf, done = self._requests.get()
            try:
                done.put((True, winapi.WriteFile(handle, buf, overlapped=True)))
            except OSError as exc:
                done.put((False, exc))


_write_issuer = _WriteIssuer()


def _issue_write(winapi: Any, handle: int, buf: bytes) -> tuple[Any, int]:
    # The main thread outlives every write it starts; other threads hand the
    # call to the issuer thread.
    if threading.current_thread() is threading.main_thread():
        return winapi.WriteFile(handle, buf, overlapped=True)
    return _write_issuer.issue(winapi, handle, buf)


class PipeStream(_PipeEnd, Stream):
    """A connected pipe handle, blocking (overlapped I/O under the hood)."""

    can_send_handles = True

    def __init__(self, handle: int, **options: Any) -> None:
        super().__init__(handle, **options)
        import _winapi

        self._winapi = _winapi
        self._rov: Any = None  # a read left pending by a timeout
        self._wov: Any = None  # a write left pending by block=False
        self._wdata: bytes | None = None  # its data bytes (without the records' framing)
        self._close_lock = threading.Lock()

    def _wait(self, event: int, timeout: float | None) -> bool:
        ms = INFINITE if timeout is None else max(0, int(timeout * 1000))
        # close() cancels pending I/O, which signals its event: a waiter
        # wakes up and finds the stream closed.
        res = self._winapi.WaitForSingleObject(event, ms)
        if self._closed:
            raise ChannelClosed("pipe: the stream was closed")
        return res == WAIT_OBJECT_0

    def send(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = (), *, block: bool = True) -> int:
        # A pipe has no non-blocking write: a WriteFile that does not fit the
        # pipe's buffer goes pending, and cancelling it is no way back (the
        # reader may be consuming it). So a non-blocking send whose write goes
        # pending leaves it pending and reports 0 bytes sent, as a full socket
        # would; the caller, told nothing went out, sends the same bytes again
        # (once wait_writable says so), and that send returns the pending
        # write's count instead of writing them twice.
        if self._closed:
            raise ChannelClosed("pipe: send on a closed stream")
        if not data:
            return 0
        if self._wov is not None:
            pending = self._wdata
            if pending is None or bytes(data[: len(pending)]) != pending:
                raise TransportError("pipe: a send after a pending write must start with that write's bytes")
            if not self._finish_write(block):
                return 0
            return len(pending)
        buf = build_records(data, fds, self.peer_pid if fds else None)
        try:
            ov, err = _issue_write(self._winapi, self._h, buf)
        except OSError as exc:
            raise _translate(exc, "write") from exc
        self._wov = ov
        if err == ERROR_IO_PENDING and not block:
            self._wdata = bytes(data)
            return 0
        self._finish_write(True)
        return len(data)

    def _finish_write(self, block: bool) -> bool:
        ov = self._wov
        if not block and not self._wait(ov.event, 0):
            return False
        while not self._wait(ov.event, None if block else 0):
            pass
        self._wov = self._wdata = None
        try:
            _, err = ov.GetOverlappedResult(True)
        except OSError as exc:
            raise _translate(exc, "write") from exc
        if err:
            raise _translate(OSError(0, f"error {err}", None, err), "write")
        return True

    def wait_writable(self, timeout: float | None) -> bool:
        if self._wov is None:
            return True
        return self._wait(self._wov.event, timeout)

    def receive(self, max_bytes: int, max_fds: int, timeout: float | None = None) -> tuple[bytes, list[int]]:
        if self._closed:
            raise ChannelClosed("pipe: receive on a closed stream")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            got = self._reader.take(max_bytes, max_fds)
            if got is not None:
                return got
            if self._eof:
                return b"", self._reader.at_eof()
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            chunk = self._read_chunk(max(max_bytes, BUFSIZE), left)
            if chunk:
                self._reader.feed(chunk)
            else:
                self._eof = True

    def _read_chunk(self, size: int, timeout: float | None) -> bytes:
        winapi = self._winapi
        if self._rov is None:
            try:
                ov, err = winapi.ReadFile(self._h, size, overlapped=True)
            except OSError as exc:
                if _winerror(exc) in _GONE:
                    return b""
                raise _translate(exc, "read") from exc
            self._rov = ov
        ov = self._rov
        if not self._wait(ov.event, timeout):
            raise TimeoutError("pipe: nothing to read within the timeout")
        self._rov = None
        try:
            _, err = ov.GetOverlappedResult(True)
        except OSError as exc:
            if _winerror(exc) in _GONE:
                return b""
            raise _translate(exc, "read") from exc
        if err in _GONE:
            return b""
        if err:
            raise TransportError(f"pipe: read failed with error {err}")
        return bytes(ov.getbuffer())

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        winapi = self._winapi
        for ov in (self._rov, self._wov):
            if ov is not None:
                try:
                    ov.cancel()
                except OSError:
                    pass
                try:
                    ov.GetOverlappedResult(True)
                except OSError:
                    pass
        self._rov = self._wov = None
        self._reader.discard()
        winapi.CloseHandle(self._h)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and hasattr(self, "_close_lock"):
            self.close()


def _connect_instance(h: int, path: str) -> Any:
    """Start ConnectNamedPipe on a waiting instance: its overlapped object,
    or None when a client connected and closed its end before we asked
    (ERROR_NO_DATA; a socket listener would hand out a connection at EOF)."""
    import _winapi

    try:
        return _winapi.ConnectNamedPipe(h, overlapped=True)
    except OSError as exc:
        if _winerror(exc) == ERROR_NO_DATA:
            return None
        raise TransportError(f"pipe: accepting on {path} failed: {exc}") from exc


class PipeListener(Listener):
    """A named pipe's server side: one waiting instance at a time, at most
    ``max_instances`` in all."""

    def __init__(self, address: str, *, max_instances: int = DEFAULT_MAX_INSTANCES) -> None:
        _need_windows()
        import _winapi

        if not 1 <= max_instances <= 254:
            raise ValueError(f"max_instances must be in 1..254, not {max_instances}")
        self._winapi = _winapi
        if not address:
            address = f"ipcbus-{os.getpid()}-{os.urandom(6).hex()}"
        self._path = pipe_path(address)
        self._name = self._path[len(PIPE_PREFIX) :]
        self._max = max_instances
        self._closed = False
        self._lock = threading.Lock()
        try:
            self._next: int | None = _create_instance(self._path, first=True, max_instances=max_instances)
        except OSError as exc:
            if _winerror(exc) in (ERROR_ACCESS_DENIED, ERROR_PIPE_BUSY):
                raise TransportError(f"pipe: {self._path} exists already (another listener has it)") from exc
            raise TransportError(f"pipe: cannot create {self._path}: {exc}") from exc

    @property
    def address(self) -> str:
        return f"pipe://{self._name}"

    def _instance(self, deadline: float | None) -> int:
        while True:
            if self._closed:
                raise TransportError("pipe: the listener is closed")
            if self._next is not None:
                return self._next
            try:
                self._next = _create_instance(self._path, first=False, max_instances=self._max)
                continue
            except OSError as exc:
                if _winerror(exc) != ERROR_PIPE_BUSY:
                    raise TransportError(f"pipe: cannot create an instance of {self._path}: {exc}") from exc
            # max_instances connections are open: wait for one to end.
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"pipe: all {self._max} instances of {self._path} are in use")
            time.sleep(0.05)

    def accept(self, timeout: float | None = None) -> Stream:
        winapi = self._winapi
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            h = self._instance(deadline)
            ov = _connect_instance(h, self._path)
            if ov is None:  # the client came and left already: its stream reads EOF
                self._next = None
                return PipeStream(h, name="pipe", server_end=True)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ms = INFINITE if left is None else int(left * 1000)
            res = winapi.WaitForSingleObject(ov.event, ms)
            if res != WAIT_OBJECT_0:
                ov.cancel()
            try:
                _, err = ov.GetOverlappedResult(True)
            except OSError as exc:
                err = _winerror(exc) or -1
            if err == ERROR_OPERATION_ABORTED:
                raise TimeoutError(f"pipe: no client on {self._path} within the timeout")
            if err:
                # This instance is broken (the client left at once): drop it.
                self._next = None
                winapi.CloseHandle(h)
                raise TransportError(f"pipe: accepting on {self._path} failed with error {err}")
            self._next = None
            try:
                self._instance(0.0)  # one attempt: when all are busy, the next accept waits
            except (TimeoutError, TransportError):
                pass  # offered again at the next accept
        return PipeStream(h, name="pipe", server_end=True)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._next is not None:
                self._winapi.CloseHandle(self._next)
                self._next = None


# ----------------------------------------------------------------- trio side


class AsyncPipeStream(_PipeEnd, AsyncStream):
    """A connected pipe handle driven by trio's IOCP loop."""

    can_send_handles = True

    def __init__(self, handle: int, **options: Any) -> None:
        super().__init__(handle, **options)
        import trio

        self._trio = trio
        trio.lowlevel.register_with_iocp(handle)

    async def send(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> int:
        trio = self._trio
        if self._closed:
            raise ChannelClosed("pipe: send on a closed stream")
        buf = memoryview(build_records(data, fds, self.peer_pid if fds else None))
        try:
            while buf:
                n = await trio.lowlevel.write_overlapped(self._h, buf)
                buf = buf[n:]
        except trio.ClosedResourceError as exc:
            raise ChannelClosed("pipe: the stream was closed") from exc
        except OSError as exc:
            raise _translate(exc, "write") from exc
        return len(data)

    async def receive(self, max_bytes: int, max_fds: int) -> tuple[bytes, list[int]]:
        trio = self._trio
        while True:
            if self._closed:
                raise ChannelClosed("pipe: receive on a closed stream")
            got = self._reader.take(max_bytes, max_fds)
            if got is not None:
                await trio.lowlevel.checkpoint()
                return got
            if self._eof:
                await trio.lowlevel.checkpoint()
                return b"", self._reader.at_eof()
            buf = bytearray(max(max_bytes, BUFSIZE))
            try:
                n = await trio.lowlevel.readinto_overlapped(self._h, buf)
            except trio.ClosedResourceError as exc:
                raise ChannelClosed("pipe: the stream was closed") from exc
            except OSError as exc:
                if _winerror(exc) in _GONE:
                    n = 0
                else:
                    raise _translate(exc, "read") from exc
            if n:
                self._reader.feed(bytes(buf[:n]))
            else:
                self._eof = True

    def close_nowait(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._reader.discard()
        import _winapi

        # Pending overlapped operations on the handle end with
        # ERROR_OPERATION_ABORTED: trio raises ClosedResourceError in them.
        _winapi.CloseHandle(self._h)

    async def aclose(self) -> None:
        self.close_nowait()
        await self._trio.lowlevel.checkpoint()


class AsyncPipeListener(AsyncListener):
    """The trio counterpart of :class:`PipeListener`."""

    def __init__(self, address: str, *, max_instances: int = DEFAULT_MAX_INSTANCES) -> None:
        self._sync = PipeListener(address, max_instances=max_instances)

    @property
    def address(self) -> str:
        return self._sync.address

    async def accept(self) -> AsyncStream:
        import _winapi

        import trio

        sync = self._sync
        while True:
            try:
                h = sync._instance(time.monotonic())
                break
            except TimeoutError:
                await trio.sleep(0.05)
        ov = _connect_instance(h, sync._path)
        if ov is None:  # the client came and left already: its stream reads EOF
            sync._next = None
            return AsyncPipeStream(h, name="pipe", server_end=True)
        try:
            await trio.lowlevel.WaitForSingleObject(ov.event)
        except BaseException:
            ov.cancel()
            try:
                ov.GetOverlappedResult(True)
            except OSError:
                pass
            raise
        try:
            _, err = ov.GetOverlappedResult(True)
        except OSError as exc:
            err = _winerror(exc) or -1
        sync._next = None
        if err:
            _winapi.CloseHandle(h)
            raise TransportError(f"pipe: accepting on {sync._path} failed with error {err}")
        try:
            sync._instance(0.0)
        except (TimeoutError, TransportError):
            pass
        return AsyncPipeStream(h, name="pipe", server_end=True)

    async def aclose(self) -> None:
        import trio

        self._sync.close()
        await trio.lowlevel.checkpoint()


# ----------------------------------------------------------------- transport


class PipeTransport(Transport):
    """``pipe://name``: Windows named pipes, handles included.

    ``listen`` takes ``max_instances`` (default 64: connections open at once,
    plus the one waiting); ``pipe://`` with no name picks a random one.
    ``connect`` takes ``timeout`` (seconds to wait while every instance is
    busy, default 10).
    """

    scheme = "pipe"
    can_send_handles = sys.platform == "win32"

    def connect(self, address: str, *, timeout: float | None = DEFAULT_CONNECT_TIMEOUT) -> Stream:
        _need_windows()
        return PipeStream(_open_client(pipe_path(address), timeout), name="pipe")

    def listen(self, address: str, *, max_instances: int = DEFAULT_MAX_INSTANCES) -> Listener:
        _need_windows()
        return PipeListener(address, max_instances=max_instances)

    async def connect_async(self, address: str, *, timeout: float | None = DEFAULT_CONNECT_TIMEOUT) -> AsyncStream:
        _need_windows()
        import trio

        path = pipe_path(address)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # Not WaitNamedPipe: it would block the trio thread.
            try:
                h = _open_client(path, 0.0)
                break
            except TransportError:
                if not _pipe_busy(path) or (deadline is not None and time.monotonic() >= deadline):
                    raise
            await trio.sleep(0.02)
        return AsyncPipeStream(h, name="pipe")

    async def listen_async(self, address: str, *, max_instances: int = DEFAULT_MAX_INSTANCES) -> AsyncListener:
        _need_windows()
        return AsyncPipeListener(address, max_instances=max_instances)


def _pipe_busy(path: str) -> bool:
    import _winapi

    try:
        _winapi.WaitNamedPipe(path, 1)
    except OSError as exc:
        return _winerror(exc) in (ERROR_SEM_TIMEOUT, ERROR_PIPE_BUSY)
    return True


def pipe_pair_streams(*, trio: bool = False) -> tuple[Any, Any]:
    """Two connected pipe streams in this process (what ``pair()`` uses on
    Windows): trusted, and the peer's pid is ours."""
    server, client = pipe_pair()
    cls: Any = AsyncPipeStream if trio else PipeStream
    ends: list[Any] = []
    try:
        for h, server_end in ((server, True), (client, False)):
            ends.append(cls(h, name="pipepair", trusted=True, peer_pid=os.getpid(), server_end=server_end))
    except BaseException:
        import _winapi

        for h in (server, client)[len(ends):]:
            _winapi.CloseHandle(h)
        for end in ends:
            end.close() if not trio else end.close_nowait()
        raise
    return ends[0], ends[1]


def open_channel_pair(cls: Any, codec: Any, options: dict[str, Any], *, trio: bool = False) -> tuple[Any, Any]:
    """``pair()`` on Windows: channels of class ``cls`` over a pipe pair."""
    s1, s2 = pipe_pair_streams(trio=trio)
    first = None
    try:
        first = cls._open(s1, "peer", codec=codec, **options)
        return first, cls._open(s2, "peer", codec=codec, **options)
    except BaseException:
        if first is not None:
            first._teardown()
        for s in (s1, s2):
            s.close_nowait() if trio else s.close()
        raise
