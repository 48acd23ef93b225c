"""The sans-IO protocol core, with no sockets: bytes and fd numbers in, events
out. fds here are plain integers; the core never touches them."""

from __future__ import annotations

import ast
import contextlib
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipcbus import _protocol
from ipcbus._errors import ChannelClosed, CodecError, HandleError, HandshakeError, ProtocolError
from ipcbus._message import Message
from ipcbus._protocol import (
    FRAME,
    FRAME_AUTH,
    FRAME_BATCH,
    FRAME_CONTROL,
    FRAME_DATA,
    HELLO,
    MIN_MAX_MESSAGE_SIZE,
    NEED_DATA,
    NONCE_SIZE,
    SCM_MAX_FD,
    Closed,
    Connection,
    HandlesReleased,
    HandshakeComplete,
    InternalMessage,
    RawMessage,
)
from ipcbus.codecs import get_codec

DESC = b"\x03\x00\x00\x00"  # a bare-fd handle descriptor
KEY = b"k" * 16
N1, N2 = b"\x01" * NONCE_SIZE, b"\x02" * NONCE_SIZE


def make(codec: str = "msgpack", *, pid: int = 1, handles: bool = True, **kw: Any) -> Connection:
    return Connection(get_codec(codec), pid=pid, can_carry_handles=handles, **kw)


def output(conn: Connection) -> list[tuple[bytes, list[int]]]:
    segs = []
    while (seg := conn.take_output()) is not None:
        segs.append((bytes(seg[0]), list(seg[1])))
    return segs


def wire(conn: Connection) -> bytes:
    segs = output(conn)
    assert all(not fds for _, fds in segs)
    return b"".join(data for data, _ in segs)


def pump(src: Connection, dst: Connection) -> None:
    for data, fds in output(src):
        dst.receive_data(data, fds)


def drain(conn: Connection) -> list[Any]:
    events = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return events
        events.append(ev)
        if isinstance(ev, Closed):
            return events


def connected(codec: str = "msgpack", **kw: Any) -> tuple[Connection, Connection]:
    a, b = make(codec, pid=10, **kw), make(codec, pid=20, **kw)
    pump(a, b)
    pump(b, a)
    for conn in (a, b):
        evs = drain(conn)
        assert len(evs) == 1 and isinstance(evs[0], HandshakeComplete), evs
    return a, b


def messages(events: list[Any]) -> list[Any]:
    return [ev.data for ev in events if isinstance(ev, Message)]


def frame(ftype: int, payload: bytes, nh: int = 0, reserved: int = 0, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return FRAME.pack(n, ftype, nh, reserved) + payload


def hello(*, magic: bytes = b"IPCB", version: int = 1, codec: str = "msgpack", flags: int = 1,
          nonce: bytes = b"", maxsize: int = 2**26, pid: int = 99) -> bytes:
    name = codec.encode()
    body = bytes([len(name)]) + name + struct.pack(">I", maxsize) + bytes([len(nonce)]) + nonce
    return HELLO.pack(magic, version, flags, len(body), pid) + body


def opened(codec: str = "msgpack", **kw: Any) -> Connection:
    """A connection that has accepted a hand-made hello."""
    conn = make(codec, **kw)
    output(conn)
    conn.receive_data(hello(codec=codec))
    assert isinstance(drain(conn)[0], HandshakeComplete)
    return conn


# ------------------------------------------------------------------ handshake


def test_handshake_reports_the_peer() -> None:
    a = make("json", pid=1234, handles=False, max_message_size=MIN_MAX_MESSAGE_SIZE)
    b = make("json", pid=5678)
    pump(a, b)
    (ev,) = drain(b)
    assert ev == HandshakeComplete(
        peer_pid=1234, peer_codec="json", peer_can_carry_handles=False,
        peer_max_message_size=MIN_MAX_MESSAGE_SIZE, authenticated=False,
    )
    assert b.state == "OPEN" and b.established
    assert not b.handles_allowed  # the peer cannot carry them
    assert a.state == "HELLO" and not a.established


def test_hello_byte_at_a_time() -> None:
    a, b = make(pid=7), make()
    data = wire(a)
    for i in range(len(data)):
        assert b.next_event() is NEED_DATA
        b.receive_data(data[i : i + 1])
    (ev,) = drain(b)
    assert isinstance(ev, HandshakeComplete) and ev.peer_pid == 7


@contextlib.contextmanager
def patched(name: str, value: Any) -> Iterator[None]:
    old = getattr(_protocol, name)
    setattr(_protocol, name, value)
    try:
        yield
    finally:
        setattr(_protocol, name, old)


def _both_fail(a: Connection, b: Connection, patch: tuple[str, Any] | None = None) -> list[str]:
    """Exchange hellos; b runs with ``patch`` applied (another version of the
    protocol). Returns both sides' error messages."""
    with patched(*patch) if patch else contextlib.nullcontext():
        pump(a, b)
        with pytest.raises(HandshakeError) as info_b:
            drain(b)
    pump(b, a)
    with pytest.raises(HandshakeError) as info_a:
        drain(a)
    return [str(info_b.value), str(info_a.value)]


def test_codec_mismatch_detected_on_both_sides_naming_both() -> None:
    a, b = make("msgpack"), make("json")
    for msg in _both_fail(a, b):
        assert "'msgpack'" in msg and "'json'" in msg
    assert a.state == b.state == "ERROR"


def test_version_mismatch_detected_on_both_sides_naming_both() -> None:
    a = make()
    with patched("VERSION", 2):
        b = make()
    for msg in _both_fail(a, b, ("VERSION", 2)):
        assert "1" in msg and "2" in msg and "version" in msg


def test_magic_mismatch_detected_on_both_sides_naming_both() -> None:
    a = make()
    with patched("MAGIC", b"XXXX"):
        b = make()
    for msg in _both_fail(a, b, ("MAGIC", b"XXXX")):
        assert "IPCB" in msg and "XXXX" in msg


def test_wrong_magic_is_refused_from_the_first_bytes() -> None:
    conn = make()
    conn.receive_data(b"GET ")
    with pytest.raises(HandshakeError, match=r"bad magic b'GET '.*b'IPCB'"):
        conn.next_event()
    # The error is sticky.
    with pytest.raises(HandshakeError):
        conn.next_event()
    with pytest.raises(HandshakeError):
        conn.send("x")


@pytest.mark.parametrize(
    "data, match",
    [
        (hello(version=9), "this side 1, peer 9"),
        (HELLO.pack(b"IPCB", 1, 0, 4000, 1), "hello body of 4000 bytes"),
        (HELLO.pack(b"IPCB", 1, 0, 3, 1) + b"\x09ab", "malformed hello body"),
        (hello(flags=3, nonce=N1), "this side does not use a key, peer requires one"),
    ],
)
def test_bad_hellos(data: bytes, match: str) -> None:
    conn = make()
    conn.receive_data(data)
    with pytest.raises(HandshakeError, match=match):
        drain(conn)


def test_short_auth_nonce() -> None:
    conn = make(authkey=KEY, nonce=N1)
    conn.receive_data(hello(flags=3, nonce=b"short"))
    with pytest.raises(HandshakeError, match="nonce of 5 bytes"):
        drain(conn)


def test_eof_inside_the_hello_is_a_handshake_error() -> None:
    conn = make()
    conn.receive_data(hello()[:10])
    conn.receive_data(b"")
    with pytest.raises(HandshakeError, match="EOF"):
        conn.next_event()


def test_eof_before_any_byte_is_a_close() -> None:
    conn = make()
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), Closed)


