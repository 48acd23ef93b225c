"""send_many and recv_many: many messages per call, with the semantics of a
loop of send/recv (order, internal routing, handles, errors, EOF)."""

from __future__ import annotations

import socket
import threading
from typing import Any

import msgpack
import pytest
import trio

import ipcbus
import ipcbus.trio
from ipcbus._protocol import FRAME, FRAME_BATCH, Connection
from ipcbus.codecs import get_codec

pytestmark = pytest.mark.posix("socketpair")


def drain(ch: ipcbus.Channel, n: int, max_count: int = 1024) -> list[list[ipcbus.Message]]:
    """recv_many until n messages arrived; the lists it returned."""
    chunks = []
    got = 0
    while got < n:
        chunk = ch.recv_many(max_count, timeout=10)
        assert 1 <= len(chunk) <= max_count
        chunks.append(chunk)
        got += len(chunk)
    assert got == n
    return chunks


@pytest.mark.parametrize("codec", ["msgpack", "json"])
def test_send_many_and_recv_many_keep_order(codec: str) -> None:
    a, b = ipcbus.pair(codec)
    with a, b:
        n = 30_000
        values = [{"i": i, "s": "x" * (i % 50)} for i in range(n)]
        sender = threading.Thread(target=lambda: [a.send_many(values[k : k + 997]) for k in range(0, n, 997)])
        sender.start()
        chunks = drain(b, n, max_count=500)
        sender.join(10)
        assert [m.data for chunk in chunks for m in chunk] == values
        assert all(m.handle is None for chunk in chunks for m in chunk)
        assert len(chunks) < n / 10  # many messages per call, not one


def test_send_many_takes_any_iterable_and_an_empty_one() -> None:
    a, b = ipcbus.pair()
    with a, b:
        a.send_many([])
        a.send_many(i for i in range(5))
        a.send_many(range(5, 8))
        a.flush()
        assert [m.data for chunk in drain(b, 8) for m in chunk] == list(range(8))


@pytest.mark.parametrize("codec", ["msgpack", "json"])
def test_send_many_sends_none_if_one_cannot_be_encoded(codec: str) -> None:
    a, b = ipcbus.pair(codec)
    with a, b:
        a.send("first")
        with pytest.raises(ipcbus.CodecError, match="value 2"):
            a.send_many([1, 2, {3, 4}, 5])  # a set: neither codec carries it
        a.send("after")
        a.flush()
        assert [m.data for chunk in drain(b, 2) for m in chunk] == ["first", "after"]


def test_send_many_sends_none_if_one_is_over_the_size_limit() -> None:
    a, b = ipcbus.pair(max_message_size=100_000)
    with a, b:
        a.wait_handshake()
        b.wait_handshake()
        with pytest.raises(ipcbus.CodecError, match="exceeds the max_message_size"):
            a.send_many(["small", b"x" * 200_000, "small too"])
        a.send_many(["only", "these"])
        a.flush()
        assert [m.data for chunk in drain(b, 2) for m in chunk] == ["only", "these"]


def test_send_many_on_a_closed_channel() -> None:
    a, b = ipcbus.pair()
    b.close()
    a.close()
    with pytest.raises(ipcbus.ChannelClosed):
        a.send_many([1])


def test_recv_many_leaves_internal_messages_and_handles_to_their_paths() -> None:
    a, b = ipcbus.pair()
    claimed: list[Any] = []
    b.on_internal("APP_", lambda msg: claimed.append(msg.data))
    r, w = socket.socketpair()
    with a, b, r, w:
        a.send_many([1, 2, {"cmd": "APP_x"}, 3])
        a.send("with a handle", handle=w)
        a.send_many([4, 5, {"cmd": "IPCBUS_NOT_A_COMMAND"}, 6])
        a.flush()
        messages = [m for chunk in drain(b, 7) for m in chunk]
        assert [m.data for m in messages] == [1, 2, 3, "with a handle", 4, 5, 6]
        received = messages[3].handle
        assert isinstance(received, socket.socket)
        received.sendall(b"ping")
        assert r.recv(4) == b"ping"
        received.close()
        assert claimed == [{"cmd": "APP_x"}]


