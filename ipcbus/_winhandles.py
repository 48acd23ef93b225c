"""Windows handle passing: how a handle crosses a named pipe (PROTOCOL.md §8).

Windows has no SCM_RIGHTS. The sender makes the resource usable in the
receiving process itself, from the peer's pid, and the pipe transport
carries the result in a *handle record* just before the data record that
holds the frame (ipcbus/transports/_pipe.py):

- a socket goes as the ``WSAPROTOCOL_INFOW`` blob of ``socket.share(pid)``
  (WSADuplicateSocket); the receiver calls ``socket.fromshare``;
- any other handle (a file, a pipe end, an ``ipcbus.Handle``) is duplicated
  into the receiver with ``DuplicateHandle``; the record carries the value
  the handle has *there*, and the receiver wraps it in a CRT fd.

On the receiving side the core sees ints, as on POSIX: a CRT fd for a
duplicated handle (so files and ``Handle`` work unchanged), a SOCKET value
for an adopted socket (remembered here, so that closing an unclaimed one
uses ``closesocket``). Every function here needs Windows; the module
imports everywhere so that the rest of the package can refer to it.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
from typing import Any

from ._errors import HandleError

__all__ = ["adopt", "close_received", "export", "restore_socket"]

# Entry kinds in a handle record.
ENTRY_SOCKET = 1  # WSAPROTOCOL_INFOW blob from socket.share(pid)
ENTRY_HANDLE = 2  # u64 HANDLE value, valid in the receiving process
_ENTRY = struct.Struct(">BI")
_HANDLE_VALUE = struct.Struct(">Q")
# A WSAPROTOCOL_INFOW is 628 bytes on x64; leave room, refuse the absurd.
MAX_ENTRY = 4096

# Where the handle descriptors sit in a handle-carrying frame: the 8-byte
# header, the "multi" byte, then one 4-byte descriptor per handle; byte 0 of
# a descriptor is its kind (ipcbus/_handles.py).
_FRAME_HEADER = 8
_KIND_SOCKET = 1

_lock = threading.Lock()
_adopted_sockets: set[int] = set()


def _check_windows() -> None:
    if sys.platform != "win32":
        raise HandleError("Windows handle passing needs Windows")


def export(segment: bytes | bytearray | memoryview, fds: list[int], peer_pid: int) -> bytes:
    """The body of a handle record for the frame starting ``segment``, whose
    ``fds`` (SOCKET values for sockets, CRT fds otherwise, in descriptor
    order) go to process ``peer_pid``. HandleError if one cannot go."""
    _check_windows()
    import _winapi
    import msvcrt

    head = bytes(segment[: _FRAME_HEADER + 1 + 4 * len(fds)])
    if len(head) < _FRAME_HEADER + 1 + 4 * len(fds) or head[5] != len(fds):
        raise HandleError(f"{len(fds)} handle(s) to send, but the segment is not their frame")
    body = bytearray([len(fds)])
    target = None
    try:
        for i, fd in enumerate(fds):
            kind = head[_FRAME_HEADER + 1 + 4 * i]
            if kind == _KIND_SOCKET:
                from ._handles import _FAMILY_CODES, _TYPE_CODES

                desc = head[_FRAME_HEADER + 1 + 4 * i : _FRAME_HEADER + 5 + 4 * i]
                family, typ = _FAMILY_CODES.get(desc[1]), _TYPE_CODES.get(desc[2])
                if family is None or typ is None:
                    raise HandleError(f"unknown socket descriptor {desc.hex()}")
                # Family and type given: nothing to ask the socket (an unbound
                # one cannot say).
                sock = socket.socket(family, typ, 0, fileno=fd)
                try:
                    blob = sock.share(peer_pid)
                except OSError as exc:
                    raise HandleError(f"socket.share(pid={peer_pid}) failed: {exc}") from exc
                finally:
                    sock.detach()  # the caller still owns its socket
                body += _ENTRY.pack(ENTRY_SOCKET, len(blob)) + blob
            else:
                try:
                    handle = msvcrt.get_osfhandle(fd)
                except OSError as exc:
                    raise HandleError(f"fd {fd} has no Windows handle: {exc}") from exc
                if target is None:
                    try:
                        target = _winapi.OpenProcess(_winapi.PROCESS_DUP_HANDLE, False, peer_pid)
                    except OSError as exc:
                        raise HandleError(f"cannot open the peer process {peer_pid}: {exc}") from exc
                try:
                    value = _winapi.DuplicateHandle(
                        _winapi.GetCurrentProcess(), handle, target, 0, False,
                        _winapi.DUPLICATE_SAME_ACCESS,
                    )
                except OSError as exc:
                    raise HandleError(f"DuplicateHandle into process {peer_pid} failed: {exc}") from exc
                body += _ENTRY.pack(ENTRY_HANDLE, _HANDLE_VALUE.size) + _HANDLE_VALUE.pack(value)
    finally:
        if target is not None:
            _winapi.CloseHandle(target)
    return bytes(body)


def adopt(body: bytes, max_fds: int) -> list[int]:
    """Take the handles a handle record's ``body`` names; returns ints the
    core treats as fds. HandleError (closing what was taken) if the record
    is malformed or names more than ``max_fds``."""
    _check_windows()
    import msvcrt

    if not body:
        raise HandleError("empty handle record")
    count = body[0]
    if count == 0 or count > max_fds:
        raise HandleError(f"handle record of {count} handle(s); the limit is {max_fds}")
    taken: list[int] = []
    pos = 1
    try:
        for _ in range(count):
            if len(body) < pos + _ENTRY.size:
                raise HandleError("truncated handle record")
            kind, length = _ENTRY.unpack_from(body, pos)
            pos += _ENTRY.size
            if length > MAX_ENTRY or len(body) < pos + length:
                raise HandleError(f"handle record entry of {length} bytes does not fit")
            data = body[pos : pos + length]
            pos += length
            if kind == ENTRY_SOCKET:
                try:
                    sock = socket.fromshare(data)
                except OSError as exc:
                    raise HandleError(f"socket.fromshare failed: {exc}") from exc
                fd = sock.detach()
                with _lock:
                    _adopted_sockets.add(fd)
                taken.append(fd)
            elif kind == ENTRY_HANDLE and length == _HANDLE_VALUE.size:
                (value,) = _HANDLE_VALUE.unpack(data)
                try:
                    taken.append(msvcrt.open_osfhandle(value, os.O_NOINHERIT))
                except OSError as exc:
                    raise HandleError(f"received handle {value:#x} is not usable: {exc}") from exc
            else:
                raise HandleError(f"unknown handle record entry (kind {kind}, {length} bytes)")
        if pos != len(body):
            raise HandleError(f"{len(body) - pos} stray byte(s) after the handle record")
    except BaseException:
        for fd in taken:
            close_received(fd)
        raise
    return taken


def close_received(fd: int) -> None:
    """Close a received fd nobody claimed (a socket with closesocket)."""
    with _lock:
        is_socket = fd in _adopted_sockets
        _adopted_sockets.discard(fd)
    try:
        if is_socket:
            socket.close(fd)
        else:
            os.close(fd)
    except OSError:
        pass


def restore_socket(desc: bytes, fd: int, family: Any, typ: Any) -> socket.socket:
    """The socket object for an adopted SOCKET ``fd``, checked against its
    descriptor (``family``/``typ`` decoded by ipcbus/_handles.py)."""
    with _lock:
        if fd not in _adopted_sockets:
            raise HandleError("declared a socket, but the handle did not arrive as one")
        _adopted_sockets.discard(fd)
    sock = socket.socket(family, typ, 0, fileno=fd)
    try:
        if sock.type != typ or sock.family != family:
            raise HandleError(
                f"declared {family.name}/{typ.name}, got {sock.family.name}/{sock.type.name}"
            )
        if typ != socket.SOCK_DGRAM:
            try:
                listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
            except OSError:
                listening = bool(desc[3])  # not every provider answers: trust the sender
            if listening != bool(desc[3]):
                said = "listening" if desc[3] else "not listening"
                raise HandleError(f"declared {said}, but the socket is the other")
    except BaseException:
        # Back to "received, unclaimed": the caller closes it with closesocket.
        with _lock:
            _adopted_sockets.add(sock.detach())
        raise
    return sock