# ------------------------------------------------------------ framing, chunks

SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=20)
)
MSGPACK_VALUES = st.recursive(
    SCALARS | st.sampled_from(["IPCBUS_PING", "APP_X"]).map(lambda c: {"cmd": c}),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
) | st.integers(16_000, 70_000).map(lambda n: b"b" * n)  # around and over the batch limits
JSON_SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
VALUES = {
    "msgpack": MSGPACK_VALUES,
    "json": JSON_VALUES,
    "pickle": MSGPACK_VALUES,
    "raw": st.binary(max_size=300) | st.integers(16_000, 20_000).map(lambda n: b"r" * n),
}


def _chunks(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        yield data[pos : pos + n]
        pos += n
        i += 1


@pytest.mark.parametrize("codec", ["msgpack", "json", "pickle", "raw"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_messages_random_chunks_same_events(codec: str, data: st.DataObject) -> None:
    values = data.draw(st.lists(VALUES[codec], max_size=30), label="values")
    encoded_path = data.draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values)))
    sizes = data.draw(st.lists(st.integers(1, 5000), min_size=1, max_size=20), label="chunk sizes")
    sender, receiver = make(codec), make(codec)
    output(receiver)
    enc = get_codec(codec)
    for value, fast in zip(values, encoded_path, strict=True):
        if fast:
            sender.send_encoded(enc.encode(value))
        else:
            sender.send(value)
    stream = wire(sender)
    events: list[Any] = []
    for chunk in _chunks(stream, sizes):
        receiver.receive_data(chunk)
        events += drain(receiver)
    receiver.receive_data(b"")
    events += drain(receiver)
    assert isinstance(events[0], HandshakeComplete)
    assert isinstance(events[-1], Closed)

    def internal(value: Any) -> bool:  # the routing rule, restated independently of the core
        cmd = value.get("cmd") if type(value) is dict else None
        return type(cmd) is str and cmd.startswith("IPCBUS_")

    assert messages(events) == [v for v in values if not internal(v)]
    assert [ev.data for ev in events if isinstance(ev, InternalMessage)] == [v for v in values if internal(v)]


def test_byte_at_a_time_with_handles_and_internal_messages() -> None:
    a, b = connected()
    b.claim_prefix("APP_")
    a.send({"cmd": "APP_HELLO"})
    a.send("plain")
    a.send({"x": 1}, [(DESC, 50), (DESC, 51)], multi=True)
    a.send("after")
    a.send({"cmd": "APP_WITH_FD"}, [(DESC, 60)])
    events: list[Any] = []
    for data, fds in output(a):
        for i in range(len(data)):
            b.receive_data(data[i : i + 1], fds if i == 0 else ())
            events += drain(b)
    b.receive_data(b"")
    events += drain(b)
    assert events == [
        InternalMessage("APP_", {"cmd": "APP_HELLO"}, [], False),
        Message("plain", None),
        RawMessage({"x": 1}, [(DESC, 50), (DESC, 51)], True),
        Message("after", None),
        InternalMessage("APP_", {"cmd": "APP_WITH_FD"}, [(DESC, 60)], False),
        Closed(),
    ]
    assert b.unclaimed_fds() == []


# --------------------------------------------------------------------- limits


def test_oversized_length_is_refused_from_the_header_alone() -> None:
    conn = opened()
    conn.receive_data(FRAME.pack(2**30, FRAME_DATA, 0, 0))  # 1 GiB claimed, 8 bytes sent
    with pytest.raises(ProtocolError, match="1073741824 bytes exceeds max_message_size 67108864"):
        conn.next_event()


def test_limit_is_exact() -> None:
    size = MIN_MAX_MESSAGE_SIZE
    conn = opened("raw", max_message_size=size)
    conn.receive_data(frame(FRAME_DATA, b"a" * size))
    assert messages(drain(conn)) == [b"a" * size]
    conn.receive_data(FRAME.pack(size + 1, FRAME_DATA, 0, 0))
    with pytest.raises(ProtocolError, match=f"{size + 1} bytes"):
        conn.next_event()


def test_sender_refuses_a_message_over_the_peers_limit() -> None:
    a = make("raw")
    b = make("raw", max_message_size=MIN_MAX_MESSAGE_SIZE)
    pump(b, a)
    drain(a)
    with pytest.raises(CodecError, match=f"exceeds the max_message_size of {MIN_MAX_MESSAGE_SIZE}"):
        a.send(b"x" * (MIN_MAX_MESSAGE_SIZE + 1))
    with pytest.raises(CodecError, match="max_message_size"):
        a.send_encoded(b"x" * (MIN_MAX_MESSAGE_SIZE + 1))
    a.send(b"x" * MIN_MAX_MESSAGE_SIZE)  # at the limit: fine, and the channel still works


