"""The round trip: a reply written at once, and ``recv()`` reading the answer.

On Linux with the C accelerator, ``Channel.send``'s reply and ``recv()``'s
round-trip read run in C (``ipcbus._fastpath.ROUND_TRIP``); elsewhere, and
with ``IPCBUS_NO_SPEEDUPS=1`` (CI runs this file both ways), the Python
methods do. Every test here checks behaviour that must be the same either
way, through ``recv()`` with no timeout (the only call the C path takes),
against a peer that is a real channel or a raw socket speaking the wire
format byte by byte.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

import ipcbus
from ipcbus._fastpath import ACCELERATED, ROUND_TRIP
from ipcbus._protocol import FRAME, Connection
from ipcbus.codecs import get_codec

pytestmark = pytest.mark.posix("socketpair, SIGALRM")

try:
    from ipcbus import _speedups
except ImportError:
    _speedups = None


def hello(codec: str = "msgpack") -> bytes:
    """The hello a correct peer sends (made by the real core)."""
    seg = Connection(get_codec(codec), pid=4242, can_carry_handles=True).take_output()
    assert seg is not None
    return bytes(seg[0])


def frame(payload: bytes, ftype: int = 0, length: int | None = None, reserved: int = 0) -> bytes:
    return FRAME.pack(len(payload) if length is None else length, ftype, 0, reserved) + payload


def read_frames(raw: socket.socket, count: int) -> list[Any]:
    """``count`` DATA frames' msgpack values from ``raw`` (after the hello)."""
    buf = b""
    values = []
    while len(values) < count:
        while len(buf) < 8 or len(buf) < 8 + FRAME.unpack_from(buf)[0]:
            chunk = raw.recv(1 << 20)
            assert chunk, "EOF before the frames"
            buf += chunk
        length, ftype, nh, reserved = FRAME.unpack_from(buf)
        assert (ftype, nh, reserved) == (0, 0, 0)
        values.append(msgpack.unpackb(buf[8 : 8 + length]))
        buf = buf[8 + length :]
    assert not buf
    return values


@pytest.fixture
def raw_peer() -> Iterator[tuple[ipcbus.Channel, socket.socket]]:
    """A channel whose peer is a raw socket, past the handshake: the raw end
    sent a hello and one message, which the channel received, and read the
    channel's hello."""
    raw, theirs = socket.socketpair()
    raw.sendall(hello() + frame(msgpack.packb("first")))
    ch = ipcbus.connect(f"fd://{theirs.detach()}")
    try:
        assert ch.recv().data == "first"  # (not yet the round trip: the handshake's read)
        their_hello = hello()
        assert raw.recv(len(their_hello))[:4] == b"IPCB"
        yield ch, raw
    finally:
        ch.close()
        raw.close()


def counting(ch: ipcbus.Channel, name: str) -> list[int]:
    """Count calls of the channel's method ``name`` (as seen by both the
    Python code and the C round trip, which look it up on the instance)."""
    calls: list[int] = []
    method = getattr(ch, name)

    def counted(*args: Any) -> Any:
        calls.append(1)
        return method(*args)

    setattr(ch, name, counted)
    return calls


def echo(ch: ipcbus.Channel) -> threading.Thread:
    def run() -> None:
        for message in ch:
            ch.send(message.data, handle=message.handle)
            if message.handle is not None:
                message.handle.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_the_round_trip_is_in_c_exactly_where_it_can_be() -> None:
    assert ROUND_TRIP is (ACCELERATED and sys.platform == "linux")
    a, b = ipcbus.pair()
    with a, b:
        if not ROUND_TRIP:
            assert a._rt_fd == -1  # the Python methods never see it
            return
        # Every attribute the C code reads by name is the channel's or core's.
        owners = {"channel": a, "core": a._core}
        missing = [(owner, name) for owner, name in _speedups.ROUND_TRIP_NAMES if not hasattr(owners[owner], name)]
        assert not missing
        assert a._rt_fd == a._stream.fileno()
    assert a._rt_fd == -1  # cleared before the fd is closed


def test_a_round_trip_takes_the_c_path_where_there_is_one() -> None:
    a, b = ipcbus.pair()
    with a, b:
        thread = echo(b)
        a.send("hello")
        assert a.recv().data == "hello"  # (the handshake's reads)
        reads = counting(a, "_read_done")
        writes = counting(a, "_write_lone")
        for i in range(500):
            a.send({"i": i})
            assert a.recv() == ({"i": i}, None)
        if ROUND_TRIP:
            # Every reply and every answer in C; none through the methods.
            assert (len(reads), len(writes)) == (0, 0)
        else:
            assert len(reads) == 500 and len(writes) == 500
        a.close()
        thread.join(10)


