"""Handles: OS resources sent with a message, and their 4-byte descriptors.

A descriptor says what kind of resource an fd is, so that the receiver can
rebuild the right Python object and check that the fd really is that kind
before trusting it (PROTOCOL.md §5):

    byte 0  kind     1 socket, 2 file object, 3 bare fd (Handle)
    byte 1  socket: family (1 AF_UNIX, 2 AF_INET, 3 AF_INET6); file: mode bits
    byte 2  socket: type (1 SOCK_STREAM, 2 SOCK_DGRAM, 3 SOCK_SEQPACKET)
    byte 3  socket: 1 if listening, else 0

Kind 4 is a socket received from Node.js (ipcbus/_node_protocol.py), whose
envelope names only a class ("net.Socket"): family and type are taken from
the fd itself, and byte 1 says what the envelope requires of it (1 listening
stream, 2 connected stream, 3 any stream, 4 datagram); for a datagram, byte 2
is the family the envelope's dgramType implies (0: AF_INET or AF_INET6).
"""

from __future__ import annotations

import _socket
import errno
import io
import os
import socket
import stat
import sys
import warnings
from types import TracebackType
from typing import Any

from ._errors import HandleError

__all__ = ["Handle"]

KIND_SOCKET = 1
KIND_FILE = 2
KIND_FD = 3
KIND_NODE_SOCKET = 4

_FAMILIES = {getattr(socket, "AF_UNIX", -1): 1, socket.AF_INET: 2, socket.AF_INET6: 3}
_FAMILY_CODES = {code: fam for fam, code in _FAMILIES.items() if fam != -1}
_TYPES = {socket.SOCK_STREAM: 1, socket.SOCK_DGRAM: 2, getattr(socket, "SOCK_SEQPACKET", -1): 3}
_TYPE_CODES = {code: typ for typ, code in _TYPES.items() if typ != -1}

_FD_DESC = bytes([KIND_FD, 0, 0, 0])

# socket.socket's family and type properties convert the C values to enums in
# Python (about 0.7 us each, a measurable share of a passed socket): read the
# C attributes of _socket.socket underneath them instead.
_raw_family = _socket.socket.__dict__["family"].__get__
_raw_type = _socket.socket.__dict__["type"].__get__

_MODE_READ = 1
_MODE_WRITE = 2
_MODE_APPEND = 4
_MODE_BINARY = 8
_MODE_PLUS = 16