def test_truncated_frame_then_eof() -> None:
    conn = opened()
    conn.receive_data(frame(FRAME_DATA, msgpack.packb("whole")) + frame(FRAME_DATA, b"\xa5hel", length=6))
    conn.receive_data(b"")
    assert conn.next_event() == Message("whole", None)
    with pytest.raises(ProtocolError, match="truncated frame: EOF after 12 bytes"):
        conn.next_event()


def test_truncated_header_then_eof() -> None:
    conn = opened()
    conn.receive_data(b"\x00\x00\x00")
    conn.receive_data(b"")
    with pytest.raises(ProtocolError, match="truncated"):
        conn.next_event()


def test_reserved_bits_must_be_zero() -> None:
    conn = opened()
    conn.receive_data(frame(FRAME_DATA, msgpack.packb(1), reserved=0x8000))
    with pytest.raises(ProtocolError, match="reserved header field is 0x8000"):
        conn.next_event()


@pytest.mark.parametrize("ftype", [4, 7, 255])
def test_unknown_frame_type(ftype: int) -> None:
    conn = opened()
    conn.receive_data(frame(ftype, b"abc"))
    with pytest.raises(ProtocolError, match=f"unknown frame type {ftype}"):
        conn.next_event()


def test_auth_frame_after_the_handshake() -> None:
    conn = opened()
    conn.receive_data(frame(FRAME_AUTH, b"p" * 32))
    with pytest.raises(ProtocolError, match="authentication frame after the handshake"):
        conn.next_event()


@pytest.mark.parametrize(
    "bad, fds, good",
    [
        (frame(FRAME_DATA, b"\xc1"), [], []),
        (frame(FRAME_DATA, b"\x00" + DESC + b"\xc1", nh=1), [70], []),
        # A batch's values are decoded as they are asked for: those before
        # the bad one are delivered, then the error.
        (frame(FRAME_BATCH, msgpack.packb(1) + b"\xc1"), [], [1]),
    ],
    ids=["plain", "with-handle", "batch"],
)
def test_undecodable_payload_is_a_codec_error_in_stream_order(bad: bytes, fds: list[int], good: list[Any]) -> None:
    # Regression: with a good frame before it in the same chunk, the decoder's
    # exception kept a slice of the buffer alive and a BufferError came out.
    conn = opened()
    conn.receive_data(frame(FRAME_DATA, msgpack.packb("ok")) + bad, fds)
    assert conn.next_event() == Message("ok", None)
    for value in good:
        assert conn.next_event() == Message(value, None)
    with pytest.raises(CodecError, match="undecodable msgpack"):
        conn.next_event()
    assert conn.unclaimed_fds() == fds
    conn.receive_data(b"more")  # still no BufferError once failed


def test_constructor_limits() -> None:
    with pytest.raises(ValueError, match="max_message_size"):
        make(max_message_size=MIN_MAX_MESSAGE_SIZE - 1)
    with pytest.raises(ValueError, match="SCM_MAX_FD"):
        make(max_handles=254)
    with pytest.raises(ValueError, match="nonce"):
        make(authkey=KEY)


# ----------------------------------------------------------- internal routing


def _route(conn: Connection, values: list[Any], codec: str = "msgpack") -> list[Any]:
    enc = get_codec(codec)
    conn.receive_data(b"".join(frame(FRAME_DATA, enc.encode(v)) for v in values))
    return drain(conn)


ROUTING_CASES = [
    ({"cmd": "IPCBUS_"}, "IPCBUS_"),  # the bare prefix is internal
    ({"cmd": "IPCBUS_ANYTHING", "x": 1}, "IPCBUS_"),
    ({"cmd": "IPCBUS"}, None),  # not the whole prefix
    ({"cmd": "ipcbus_x"}, None),  # case-sensitive
    ({"cmd": " IPCBUS_X"}, None),  # a prefix, not a substring
    ({"CMD": "IPCBUS_X"}, None),  # only the key "cmd"
    ({"cmd": ["IPCBUS_X"]}, None),  # cmd must be a string
    ({"cmd": 7}, None),
    ({"data": {"cmd": "IPCBUS_X"}}, None),  # only the top level counts
    (["IPCBUS_X"], None),
    ("IPCBUS_X", None),  # a bare string is application data
    ({"cmd": "APP_"}, "APP_"),
    ({"cmd": "APP_X_1"}, "APP_X_"),  # longest claimed prefix wins
    ({"cmd": "APP_Y"}, "APP_"),
]


@pytest.mark.parametrize("codec", ["msgpack", "json"])
def test_internal_prefix_routing(codec: str) -> None:
    conn = opened(codec)
    conn.claim_prefix("APP_")
    conn.claim_prefix("APP_X_")
    conn.claim_prefix("APP_")  # claiming twice changes nothing
    values = [v for v, _ in ROUTING_CASES]
    events = _route(conn, values, codec)
    got = [(ev.data, ev.prefix if isinstance(ev, InternalMessage) else None) for ev in events]
    assert got == ROUTING_CASES


def test_internal_routing_inside_batches() -> None:
    a, b = connected()
    b.claim_prefix("APP_")
    sent = [v for v, _ in ROUTING_CASES if not (isinstance(v, dict) and v.get("cmd") == "APP_X_1")]
    for v in sent:
        a.send_encoded(msgpack.packb(v))
    pump(a, b)
    got = [(ev.data, ev.prefix if isinstance(ev, InternalMessage) else None) for ev in drain(b)]
    assert got == [(v, p if p != "APP_X_" else "APP_") for v, p in ROUTING_CASES if v in sent]


def test_custom_internal_prefix_replaces_the_default() -> None:
    conn = opened(internal_prefix="MYBUS_")
    events = _route(conn, [{"cmd": "IPCBUS_X"}, {"cmd": "MYBUS_X"}])
    assert events == [Message({"cmd": "IPCBUS_X"}, None), InternalMessage("MYBUS_", {"cmd": "MYBUS_X"}, [], False)]


