"""``memory://name``: an in-process transport for testing the protocol core.

It carries bytes only (no handles), between threads of one process. It is
not a stand-in for real transports in integration tests.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from .._errors import ChannelClosed, TransportError
from ._base import Listener, Stream, Transport

__all__ = ["MemoryTransport", "memory_stream_pair"]


class _Pipe:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.closed = False
        self.cond = threading.Condition()


class MemoryStream(Stream):
    """One end of an in-memory byte stream."""

    transport_name = "memory"
    can_send_handles = False

    def __init__(self, inbound: _Pipe, outbound: _Pipe, *, trusted: bool = True) -> None:
        self._in = inbound
        self._out = outbound
        self.trusted = trusted
        self._closed = False

    def send(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = (), *, block: bool = True) -> int:
        if fds:
            raise TransportError("the memory transport cannot carry fds")
        with self._out.cond:
            if self._closed or self._out.closed:
                raise ChannelClosed("memory: peer closed the stream")
            self._out.buf += data
            self._out.cond.notify_all()
        return len(data)

    def receive(self, max_bytes: int, max_fds: int, timeout: float | None = None) -> tuple[bytes, list[int]]:
        with self._in.cond:
            if not self._in.cond.wait_for(lambda: self._in.buf or self._in.closed, timeout):
                raise TimeoutError(f"memory: no data within {timeout} s")
            data = bytes(self._in.buf[:max_bytes])
            del self._in.buf[:max_bytes]
            return data, []

    def shutdown_write(self) -> None:
        with self._out.cond:
            self._out.closed = True
            self._out.cond.notify_all()

    def close(self) -> None:
        self._closed = True
        for pipe in (self._in, self._out):
            with pipe.cond:
                pipe.closed = True
                pipe.cond.notify_all()


def memory_stream_pair() -> tuple[MemoryStream, MemoryStream]:
    """Two connected in-memory streams."""
    a, b = _Pipe(), _Pipe()
    return MemoryStream(a, b), MemoryStream(b, a)


class MemoryListener(Listener):
    def __init__(self, transport: MemoryTransport, name: str) -> None:
        self._transport = transport
        self._name = name
        self._pending: list[MemoryStream] = []
        self._cond = threading.Condition()
        self._closed = False

    @property
    def address(self) -> str:
        return f"memory://{self._name}"

    def _offer(self, stream: MemoryStream) -> None:
        with self._cond:
            if self._closed:
                raise TransportError(f"nothing listens on memory://{self._name}")
            self._pending.append(stream)
            self._cond.notify_all()

    def accept(self, timeout: float | None = None) -> Stream:
        with self._cond:
            if not self._cond.wait_for(lambda: self._pending or self._closed, timeout):
                raise TimeoutError(f"no connection to {self.address} within {timeout} s")
            if self._closed:
                raise TransportError(f"{self.address} is closed")
            return self._pending.pop(0)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._transport._listeners.pop(self._name, None)


class MemoryTransport(Transport):
    """``memory://name``: listeners live in a per-process table."""

    scheme = "memory"
    can_send_handles = False

    def __init__(self) -> None:
        self._listeners: dict[str, MemoryListener] = {}
        self._lock = threading.Lock()

    def connect(self, address: str) -> Stream:
        with self._lock:
            listener = self._listeners.get(address)
        if listener is None:
            raise TransportError(f"nothing listens on memory://{address}")
        mine, theirs = memory_stream_pair()
        listener._offer(theirs)
        return mine

    def listen(self, address: str) -> Listener:
        with self._lock:
            if address in self._listeners:
                raise TransportError(f"memory://{address} is already in use")
            listener = MemoryListener(self, address)
            self._listeners[address] = listener
        return listener
