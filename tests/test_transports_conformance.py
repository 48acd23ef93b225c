"""Every built-in transport's streams pass ipcbus.testing.check_transport,
and the checker itself catches broken streams."""

from __future__ import annotations

import os
import socket
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

import ipcbus
from ipcbus.testing import check_transport
from ipcbus.transports import FdTransport, MemoryTransport, SocketStream, Stream, UnixAbstractTransport, UnixTransport
from ipcbus.transports._memory import memory_stream_pair

SIZE = 1 << 20


def _socketpair() -> tuple[Stream, Stream]:
    a, b = socket.socketpair()
    return SocketStream(a, name="socketpair", trusted=True), SocketStream(b, name="socketpair", trusted=True)


def _fd() -> tuple[Stream, Stream]:
    # What a child does with an inherited end: fd://N adopts the fd.
    a, b = socket.socketpair()
    fd_transport = FdTransport()
    return fd_transport.connect(str(a.detach())), fd_transport.connect(str(b.detach()))


@pytest.fixture
def listeners() -> Iterator[list[object]]:
    made: list[object] = []
    yield made
    for listener in made:
        listener.close()  # type: ignore[attr-defined]


def _via_listener(transport: object, address: str, made: list[object]) -> Callable[[], tuple[Stream, Stream]]:
    listener = transport.listen(address)  # type: ignore[attr-defined]
    made.append(listener)

    def make() -> tuple[Stream, Stream]:
        client = transport.connect(address)  # type: ignore[attr-defined]
        return client, listener.accept(timeout=10)

    return make


def test_socketpair() -> None:
    check_transport(_socketpair, size=SIZE)


@pytest.mark.posix("fd://N adopts a socket by its POSIX fd number")
def test_fd() -> None:
    check_transport(_fd, size=SIZE, seed=1)


@pytest.mark.posix("Unix sockets")
def test_unix(tmp_path: Path, listeners: list[object]) -> None:
    check_transport(_via_listener(UnixTransport(), str(tmp_path / "c.sock"), listeners), size=SIZE, seed=2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract unix sockets need Linux")
def test_unix_abstract(listeners: list[object]) -> None:
    name = f"ipcbus-conf-{uuid.uuid4().hex}"
    check_transport(_via_listener(UnixAbstractTransport(), name, listeners), size=SIZE, seed=3)


def test_memory_pair() -> None:
    check_transport(memory_stream_pair, size=SIZE, seed=4)


def test_memory_listener(listeners: list[object]) -> None:
    check_transport(_via_listener(MemoryTransport(), f"conf-{uuid.uuid4().hex}", listeners), size=SIZE, seed=5)


def test_memory_channels_in_threads() -> None:
    # The memory transport under real channels, with a thread per side.
    with ipcbus.listen(f"memory://chan-{uuid.uuid4().hex}") as listener:

        def client() -> None:
            with ipcbus.connect(listener.address) as ch:
                for i in range(20_000):
                    ch.send(i)

        t = threading.Thread(target=client)
        t.start()
        with listener.accept(timeout=10) as ch:
            got = [m.data for m in ch]
        t.join(10)
    assert got == list(range(20_000))


# --------------------------------------------------- the checker can fail


class _Lossy(Stream):
    """Wraps a stream and breaks one rule."""

    def __init__(self, inner: Stream, fault: str) -> None:
        self._inner = inner
        self._fault = fault
        self.can_send_handles = inner.can_send_handles
        self._closed = False

    def send(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = (), *, block: bool = True) -> int:
        if self._fault == "no-closed-error" and self._closed:
            return len(data)
        if self._fault == "drops-bytes" and len(data) > 1:
            self._inner.send(bytes(data)[:-1], fds, block=True)
            return len(data)
        return self._inner.send(data, fds, block=block)

    def receive(self, max_bytes: int, max_fds: int, timeout: float | None = None) -> tuple[bytes, list[int]]:
        data, fds = self._inner.receive(max_bytes, max_fds, timeout)
        if self._fault == "no-eof" and not data:
            raise TimeoutError("pretends nothing happened")
        return data, fds

    def shutdown_write(self) -> None:
        self._inner.shutdown_write()

    def close(self) -> None:
        self._closed = True
        self._inner.close()


@pytest.mark.parametrize("fault, match", [("drops-bytes", "EOF after"),
                                          ("no-eof", "no EOF"),
                                          ("no-closed-error", "ChannelClosed")])
def test_check_transport_catches_a_broken_stream(fault: str, match: str) -> None:
    def make() -> tuple[Stream, Stream]:
        a, b = _socketpair()
        return _Lossy(a, fault), _Lossy(b, fault)

    with pytest.raises(AssertionError, match=match):
        check_transport(make, size=100_000)


def test_check_transport_refuses_a_bad_factory() -> None:
    with pytest.raises(AssertionError, match="two Streams"):
        check_transport(lambda: (1, 2))  # type: ignore[arg-type,return-value]


def test_no_fds_left_behind_by_the_checker() -> None:
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    check_transport(_socketpair, size=10_000)
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) == before