def test_internal_message_with_handles() -> None:
    a, b = connected()
    a.send({"cmd": "IPCBUS_FD"}, [(DESC, 9)])
    pump(a, b)
    assert drain(b) == [InternalMessage("IPCBUS_", {"cmd": "IPCBUS_FD"}, [(DESC, 9)], False)]


def test_empty_prefix_is_refused() -> None:
    with pytest.raises(ValueError):
        make(internal_prefix="")
    with pytest.raises(ValueError):
        make().claim_prefix("")


# -------------------------------------------------------------------- batches


def _frames(stream: bytes) -> list[tuple[int, int, int]]:
    """(type, length, nhandles) of every frame after the hello."""
    (_m, _v, _f, body_len, _pid) = HELLO.unpack_from(stream)
    pos = HELLO.size + body_len
    out = []
    while pos < len(stream):
        length, ftype, nh, _ = FRAME.unpack_from(stream, pos)
        out.append((ftype, length, nh))
        pos += FRAME.size + length
    assert pos == len(stream)
    return out


def test_msgpack_batches_small_messages_into_one_frame() -> None:
    a = make()
    for i in range(500):
        a.send_encoded(msgpack.packb({"i": i}))
    stream = wire(a)
    frames = _frames(stream)
    assert [f[0] for f in frames] == [FRAME_BATCH]
    b = make()
    b.receive_data(stream)
    assert messages(drain(b)) == [{"i": i} for i in range(500)]


def test_batch_frames_are_capped_and_big_messages_go_alone() -> None:
    a = make("raw")  # raw cannot batch
    b = make()
    b.send_encoded(msgpack.packb(b"y" * 20_000))  # over BATCH_MESSAGE_MAX, no batch open: alone
    for _ in range(200):
        b.send_encoded(msgpack.packb(b"z" * 1000))  # 200 kB: more than one batch
    b.send_encoded(msgpack.packb(b"w" * 70_000))  # more than a batch holds: alone
    b.send_encoded(msgpack.packb(1))  # a batch of one goes out as a DATA frame
    b.send_encoded(msgpack.packb(2))
    b.send_encoded(msgpack.packb(3))
    frames = _frames(wire(b))
    types = [f[0] for f in frames]
    assert types[0] == FRAME_DATA and types[-2:] == [FRAME_DATA, FRAME_BATCH]
    assert types[1:-2] == [FRAME_BATCH] * len(types[1:-2]) and len(types[1:-2]) >= 3
    assert all(length <= _protocol.BATCH_TARGET for t, length, _ in frames if t == FRAME_BATCH)
    a.send_encoded(b"r")
    a.send_encoded(b"s")
    assert [f[0] for f in _frames(wire(a))] == [FRAME_DATA, FRAME_DATA]


def test_a_batch_of_one_is_a_data_frame() -> None:
    b = make()
    b.send_encoded(msgpack.packb({"ping": 1}))
    assert [f[0] for f in _frames(wire(b))] == [FRAME_DATA]
    c = make()
    c.send_encoded(msgpack.packb(1))
    c.send_encoded(msgpack.packb(2))
    assert [f[0] for f in _frames(wire(c))] == [FRAME_BATCH]


def test_json_never_batches() -> None:
    a = make("json")
    for i in range(100):
        a.send_encoded(b"%d" % i)
    for i in range(10):
        a.send(i)
    frames = _frames(wire(a))
    assert [f[0] for f in frames] == [FRAME_DATA] * 110


def test_batch_frame_for_a_codec_that_cannot_batch() -> None:
    conn = opened("json")
    conn.receive_data(frame(FRAME_BATCH, b"1 2"))
    with pytest.raises(ProtocolError, match="json codec cannot batch"):
        conn.next_event()


@pytest.mark.parametrize(
    "cut",
    [
        msgpack.packb("abcdef")[:-2],
        msgpack.packb({"a": 1})[:-1],  # (an Unpacker's iteration ends quietly here)
        msgpack.packb([1, [2, 3]])[:-1],
        msgpack.packb({"a": msgpack.ExtType(1, b"xyz")})[:-1],  # (left to msgpack by the C decoder)
        b"\xcb\x00",
    ],
)
def test_batch_that_ends_inside_a_value(cut: bytes) -> None:
    conn = opened()
    conn.receive_data(frame(FRAME_BATCH, msgpack.packb(1) + cut))
    assert conn.next_event() == Message(1, None)  # decoded as asked for
    with pytest.raises(CodecError, match="ends inside a value"):
        conn.next_event()


def test_handle_frame_interrupts_a_batch_in_order() -> None:
    a, b = connected()
    a.send_encoded(msgpack.packb(1))
    a.send(2, [(DESC, 5)])
    a.send_encoded(msgpack.packb(3))
    segs = output(a)
    assert [fds for _, fds in segs] == [[], [5]]  # the fd rides on its frame's segment
    for data, fds in segs:
        b.receive_data(data, fds)
    assert [type(ev).__name__ for ev in drain(b)] == ["Message", "RawMessage", "Message"]


def test_consecutive_handle_frames_share_one_segment() -> None:
    a, _ = connected()
    a.send(1, [(DESC, 5)])
    a.send(2, [(DESC, 6), (DESC, 7)], multi=True)
    a.send_encoded(msgpack.packb("plain"))  # ends the run
    a.send(3, [(DESC, 8)])
    assert [fds for _, fds in output(a)] == [[5, 6, 7], [8]]


def test_a_run_of_handle_frames_holds_at_most_scm_max_fd_fds() -> None:
    a, _ = connected()
    for i in range(300):
        a.send(i, [(DESC, 1000 + i)])
    assert [len(fds) for _, fds in output(a)] == [SCM_MAX_FD, 300 - SCM_MAX_FD]


def test_a_run_split_anywhere_by_the_kernel_is_received_whole() -> None:
    # The kernel may split one sendmsg (the fds ride on its first piece):
    # every frame of the run still claims its fds, wherever the split is.
    a, _ = connected()
    for i in range(3):
        a.send(i, [(DESC, 10 + i)])
    a.send_encoded(msgpack.packb("after"))
    [(data, fds)] = output(a)  # a plain frame may follow in the same write
    assert fds == [10, 11, 12]
    for cut in range(1, len(data)):
        b = opened()
        b.receive_data(data[:cut], fds)
        b.receive_data(data[cut:])
        events = drain(b)
        assert events == [
            RawMessage(0, [(DESC, 10)], False),
            RawMessage(1, [(DESC, 11)], False),
            RawMessage(2, [(DESC, 12)], False),
            Message("after", None),
        ], cut
        assert b.unclaimed_fds() == []