@pytest.mark.parametrize("codec", ["msgpack", "json", "raw", "pickle"])
def test_round_trips_between_processes_for_each_codec(codec: str) -> None:
    a, b = ipcbus.pair(codec=codec)
    values: list[Any] = [b"x" * 100, b"", b"y" * 60_000] if codec == "raw" else [{"i": 1}, [1, "a"], "x" * 60_000, 0]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            a.close()
            for message in b:
                b.send(message.data)
            status = 0
        finally:
            os._exit(status)
    b.close()
    with a:
        for _ in range(50):
            for value in values:
                a.send(value)
                assert a.recv().data == value
    _, status = os.waitpid(pid, 0)
    assert status == 0


def test_a_reply_is_one_frame_on_the_wire(raw_peer: tuple[ipcbus.Channel, socket.socket]) -> None:
    ch, raw = raw_peer
    for i in range(20):
        ch.send({"answer": i})  # a reply: written at once
        assert read_frames(raw, 1) == [{"answer": i}]
        raw.sendall(frame(msgpack.packb(i)))
        assert ch.recv().data == i


def test_internal_messages_in_a_round_trip_go_to_their_callback(
    raw_peer: tuple[ipcbus.Channel, socket.socket],
) -> None:
    ch, raw = raw_peer
    notes: list[Any] = []
    ch.on_internal("APP_", notes.append)
    # Each alone in its read (the later one sent once recv is waiting): a
    # lone frame that is internal.
    raw.sendall(frame(msgpack.packb({"cmd": "APP_note", "n": 1})))
    threading.Timer(0.1, lambda: raw.sendall(frame(msgpack.packb({"cmd": "APX_not claimed"})))).start()
    assert ch.recv().data == {"cmd": "APX_not claimed"}
    assert notes == [({"cmd": "APP_note", "n": 1}, None)]
    raw.sendall(frame(msgpack.packb({"cmd": "IPCBUS_FROM_A_LATER_VERSION"})))
    threading.Timer(0.1, lambda: raw.sendall(frame(msgpack.packb("after")))).start()
    assert ch.recv().data == "after"  # the library's own prefix never reaches recv()
    assert len(notes) == 1


def test_two_frames_in_one_read_both_arrive(raw_peer: tuple[ipcbus.Channel, socket.socket]) -> None:
    ch, raw = raw_peer
    raw.sendall(frame(msgpack.packb("one")) + frame(msgpack.packb("two")))
    assert [ch.recv().data, ch.recv().data] == ["one", "two"]
    data = frame(msgpack.packb("split across reads"))
    raw.sendall(data[:10])  # a frame in two reads: the first is not one whole frame
    threading.Timer(0.05, lambda: raw.sendall(data[10:])).start()
    assert ch.recv().data == "split across reads"
    raw.sendall(frame(msgpack.packb("next")))
    assert ch.recv().data == "next"