def test_recv_many_returns_what_came_before_the_end_then_raises() -> None:
    a, b = ipcbus.pair()
    with b:
        with a:
            a.send_many(range(10))
        assert [m.data for chunk in drain(b, 10) for m in chunk] == list(range(10))
        with pytest.raises(ipcbus.ChannelClosed):
            b.recv_many()


def test_recv_many_returns_the_values_before_a_bad_one_then_raises() -> None:
    core = Connection(get_codec("msgpack"), pid=4242, can_carry_handles=True)
    seg = core.take_output()
    assert seg is not None
    payload = b"".join(msgpack.packb(i) for i in range(5)) + b"\xc1"
    mine, theirs = socket.socketpair()
    theirs.sendall(bytes(seg[0]) + FRAME.pack(len(payload), FRAME_BATCH, 0, 0) + payload)
    with theirs, ipcbus.connect(f"fd://{mine.detach()}") as ch:
        got = []
        with pytest.raises(ipcbus.CodecError, match="undecodable msgpack batch"):
            while True:
                got += [m.data for m in ch.recv_many(100, timeout=10)]
        assert got == [0, 1, 2, 3, 4]
        assert ch.closed


def test_recv_many_checks_max_count() -> None:
    a, b = ipcbus.pair()
    with a, b:
        with pytest.raises(ValueError, match="at least 1"):
            b.recv_many(0)
        a.send_many(range(3))
        a.flush()
        assert [m.data for m in b.recv_many(1, timeout=10)] == [0]


def test_recv_many_times_out_like_recv() -> None:
    a, b = ipcbus.pair()
    with a, b, pytest.raises(TimeoutError):
        b.recv_many(timeout=0.05)


# ---------------------------------------------------------------------- trio


def test_trio_send_many_and_recv_many() -> None:
    async def main() -> None:
        a, b = ipcbus.trio.pair()
        async with a, b:
            n = 20_000
            values = [{"i": i} for i in range(n)]
            got: list[Any] = []
            calls = 0

            async def reader() -> None:
                nonlocal calls
                while len(got) < n:
                    chunk = await b.recv_many(700)
                    assert 1 <= len(chunk) <= 700
                    got.extend(m.data for m in chunk)
                    calls += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                for k in range(0, n, 1000):
                    await a.send_many(values[k : k + 1000])
            assert got == values
            assert calls < n / 10

            with pytest.raises(ipcbus.CodecError, match="value 1"):
                await a.send_many(["fine", {1}])
            await a.send_many(["after"])
            assert [m.data for m in await b.recv_many()] == ["after"]
            with pytest.raises(ValueError, match="at least 1"):
                await b.recv_many(0)

    trio.run(main)


def test_trio_recv_many_returns_what_came_before_the_end_then_raises() -> None:
    async def main() -> None:
        a, b = ipcbus.trio.pair()
        async with b:
            async with a:
                await a.send_many(range(10))
            got: list[Any] = []
            while len(got) < 10:
                got += [m.data for m in await b.recv_many()]
            assert got == list(range(10))
            with pytest.raises(ipcbus.ChannelClosed):
                await b.recv_many()

    trio.run(main)


def test_trio_send_many_checkpoints() -> None:
    async def main() -> None:
        a, b = ipcbus.trio.pair()
        async with a, b:
            with trio.CancelScope() as scope:
                scope.cancel()
                await a.send_many([1, 2])  # cancelled before anything is queued
            assert scope.cancelled_caught
            await a.send_many([3])
            assert [m.data for m in await b.recv_many()] == [3]

    trio.run(main)


def test_send_many_and_recv_many_on_a_node_protocol_channel() -> None:
    # protocol="node" (newline-delimited JSON): NODE_ messages are internal.
    a, b = ipcbus.pair(protocol="node", codec="json")
    with b:
        with a:
            a.send_many([{"i": i} for i in range(1000)] + [{"cmd": "NODE_X"}, "end"])
        got = [m.data for chunk in drain(b, 1001) for m in chunk]
        assert got == [{"i": i} for i in range(1000)] + ["end"]
        with pytest.raises(ipcbus.ChannelClosed):
            b.recv_many(timeout=10)