def test_fds_left_over_from_a_run_are_stray_at_the_next_plain_frame() -> None:
    conn = opened()
    conn.receive_data(_handle_frame("one", 1), [20, 21])
    assert isinstance(conn.next_event(), RawMessage)
    assert conn.next_event() is NEED_DATA  # the run may go on in the next chunk
    conn.receive_data(frame(FRAME_DATA, msgpack.packb("plain")))
    with pytest.raises(HandleError, match="1 fd"):
        drain(conn)
    assert conn.unclaimed_fds() == [21]


def test_fds_left_over_from_a_run_are_stray_at_eof() -> None:
    conn = opened()
    conn.receive_data(_handle_frame("one", 1), [22, 23])
    assert isinstance(conn.next_event(), RawMessage)
    conn.receive_data(b"")
    with pytest.raises(HandleError, match="no frame claiming"):
        drain(conn)
    assert conn.unclaimed_fds() == [23]


def test_a_plain_frame_ends_the_run() -> None:
    # handle, plain, then (in a later chunk) another handle frame: the fd
    # left over was for a frame inside its own chunk, and none claimed it.
    conn = opened()
    conn.receive_data(_handle_frame("one", 1) + frame(FRAME_DATA, msgpack.packb("plain")), [24, 25])
    conn.receive_data(_handle_frame("late", 1))
    with pytest.raises(HandleError, match="no frame claiming"):
        drain(conn)
    assert conn.unclaimed_fds() == [25]


# --------------------------------------------------------- ACK and release


def test_acks_release_tokens_in_order() -> None:
    a, b = connected()
    a.send("one", [(DESC, 11)], release="t1")
    a.send("two", [(DESC, 12)])  # kept by the sender: no token
    a.send("three", [(DESC, 13), (DESC, 14)], multi=True, release="t3")
    assert drain(a) == []
    pump(a, b)
    assert [ev.data for ev in drain(b)] == ["one", "two", "three"]
    pump(b, a)  # the ACKs
    events = drain(a)
    assert all(isinstance(ev, HandlesReleased) for ev in events)
    assert [t for ev in events for t in ev.tokens] == ["t1", "t3"]
    assert a.take_unreleased() == []


def test_only_frames_that_ask_are_acknowledged() -> None:
    # Bit 1 of the handle block asks for an ACK; the sender sets it only for
    # a release token. A stream of kept handles costs the receiver no writes.
    a, b = connected()
    a.send("kept", [(DESC, 11)])
    a.send("kept too", [(DESC, 12), (DESC, 13)], multi=True)
    data, fds = output(a)[0]
    flags = [data[i + FRAME.size] for i in (0, FRAME.size + 1 + 4 + len(msgpack.packb("kept")))]
    assert flags == [0x00, 0x01]
    b.receive_data(data, fds)
    assert [ev.data for ev in drain(b)] == ["kept", "kept too"]
    assert not b.has_output()
    a.send("released", [(DESC, 14)], release="t")
    data, fds = output(a)[0]
    assert data[FRAME.size] == 0x02
    assert a.releases_pending
    b.receive_data(data, fds)
    drain(b)
    assert b.has_output()
    pump(b, a)
    assert [t for ev in drain(a) for t in ev.tokens] == ["t"]
    assert not a.releases_pending


@pytest.mark.parametrize("flags", [0x04, 0x80, 0xFF])
def test_undefined_handle_block_flags_are_a_protocol_error(flags: int) -> None:
    conn = opened()
    conn.receive_data(frame(FRAME_DATA, bytes([flags]) + DESC + msgpack.packb("x"), nh=1), [48])
    with pytest.raises(ProtocolError, match="handle block flags"):
        drain(conn)
    assert conn.unclaimed_fds() == [48]


def test_acks_byte_at_a_time() -> None:
    a, b = connected()
    for i in range(3):
        a.send(i, [(DESC, 20 + i)], release=f"t{i}")
    released: list[Any] = []
    for data, fds in output(a):
        for i in range(len(data)):
            b.receive_data(data[i : i + 1], fds if i == 0 else ())
            pump(b, a)
            released += [t for ev in drain(a) for t in ev.tokens]
    assert released == ["t0", "t1", "t2"]


def test_unacknowledged_tokens_are_handed_back() -> None:
    a, _ = connected()
    a.send("x", [(DESC, 3)], release="mine")
    a.send("y", [(DESC, 4)])
    assert a.take_unreleased() == ["mine"]


@pytest.mark.parametrize("ack", [{"cmd": "IPCBUS_ACK", "n": 1}, {"cmd": "IPCBUS_ACK", "n": 0},
                                 {"cmd": "IPCBUS_ACK", "n": "1"}, {"cmd": "IPCBUS_ACK"}])
def test_ack_of_nothing_in_flight_is_a_protocol_error(ack: dict[str, Any]) -> None:
    conn = opened()
    conn.receive_data(frame(FRAME_CONTROL, msgpack.packb(ack)))
    with pytest.raises(ProtocolError, match="acknowledgement"):
        conn.next_event()


def test_ping_pong_and_unknown_controls() -> None:
    a, b = connected()
    a.send_ping()
    pump(a, b)
    assert drain(b) == []
    pong = wire(b)
    assert msgpack.unpackb(pong[FRAME.size :]) == {"cmd": "IPCBUS_PONG"}
    a.receive_data(pong + frame(FRAME_CONTROL, msgpack.packb({"cmd": "IPCBUS_FUTURE"})))
    assert drain(a) == []  # unknown control commands are ignored
    a.receive_data(frame(FRAME_CONTROL, b"\xc1"))
    with pytest.raises(ProtocolError, match="undecodable control frame"):
        a.next_event()


# ------------------------------------------------------------------ fd claims