BAD_FRAMES: dict[str, tuple[bytes, type[ipcbus.IPCError], str]] = {
    "undecodable": (frame(b"\xc1"), ipcbus.CodecError, "undecodable"),
    "two values in one frame": (frame(msgpack.packb(1) + msgpack.packb(2)), ipcbus.CodecError, "extra data"),
    "value cut short": (frame(msgpack.packb("abcdef")[:-2]), ipcbus.CodecError, "undecodable"),
    "oversized length": (FRAME.pack(2**30, 0, 0, 0), ipcbus.ProtocolError, "exceeds max_message_size"),
    "reserved bits": (frame(msgpack.packb(1), reserved=1), ipcbus.ProtocolError, "reserved header field"),
    "unknown frame type": (frame(msgpack.packb(1), ftype=0x7F), ipcbus.ProtocolError, "unknown frame type 127"),
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
def test_a_bad_frame_in_a_round_trip_is_a_typed_error(
    case: str, raw_peer: tuple[ipcbus.Channel, socket.socket]
) -> None:
    ch, raw = raw_peer
    data, error, match = BAD_FRAMES[case]
    raw.sendall(data)
    with pytest.raises(error, match=match):
        ch.recv()
    assert ch.closed
    with pytest.raises(ipcbus.IPCError):
        ch.recv()  # sticky, and nothing blocks


def test_a_good_frame_after_a_bad_decode_attempt_is_not_lost(
    raw_peer: tuple[ipcbus.Channel, socket.socket],
) -> None:
    # The kept decoder must not carry the bad bytes into the next message.
    ch, raw = raw_peer
    raw.sendall(frame(msgpack.packb("ok1")))
    assert ch.recv().data == "ok1"
    raw.sendall(frame(msgpack.packb({"k": [1, 2, 3]})))
    assert ch.recv().data == {"k": [1, 2, 3]}


def test_eof_in_a_round_trip_is_channel_closed(raw_peer: tuple[ipcbus.Channel, socket.socket]) -> None:
    ch, raw = raw_peer
    raw.sendall(frame(msgpack.packb("last")))
    raw.shutdown(socket.SHUT_WR)
    assert ch.recv().data == "last"
    with pytest.raises(ipcbus.ChannelClosed):
        ch.recv()
    assert list(ch) == []


def test_a_handle_in_a_round_trip_arrives_open() -> None:
    a, b = ipcbus.pair()
    with a, b:
        thread = echo(b)
        a.send("warm-up")
        a.recv()
        for i in range(20):
            r, w = os.pipe()
            with ipcbus.Handle(r) as sent:  # (a Handle owns its fd)
                try:
                    a.send(i, handle=sent)
                    data, handle = a.recv()
                    assert data == i and handle is not None
                    os.write(w, b"ping")
                    with handle:
                        assert os.read(handle.fileno(), 4) == b"ping"
                finally:
                    os.close(w)
        a.close()
        thread.join(10)


def test_replies_while_the_peer_is_not_reading_arrive_whole(raw_peer: tuple[ipcbus.Channel, socket.socket]) -> None:
    # Each request arrives alone, so each reply is written at once, until the
    # kernel buffer (made small here) is full: then a reply is written in
    # part and its rest queued, and later replies queue behind it. The raw
    # peer reads nothing until the end.
    ch, raw = raw_peer
    ch._stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    writes: list[tuple[int, int]] = []
    wrote = ch._wrote_lone
    ch._wrote_lone = lambda frame_, n: (writes.append((len(frame_), n)), wrote(frame_, n))[1]  # type: ignore[method-assign]
    payload = "r" * 20_000
    n = 30
    replied = threading.Semaphore(0)

    def requester() -> None:
        for i in range(n):
            raw.sendall(frame(msgpack.packb(i)))
            assert replied.acquire(timeout=10)

    def replier() -> None:
        for _ in range(n):
            i = ch.recv().data
            ch.send([i, payload])
            replied.release()
        ch.flush()

    threads = [threading.Thread(target=requester), threading.Thread(target=replier)]
    for t in threads:
        t.start()
    got = read_frames(raw, n)
    for t in threads:
        t.join(30)
    assert got == [[i, payload] for i in range(n)]
    assert any(n < size for size, n in writes)  # a reply did go out in part


def test_a_signal_during_the_read_runs_its_handler_and_the_read_goes_on() -> None:
    a, b = ipcbus.pair()
    handled: list[int] = []
    previous = signal.signal(signal.SIGALRM, lambda signum, _frame: handled.append(signum))
    try:
        with a, b:
            b.send("warm-up")
            a.recv()
            a.send("x")
            b.recv()
            threading.Timer(0.3, lambda: b.send("late")).start()
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            assert a.recv().data == "late"  # EINTR: the handler ran, then the read went on
            assert handled == [signal.SIGALRM]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Interrupted(Exception):
    pass


def raise_interrupted(signum: int, _frame: Any) -> None:
    raise Interrupted


def test_an_exception_from_a_signal_handler_leaves_the_channel_usable() -> None:
    a, b = ipcbus.pair()
    previous = signal.signal(signal.SIGALRM, raise_interrupted)
    try:
        with a, b:
            b.send("warm-up")
            a.recv()
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            with pytest.raises(Interrupted):
                a.recv()
            # The reader's lock was released and nothing was consumed.
            b.send("after")
            assert a.recv().data == "after"
            a.send("reply")
            assert b.recv().data == "reply"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_reply_to_a_closed_peer_is_channel_closed() -> None:
    a, b = ipcbus.pair()
    with a:
        b.send("question")
        assert a.recv().data == "question"
        b.close()
        # The first write after the peer went may still be taken by the
        # kernel; a later one fails, with the channel's own error.
        with pytest.raises(ipcbus.ChannelClosed):
            for _ in range(100):
                a.send("answer")
                a._read_since_write = True  # every send a reply: the round trip's write


def test_recv_from_two_threads_takes_each_message_once() -> None:
    a, b = ipcbus.pair()
    n = 2_000
    got: list[int] = []
    lock = threading.Lock()

    def reader() -> None:
        while True:
            value = a.recv().data
            if value is None:
                return
            with lock:
                got.append(value)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    with a, b:
        for t in readers:
            t.start()
        for i in range(n):
            b.send(i)
            if i % 7 == 0:
                b.flush()
        b.send(None)
        b.send(None)
        b.flush()
        for t in readers:
            t.join(30)
    assert sorted(got) == list(range(n))

