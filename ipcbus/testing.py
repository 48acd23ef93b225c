"""Test helpers for people who write transports.

:func:`check_transport` runs the conformance checks every blocking
:class:`~ipcbus.transports.Stream` must pass (in the spirit of
``trio.testing.check_two_way_stream``). Use it in your transport's tests::

    from ipcbus.testing import check_transport

    def test_my_transport():
        check_transport(lambda: my_transport_stream_pair())
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable, Sequence

from ._errors import ChannelClosed, IPCError
from .transports import Stream

__all__ = ["check_transport"]

StreamPairFactory = Callable[[], "tuple[Stream, Stream]"]

# Generous: a conformant transport answers in milliseconds; this only keeps
# a broken one from hanging the test run.
_TIMEOUT = 30.0


def check_transport(
    make_pair: StreamPairFactory,
    *,
    seed: int = 0,
    size: int = 1 << 20,
    max_chunk: int = 70_000,
) -> None:
    """Check that the streams ``make_pair()`` returns keep the Stream contract.

    ``make_pair`` is called several times; each call must return two fresh,
    connected blocking streams ``(a, b)`` (what ``a`` sends, ``b`` receives,
    and the other way round). check_transport closes every stream it gets.

    Checked, with ``random.Random(seed)`` choosing every chunk size, so that
    a failure can be replayed:

    - ``size`` bytes of random data go each way *at the same time* (two
      writer and two reader threads), written in chunks of 1..``max_chunk``
      bytes with ``send`` (handling short writes) and read with random
      ``max_bytes``; each side must receive exactly what the other sent, in
      order. ``send(..., block=False)`` must return a count in 0..len.
      When the writers are done, ``shutdown_write()`` is called on both
      streams (a no-op where the transport cannot half-close).
    - ``receive`` with a timeout and nothing to read raises TimeoutError.
    - EOF: after ``a.close()``, ``b`` receives what was sent before it, then
      ``b""``, and ``b""`` again on the next call.
    - ``send`` on a stream that was closed raises ChannelClosed; ``send`` to
      a peer that closed raises ChannelClosed (possibly after a few sends
      the kernel buffered); ``close`` is idempotent.
    - Handles: where ``can_send_handles`` is true, fds sent with a chunk
      arrive with it (with ``receive``), are new descriptors for the same
      open file, and are close-on-exec. Where it is false, ``send`` with
      fds raises an IPCError.

    Raises AssertionError naming the check that failed (other exceptions
    from the transport propagate as they are).
    """
    rng = random.Random(seed)
    _check_two_way(make_pair, rng, size, max_chunk)
    _check_timeout(make_pair)
    _check_eof(make_pair, rng)
    _check_closed_send(make_pair)
    _check_handles(make_pair)


# ----------------------------------------------------------------- helpers


def _pair(make_pair: StreamPairFactory) -> tuple[Stream, Stream]:
    pair = make_pair()
    if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(s, Stream) for s in pair)):
        raise AssertionError(f"make_pair() must return two Streams, not {pair!r}")
    return pair


def _send_all(stream: Stream, data: bytes | memoryview, fds: Sequence[int] = ()) -> None:
    view = memoryview(data)
    while view:
        n = stream.send(view, fds)
        if not 0 < n <= len(view):
            raise AssertionError(f"blocking send of {len(view)} bytes returned {n}")
        fds = ()
        view = view[n:]


def _recv_exactly(stream: Stream, n: int, rng: random.Random, max_chunk: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data, fds = stream.receive(rng.randint(1, max_chunk), 0, _TIMEOUT)
        if fds:
            raise AssertionError(f"{len(fds)} fd(s) arrived that nobody sent")
        if not data:
            raise AssertionError(f"EOF after {len(out)} of {n} bytes")
        out += data
    return bytes(out)


class _Worker(threading.Thread):
    def __init__(self, target: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self._fn = target
        self.result: object = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as exc:
            self.error = exc


def _join(workers: list[_Worker], what: str) -> None:
    for w in workers:
        w.join(_TIMEOUT)
        if w.is_alive():
            raise AssertionError(f"{what}: a thread did not finish within {_TIMEOUT} s (deadlock?)")
        if w.error is not None:
            raise w.error


# ------------------------------------------------------------------ checks


def _check_two_way(make_pair: StreamPairFactory, rng: random.Random, size: int, max_chunk: int) -> None:
    a, b = _pair(make_pair)
    try:
        payload = {a: rng.randbytes(size), b: rng.randbytes(size)}
        seeds = {s: rng.getrandbits(32) for s in (a, b)}

        def writer(stream: Stream) -> None:
            wrng = random.Random(seeds[stream])
            data = memoryview(payload[stream])
            pos = 0
            while pos < len(data):
                end = min(len(data), pos + wrng.randint(1, max_chunk))
                if wrng.random() < 0.1:
                    n = stream.send(data[pos:end], block=False)
                    if not 0 <= n <= end - pos:
                        raise AssertionError(f"send(block=False) of {end - pos} bytes returned {n}")
                    pos += n
                else:
                    _send_all(stream, data[pos:end])
                    pos = end

        def reader(stream: Stream, peer: Stream) -> bytes:
            return _recv_exactly(stream, size, random.Random(seeds[peer] + 1), max_chunk)

        workers = [_Worker(lambda: writer(a)), _Worker(lambda: writer(b)),
                   _Worker(lambda: reader(b, a)), _Worker(lambda: reader(a, b))]
        for w in workers:
            w.start()
        _join(workers[:2], "two-way transfer (writers)")
        # Half-close where the transport can, so that a reader missing
        # bytes sees EOF now rather than waiting out its timeout.
        a.shutdown_write()
        b.shutdown_write()
        _join(workers[2:], "two-way transfer (readers)")
        if workers[2].result != payload[a]:
            raise AssertionError(f"a -> b: {_diff(payload[a], workers[2].result)}")
        if workers[3].result != payload[b]:
            raise AssertionError(f"b -> a: {_diff(payload[b], workers[3].result)}")
    finally:
        a.close()
        b.close()


def _diff(sent: bytes, got: object) -> str:
    if not isinstance(got, bytes):
        return f"received {got!r}"
    for i, (x, y) in enumerate(zip(sent, got, strict=False)):
        if x != y:
            return f"received data differs from sent data at byte {i}"
    return f"sent {len(sent)} bytes, received {len(got)}"


def _check_timeout(make_pair: StreamPairFactory) -> None:
    a, b = _pair(make_pair)
    try:
        try:
            b.receive(100, 0, 0.05)
        except TimeoutError:
            pass
        else:
            raise AssertionError("receive(timeout=0.05) with nothing sent did not raise TimeoutError")
    finally:
        a.close()
        b.close()


def _check_eof(make_pair: StreamPairFactory, rng: random.Random) -> None:
    a, b = _pair(make_pair)
    try:
        tail = rng.randbytes(1000)
        _send_all(a, tail)
        a.close()
        if _recv_exactly(b, len(tail), rng, 300) != tail:
            raise AssertionError("data sent before close() was not received intact")
        for attempt in ("first", "second"):
            try:
                data, fds = b.receive(100, 0, _TIMEOUT)
            except TimeoutError:
                raise AssertionError(f"{attempt} receive after the peer closed: no EOF (b'')") from None
            if data != b"" or fds:
                raise AssertionError(f"{attempt} receive after the peer closed returned {data!r}, not b''")
    finally:
        a.close()
        b.close()
    a.close()  # idempotent
    b.close()


def _check_closed_send(make_pair: StreamPairFactory) -> None:
    a, b = _pair(make_pair)
    try:
        a.close()
        try:
            a.send(b"x")
        except ChannelClosed:
            pass
        else:
            raise AssertionError("send on a closed stream did not raise ChannelClosed")
        # The peer of a closed stream: the first sends may be buffered, but
        # not forever.
        for _ in range(1000):
            try:
                b.send(b"y" * 1000, block=False)
            except ChannelClosed:
                break
        else:
            raise AssertionError("send to a peer that closed never raised ChannelClosed")
    finally:
        a.close()
        b.close()


def _check_handles(make_pair: StreamPairFactory) -> None:
    a, b = _pair(make_pair)
    r, w = os.pipe()
    received: list[int] = []
    try:
        if not (a.can_send_handles and b.can_send_handles):
            try:
                a.send(b"h", [w])
            except IPCError:
                return
            raise AssertionError("send with fds on a stream that cannot carry handles did not raise IPCError")
        _send_all(a, b"one", [w])
        _send_all(a, b"two", [r, w, r])
        data = bytearray()
        while len(data) < 6:
            chunk, fds = b.receive(100, 253, _TIMEOUT)
            if not chunk:
                raise AssertionError("EOF while waiting for fds")
            data += chunk
            received += fds
        if bytes(data) != b"onetwo" or len(received) != 4:
            raise AssertionError(f"sent b'onetwo' with 4 fds, received {bytes(data)!r} with {len(received)}")
        if set(received) & {r, w}:
            raise AssertionError("received fds must be new descriptors")
        for fd in received:
            if os.get_inheritable(fd):
                raise AssertionError(f"received fd {fd} is not close-on-exec")
        os.write(received[0], b"via passed fd")  # the write end, as sent
        if os.read(r, 100) != b"via passed fd":
            raise AssertionError("the received fd is not the pipe that was sent")
        os.write(w, b"back")
        if os.read(received[1], 100) != b"back":
            raise AssertionError("the received read end is not the pipe that was sent")
    finally:
        for fd in (r, w, *received):
            try:
                os.close(fd)
            except OSError:
                pass
        a.close()
        b.close()