def _handle_frame(payload: Any, nh: int) -> bytes:
    body = b"\x00" + DESC * nh + msgpack.packb(payload)
    return frame(FRAME_DATA, body, nh=nh)


def test_frame_claiming_two_fds_with_one_attached() -> None:
    conn = opened()
    conn.receive_data(_handle_frame("x", 2), [40])
    with pytest.raises(HandleError, match="declares 2 handle"):
        conn.next_event()
    assert conn.unclaimed_fds() == [40]
    assert conn.unclaimed_fds() == []  # handed out once


def test_fds_no_frame_claims() -> None:
    conn = opened()
    conn.receive_data(frame(FRAME_DATA, msgpack.packb("no handles here")), [41, 42])
    assert conn.next_event() == Message("no handles here", None)
    with pytest.raises(HandleError, match="2 fd"):
        conn.next_event()
    assert sorted(conn.unclaimed_fds()) == [41, 42]


def test_fds_left_over_after_a_frame_claimed_some() -> None:
    conn = opened()
    conn.receive_data(_handle_frame("one", 1) + frame(FRAME_DATA, msgpack.packb("none")), [43, 44])
    assert isinstance(conn.next_event(), RawMessage)
    with pytest.raises(HandleError):
        drain(conn)
    assert conn.unclaimed_fds() == [44]


def test_fds_with_eof() -> None:
    conn = opened()
    conn.receive_data(b"", [45])
    with pytest.raises(HandleError, match="no frame claiming"):
        conn.next_event()
    assert conn.unclaimed_fds() == [45]


def test_fds_for_a_frame_whose_payload_does_not_decode_are_returned() -> None:
    conn = opened()
    conn.receive_data(frame(FRAME_DATA, b"\x00" + DESC * 2 + b"\xc1", nh=2), [46, 47])
    with pytest.raises(CodecError):
        conn.next_event()
    assert sorted(conn.unclaimed_fds()) == [46, 47]


def test_fds_for_a_frame_too_short_for_its_descriptors_are_returned() -> None:
    conn = opened()
    conn.receive_data(frame(FRAME_DATA, b"\x00" + DESC, nh=3), [1, 2, 3])
    with pytest.raises(ProtocolError, match="too short for 3 handle descriptors"):
        conn.next_event()
    assert sorted(conn.unclaimed_fds()) == [1, 2, 3]


def test_too_many_handles_in_a_frame() -> None:
    conn = opened(max_handles=2)
    conn.receive_data(_handle_frame("x", 3), [5, 6, 7])
    with pytest.raises(HandleError, match="3 handles; the limit is 2"):
        conn.next_event()
    assert sorted(conn.unclaimed_fds()) == [5, 6, 7]


def test_control_frame_cannot_carry_handles() -> None:
    conn = opened()
    conn.receive_data(frame(FRAME_CONTROL, b"\x00" + DESC + msgpack.packb({}), nh=1), [8])
    with pytest.raises(ProtocolError, match="cannot carry handles"):
        conn.next_event()
    assert conn.unclaimed_fds() == [8]


def test_fds_fed_after_an_error_are_returned() -> None:
    conn = opened()
    conn.receive_data(frame(9, b""))
    conn.receive_data(_handle_frame("x", 1), [30])
    conn.receive_data(b"", [31])
    with pytest.raises(ProtocolError):
        conn.next_event()
    assert sorted(conn.unclaimed_fds()) == [30, 31]


def test_fds_that_arrive_on_the_hello() -> None:
    conn = make()
    conn.receive_data(hello(), [32])
    with pytest.raises(HandleError):
        drain(conn)
    assert conn.unclaimed_fds() == [32]


def test_sending_handles_the_channel_cannot_carry() -> None:
    a = make(handles=False)
    with pytest.raises(HandleError, match="cannot carry handles"):
        a.send("x", [(DESC, 3)])
    b, _ = connected(max_handles=1)
    with pytest.raises(HandleError, match="limit is 1"):
        b.send("x", [(DESC, 3), (DESC, 4)])
    with pytest.raises(HandleError, match="malformed"):
        b.send("x", [(b"\x01", 3)])
    peer_without = make(handles=False)
    c = make()
    pump(peer_without, c)
    drain(c)
    with pytest.raises(HandleError):
        c.send("x", [(DESC, 3)])


def test_send_after_close_sending() -> None:
    a, _ = connected()
    a.close_sending()
    with pytest.raises(ChannelClosed):
        a.send("x")
    with pytest.raises(ChannelClosed):
        a.send_encoded(b"\x01")


# ----------------------------------------------------------------------- auth


def _auth_pair(key_a: bytes = KEY, key_b: bytes = KEY) -> tuple[Connection, Connection]:
    a = make(authkey=key_a, nonce=N1, role="client")
    b = make(authkey=key_b, nonce=N2, role="server")
    return a, b


def _exchange(a: Connection, b: Connection, rounds: int = 3) -> None:
    for _ in range(rounds):
        pump(a, b)
        pump(b, a)


def test_auth_same_key() -> None:
    a, b = _auth_pair()
    a.send("early from a")  # held until the peer proved the key
    b.send_encoded(msgpack.packb("early from b"))
    _exchange(a, b)
    for conn, expected in ((a, "early from b"), (b, "early from a")):
        events = drain(conn)
        assert isinstance(events[0], HandshakeComplete) and events[0].authenticated
        assert messages(events) == [expected]


def test_auth_wrong_key_fails_on_both_sides_and_releases_nothing() -> None:
    a, b = _auth_pair(key_b=b"other key")
    a.send("secret from a")
    b.send("secret from b")
    sent_a, sent_b = [], []
    for _ in range(3):
        data = wire(a)
        sent_a.append(data)
        b.receive_data(data)
        data = wire(b)
        sent_b.append(data)
        a.receive_data(data)
    for conn in (a, b):
        with pytest.raises(HandshakeError, match="authentication failed"):
            drain(conn)
    assert b"secret" not in b"".join(sent_a) + b"".join(sent_b)