class Handle:
    """An owned file descriptor of any kind: a pipe end, a device, an fd you
    got from elsewhere. Send it with ``channel.send(data, handle=Handle(fd))``;
    a received fd that is neither a socket nor a file object arrives as one.

    The Handle owns its fd: ``close()`` (or leaving a ``with`` block) closes
    it; ``detach()`` gives the fd up without closing it.
    """

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        if not isinstance(fd, int) or fd < 0:
            raise ValueError(f"not a file descriptor: {fd!r}")
        self._fd = fd

    def fileno(self) -> int:
        """The fd; ValueError once closed or detached."""
        if self._fd < 0:
            raise ValueError("Handle is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def detach(self) -> int:
        """Return the fd and stop owning it."""
        fd = self.fileno()
        self._fd = -1
        return fd

    def close(self) -> None:
        """Close the fd (idempotent)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Handle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            self.close()

    def __repr__(self) -> str:
        return f"<ipcbus.Handle fd={self._fd}>" if self._fd >= 0 else "<ipcbus.Handle closed>"


def _file_mode_bits(mode: str) -> int:
    bits = 0
    if "r" in mode:
        bits |= _MODE_READ
    if "w" in mode or "x" in mode:
        bits |= _MODE_WRITE
    if "a" in mode:
        bits |= _MODE_APPEND | _MODE_WRITE
    if "+" in mode:
        bits |= _MODE_PLUS
    if "b" in mode:
        bits |= _MODE_BINARY
    return bits


def _file_mode(bits: int) -> str:
    if bits & _MODE_APPEND:
        mode = "a"
    elif bits & _MODE_READ:
        mode = "r"
    else:
        mode = "w"
    if bits & _MODE_PLUS:
        mode += "+"
    if bits & _MODE_BINARY:
        mode += "b"
    return mode


def describe(obj: Any) -> tuple[bytes, int]:
    """The descriptor and fd for an object the user wants to send.

    Accepts a ``socket.socket``, a ``Handle``, or a file object with a real
    fd (``fileno()``). Anything else is a HandleError.
    """
    if type(obj) is Handle:  # the cheapest kind first
        return _FD_DESC, obj.fileno()
    if isinstance(obj, socket.socket):
        fd = obj.fileno()
        if fd < 0:
            raise HandleError(f"cannot send a closed socket: {obj!r}")
        fam = _FAMILIES.get(_raw_family(obj))
        typ = _TYPES.get(_raw_type(obj))
        if fam is None or typ is None:
            raise HandleError(f"cannot send a socket of family {obj.family!r} and type {obj.type!r}")
        listening = 0
        if typ in (1, 3):
            try:
                listening = 1 if obj.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) else 0
            except OSError:
                listening = 0
        return bytes([KIND_SOCKET, fam, typ, listening]), fd
    if isinstance(obj, Handle):
        return _FD_DESC, obj.fileno()
    if isinstance(obj, io.IOBase) or hasattr(obj, "fileno"):
        try:
            fd = obj.fileno()
        except (OSError, ValueError, io.UnsupportedOperation) as exc:
            raise HandleError(f"{obj!r} has no usable file descriptor: {exc}") from exc
        mode = getattr(obj, "mode", None)
        if not isinstance(mode, str):
            raise HandleError(f"cannot send {obj!r}: wrap its fd in ipcbus.Handle")
        if hasattr(obj, "flush"):
            obj.flush()  # what was written through the buffer belongs to the fd
        return bytes([KIND_FILE, _file_mode_bits(mode), 0, 0]), fd
    if isinstance(obj, int):
        raise HandleError("a bare int is ambiguous: send ipcbus.Handle(fd) to pass an fd")
    raise HandleError(f"not a handle ipcbus can send: {type(obj).__name__}")


def restore(desc: bytes, fd: int) -> Any:
    """Build the object for a received fd, after checking that it is what the
    descriptor says. On any mismatch the fd is closed and HandleError raised.
    """
    try:
        return _restore(desc, fd)
    except HandleError:
        _close_quietly(fd)
        raise
    except OSError as exc:
        _close_quietly(fd)
        raise HandleError(f"received fd could not be checked: {exc}") from exc


def _restore(desc: bytes, fd: int) -> Any:
    # Each kind is checked with the fewest system calls that prove it (a
    # passed handle costs only a handful, so one more is a measurable share):
    # a bare fd claims nothing, so there is nothing to check; a socket is
    # proved by the getsockopt calls socket.socket(fileno=) makes anyway
    # (ENOTSOCK for anything else); fstat only where it decides.
    kind = desc[0]
    if kind == KIND_FD:
        return Handle(fd)
    if sys.platform == "win32" and kind == KIND_SOCKET:  # Windows: a SOCKET, not a CRT fd
        family = _FAMILY_CODES.get(desc[1])
        typ = _TYPE_CODES.get(desc[2])
        if family is None or typ is None:
            raise HandleError(f"unknown socket descriptor {desc.hex()}")
        from ._winhandles import restore_socket

        return restore_socket(desc, fd, family, typ)
    if kind == KIND_SOCKET:
        family = _FAMILY_CODES.get(desc[1])
        typ = _TYPE_CODES.get(desc[2])
        if family is None or typ is None:
            raise HandleError(f"unknown socket descriptor {desc.hex()}")
        try:
            sock = socket.socket(fileno=fd)  # the kernel tells family and type
        except OSError as exc:
            if exc.errno != errno.ENOTSOCK:
                raise
            raise HandleError(f"declared a socket, but the fd is {_kind_name(os.fstat(fd).st_mode)}") from None
        try:
            if _raw_family(sock) != family or _raw_type(sock) != typ:
                raise HandleError(
                    f"declared {family.name}/{typ.name}, got {sock.family.name}/{sock.type.name}"
                )
            if typ != socket.SOCK_DGRAM:
                listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                if bool(listening) != bool(desc[3]):
                    said = "listening" if desc[3] else "not listening"
                    raise HandleError(f"declared {said}, but the socket is the other")
            if not os.get_blocking(fd):
                # O_NONBLOCK belongs to the open file both copies share (the
                # sender made it non-blocking: a timeout, trio): say so,
                # rather than let accept()/recv() raise BlockingIOError on a
                # socket that claims to block. Clearing it would change the
                # sender's copy under it.
                sock.setblocking(False)
        except BaseException:
            sock.detach()
            raise
        return sock
    st = os.fstat(fd)
    if kind == KIND_FILE:
        if stat.S_ISSOCK(st.st_mode) or stat.S_ISDIR(st.st_mode):
            raise HandleError(f"declared a file, but the fd is {_kind_name(st.st_mode)}")
        mode = _file_mode(desc[1])
        return open(fd, mode, closefd=True)
    if kind == KIND_NODE_SOCKET:
        if not stat.S_ISSOCK(st.st_mode):
            raise HandleError(f"Node sent a socket handle, but the fd is {_kind_name(st.st_mode)}")
        return _restore_node_socket(desc, fd)
    raise HandleError(f"unknown handle kind {kind}")


_NODE_REQUIREMENTS = {
    1: "a listening stream socket (net.Server)",
    2: "a connected stream socket (net.Socket)",
    3: "a stream socket (net.Native)",
    4: "an IP datagram socket (dgram)",
}


def _restore_node_socket(desc: bytes, fd: int) -> socket.socket:
    req = desc[1]
    wanted = _NODE_REQUIREMENTS.get(req)
    if wanted is None:
        raise HandleError(f"unknown Node socket descriptor {desc.hex()}")
    sock = socket.socket(fileno=fd)  # the kernel tells family and type
    try:
        family, typ = sock.family, sock.type
        if req == 4:
            families = (_FAMILY_CODES[desc[2]],) if desc[2] in _FAMILY_CODES else (
                socket.AF_INET, socket.AF_INET6)
            ok = typ == socket.SOCK_DGRAM and family in families
        else:
            ok = typ == socket.SOCK_STREAM and family in _FAMILY_CODES.values()
            if ok and req != 3:
                listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
                ok = listening == (req == 1)
        if not ok:
            raise HandleError(
                f"the envelope promised {wanted}, but the fd is a "
                f"{getattr(family, 'name', family)}/{getattr(typ, 'name', typ)} socket"
            )
        if req == 2:
            # Node detached its copy of a net.Socket when it sent it: ours
            # alone, so it becomes an ordinary blocking socket.
            sock.setblocking(True)
        elif not os.get_blocking(fd):
            # Node keeps its copy of servers and UDP sockets, and libuv needs
            # them non-blocking (O_NONBLOCK is shared by both copies). Python
            # would otherwise believe the socket blocking and raise
            # BlockingIOError from accept(): say non-blocking, and let the
            # user pick a timeout (settimeout keeps O_NONBLOCK set).
            sock.setblocking(False)
    except BaseException:
        sock.detach()
        raise
    return sock


def _kind_name(mode: int) -> str:
    for test, name in (
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISFIFO, "a pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return name
    return "of another kind"


def _close_quietly(fd: int) -> None:
    if sys.platform == "win32":  # a received SOCKET needs closesocket
        from ._winhandles import close_received

        close_received(fd)
        return
    try:
        os.close(fd)
    except OSError:
        pass


def close_fds(fds: list[int]) -> None:
    """Close received fds nobody will own (after an error, or on close)."""
    for fd in fds:
        _close_quietly(fd)