def test_auth_failure_parses_no_following_frame() -> None:
    conn = make(authkey=KEY, nonce=N1, role="server")
    output(conn)
    data = hello(flags=3, nonce=N2) + frame(FRAME_AUTH, b"\x00" * 32) + frame(FRAME_DATA, msgpack.packb("x"))
    conn.receive_data(data)
    with pytest.raises(HandshakeError, match="does not know the key"):
        conn.next_event()  # no HandshakeComplete, no Message before the error


def test_auth_data_frame_instead_of_a_proof() -> None:
    conn = make(authkey=KEY, nonce=N1, role="server")
    conn.receive_data(hello(flags=3, nonce=N2) + frame(FRAME_DATA, msgpack.packb("x")))
    with pytest.raises(HandshakeError, match="did not send a proof"):
        conn.next_event()


@pytest.mark.parametrize("role", ["server", "client", "peer"])
def test_reflected_proof_fails(role: str) -> None:
    # An attacker without the key sends the connection's own proof back.
    conn = make(authkey=KEY, nonce=N1, role=role)
    output(conn)
    conn.receive_data(hello(flags=3, nonce=N2))
    own_proof = wire(conn)
    assert FRAME.unpack_from(own_proof)[1] == FRAME_AUTH
    conn.receive_data(own_proof + frame(FRAME_DATA, msgpack.packb("x")))
    with pytest.raises(HandshakeError, match="does not know the key"):
        conn.next_event()  # no HandshakeComplete, no Message


@pytest.mark.parametrize("role", ["server", "client", "peer"])
def test_echoed_hello_fails(role: str) -> None:
    # With its own nonce echoed, a "peer" end would compute the same proof it
    # expects: the echo itself is refused.
    conn = make(authkey=KEY, nonce=N1, role=role)
    conn.receive_data(wire(conn))
    with pytest.raises(HandshakeError, match="echoed"):
        conn.next_event()
    assert wire(conn) == b""  # no proof was ever made for it


def test_proof_relayed_from_another_server_connection_fails() -> None:
    # The attacker opens two connections to servers knowing the key and
    # relays the proof the second one made (over the first one's nonce).
    s1 = make(authkey=KEY, nonce=N1, role="server")
    s2 = make(authkey=KEY, nonce=N2, role="server")
    output(s1)
    output(s2)
    s1.receive_data(hello(flags=3, nonce=N2))  # attacker to s1, posing with s2's nonce
    s2.receive_data(hello(flags=3, nonce=N1))  # attacker to s2, with s1's nonce
    s2_proof = wire(s2)  # HMAC over (server, N1, N2)
    s1.receive_data(s2_proof)
    with pytest.raises(HandshakeError, match="does not know the key"):
        drain(s1)


# --------------------------------------------------------------------- no I/O

FORBIDDEN = {"socket", "os", "select", "selectors", "trio", "subprocess", "asyncio", "signal", "io", "threading"}


def test_protocol_module_imports_no_io_modules_directly() -> None:
    tree = ast.parse(Path(_protocol.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    assert not names & FORBIDDEN, names & FORBIDDEN


def test_importing_the_core_loads_no_io_module() -> None:
    # Load ipcbus._protocol without running ipcbus/__init__ (which pulls in
    # the frontends) and see which modules it added.
    pkg_dir = Path(_protocol.__file__).parent
    code = (
        "import sys, types\n"
        "pkg = types.ModuleType('ipcbus'); pkg.__path__ = [sys.argv[1]]; sys.modules['ipcbus'] = pkg\n"
        "before = set(sys.modules)\n"
        "import ipcbus._protocol\n"
        "print(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(pkg_dir)], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert "ipcbus._protocol" in out
    bad = {m for m in out if m.split(".")[0] in FORBIDDEN - {"os", "io", "threading"}}
    bad |= {m for m in out if m.split(".")[0].lstrip("_") in {"socket", "select", "posixsubprocess"}}
    assert not bad, bad


# ------------------------------------------------------------- large frames


def _big_stream() -> tuple[bytes, list[Any]]:
    values = [b"x" * 300_000, 1, b"y" * 1_000_000, {"cmd": "IPCBUS_PING_IGNORED"}, b"z" * 400_000, 2]
    return b"".join(frame(FRAME_DATA, msgpack.packb(v)) for v in values), values


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(min_value=1, max_value=300_000), max_size=30), into=st.booleans())
def test_large_frames_in_random_chunks_whether_fed_or_read_in_place(cuts: list[int], into: bool) -> None:
    # A large frame's payload is gathered in a buffer of its own; a frontend
    # may read into it (receive_buffer) or feed bytes: the events are the same.
    stream, values = _big_stream()
    conn = opened()
    pos = 0
    for cut in [*cuts, len(stream)]:
        while pos < len(stream) and cut > 0:
            target = conn.receive_buffer() if into else None
            if target is not None:
                n = min(cut, len(target), len(stream) - pos)
                target[:n] = stream[pos : pos + n]
                conn.received_into(n)
            else:
                n = min(cut, len(stream) - pos)
                conn.receive_data(stream[pos : pos + n])
            pos += n
            cut -= n
    got = drain(conn)
    assert messages(got) == [v for v in values if not isinstance(v, dict)]
    assert [ev.data for ev in got if isinstance(ev, InternalMessage)] == [values[3]]


def test_eof_inside_a_large_frame_is_a_truncated_frame() -> None:
    stream, _ = _big_stream()
    conn = opened()
    conn.receive_data(stream[:500_000])
    assert messages(drain(conn)) == [b"x" * 300_000, 1]
    assert conn.receive_buffer() is not None
    conn.received_into(0)  # EOF read into the buffer
    with pytest.raises(ProtocolError, match="truncated frame"):
        conn.next_event()


def test_fds_read_into_a_large_plain_frame_are_unclaimed() -> None:
    stream, _ = _big_stream()
    conn = opened()
    conn.receive_data(stream[:320_000])  # inside the 1 MB frame
    target = conn.receive_buffer()
    assert target is not None
    rest = stream[320_000 : 320_000 + len(target)]
    target[: len(rest)] = rest
    conn.received_into(len(rest), [77])
    with pytest.raises(HandleError, match="no frame claiming"):
        drain(conn)
    assert 77 in conn.unclaimed_fds()


def test_send_encoded_many_cuts_batches_at_value_boundaries() -> None:
    a, b = connected()
    values = [{"i": i, "pad": "x" * (i % 200)} for i in range(3000)]
    a.send_encoded(msgpack.packb("first"))
    a.send_encoded_many([msgpack.packb(v) for v in values])
    a.send_encoded_many([msgpack.packb("one")])
    stream = b"".join(data for data, _ in output(a))
    lengths, pos = [], 0
    while pos < len(stream):
        length = FRAME.unpack_from(stream, pos)[0]
        lengths.append(length)
        pos += FRAME.size + length
    assert len(lengths) >= 5 and max(lengths) <= _protocol.BATCH_TARGET
    b.receive_data(stream)
    assert messages(drain(b)) == ["first", *values, "one"]


@pytest.mark.parametrize("max_size", [None, 64])
def test_send_encoded_many_with_and_without_a_known_size_bound(max_size: int | None) -> None:
    a = make()  # (the hello first in its output)
    values = [f"value {i:05}" for i in range(20_000)]  # 12 bytes each
    small = [msgpack.packb(v) for v in values]
    for k in range(0, 20_000, 5000):  # 60 kB a call: each fits a frame, two do not
        a.send_encoded_many(small[k : k + 5000], max_size)
    a.send_encoded_many(small[:8000], max_size)  # more than a frame holds: cut
    stream = wire(a)
    frames = _frames(stream)
    assert len(frames) >= 6 and all(t == FRAME_BATCH and n <= _protocol.BATCH_TARGET for t, n, _ in frames)
    b = make(pid=20)
    b.receive_data(stream)
    assert messages(drain(b)) == values + values[:8000]


def test_send_encoded_many_queues_nothing_when_one_is_over_the_limit() -> None:
    a, b = connected(max_message_size=100_000)
    before = a.output_size
    with pytest.raises(CodecError, match="exceeds the max_message_size"):
        a.send_encoded_many([msgpack.packb("ok"), msgpack.packb(b"x" * 200_000), msgpack.packb("ok too")])
    assert a.output_size == before
    a.send_encoded_many([msgpack.packb("after")])
    b.receive_data(wire(a))
    assert messages(drain(b)) == ["after"]


def read_done(conn: Connection, data: bytes) -> Message | None:
    """What the blocking frontend does with a round trip's read (no fds):
    lone_message's shortcut, and feed when it declines."""
    message = conn.lone_message(data)
    if message is None:
        conn.feed(data)
    return message


def test_a_round_trips_answer_is_returned_and_the_rest_queued() -> None:
    conn = opened()
    one = frame(FRAME_DATA, msgpack.packb({"n": 1}))
    assert read_done(conn, one) == Message({"n": 1}, None)
    assert drain(conn) == []
    # An internal message is routed, not returned.
    assert read_done(conn, frame(FRAME_DATA, msgpack.packb({"cmd": "IPCBUS_X"}))) is None
    assert [type(ev) for ev in drain(conn)] == [InternalMessage]
    # Two frames, or part of one: queued as receive_data queues them.
    assert read_done(conn, one + one[:5]) is None
    assert read_done(conn, one[5:]) is None
    assert messages(drain(conn)) == [{"n": 1}, {"n": 1}]
    # A payload that does not decode fails the connection.
    assert read_done(conn, frame(FRAME_DATA, b"\xc1")) is None
    with pytest.raises(CodecError):
        conn.next_event()


def test_lone_message_takes_only_a_whole_plain_frame_for_the_application() -> None:
    conn = opened()
    one = frame(FRAME_DATA, msgpack.packb({"n": 1}))
    assert conn.lone_message(one) == Message({"n": 1}, None)
    # Not taken (nothing consumed): an internal message, a value that does
    # not decode, part of a frame, two frames. receive_data then parses them.
    for data in (
        frame(FRAME_DATA, msgpack.packb({"cmd": "IPCBUS_X"})),
        frame(FRAME_DATA, b"\xc1"),
        one[:5],
        one + one,
    ):
        assert conn.lone_message(data) is None
    conn.receive_data(frame(FRAME_DATA, msgpack.packb({"cmd": "IPCBUS_X"})))
    assert [type(ev) for ev in drain(conn)] == [InternalMessage]
    conn.receive_data(one[:5])
    assert conn.lone_message(one[5:]) is None  # a frame is under way
    conn.receive_data(one[5:])
    assert messages(drain(conn)) == [{"n": 1}]
    conn.receive_data(frame(FRAME_DATA, b"\xc1"))
    with pytest.raises(CodecError):
        conn.next_event()


def test_drop_output_hands_back_every_queued_fd_held_frames_too() -> None:
    # A frontend closing its channel closes the duplicated fds of what was
    # never written, including frames held back until authentication.
    conn = make(authkey=KEY, nonce=N1)
    conn.send("held", [(DESC, 60)])
    conn.send("held too", [(DESC, 61), (DESC, 62)], multi=True)
    conn.send_encoded(msgpack.packb("plain"))
    assert sorted(conn.drop_output()) == [60, 61, 62]
    assert conn.drop_output() == []
    a, _ = connected()
    a.send("queued", [(DESC, 63)])
    a.send_encoded(msgpack.packb("plain"))
    assert a.drop_output() == [63]
    assert not a.has_output() and a.output_size == 0 and a.queued_fds == 0


def test_a_withdrawn_release_token_is_neither_released_nor_handed_back() -> None:
    a, b = connected()
    a.send("sent", [(DESC, 70)], release="t1")
    a.send("failed", [(DESC, 71)], release="t2")
    a.withdraw_release("t2")  # its send raised: the caller keeps the handle
    assert a.take_unreleased() == ["t1"]
    a, b = connected()
    a.send("one", [(DESC, 72)], release="t1")
    a.send("two", [(DESC, 73)], release="t2")
    a.withdraw_release("t1")
    pump(a, b)
    drain(b)
    pump(b, a)  # one ACK for both frames: the withdrawn one keeps its place
    assert [t for ev in drain(a) for t in ev.tokens] == ["t2"]
