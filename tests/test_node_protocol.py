"""The sans-IO core of Node's IPC protocol: no sockets, no processes, and the
fds are plain numbers the core never touches. Input is re-fed one byte at a
time wherever chunking could matter (node-ipc.md §2.1)."""

from __future__ import annotations

import ast
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipcbus import ChannelClosed, CodecError, HandleError, Message, ProtocolError
from ipcbus._node_protocol import (
    KIND_NODE_SOCKET,
    MAX_RETRANSMISSIONS,
    NodeConnection,
    NodeJSONCodec,
    is_node_internal,
)
from ipcbus._protocol import NEED_DATA, Closed, HandlesReleased, InternalMessage, RawMessage

# Native descriptors (ipcbus/_handles.py): kind, family, type, listening.
TCP_SERVER = bytes([1, 2, 1, 1])
TCP_SOCKET = bytes([1, 2, 1, 0])
UNIX_SERVER = bytes([1, 1, 1, 1])
UDP4 = bytes([1, 2, 2, 0])
UDP6 = bytes([1, 3, 2, 0])
UNIX_DGRAM = bytes([1, 1, 2, 0])
UNIX_SEQPACKET = bytes([1, 1, 3, 0])
FILE = bytes([2, 9, 0, 0])
BARE_FD = bytes([3, 0, 0, 0])


def conn(**kw: Any) -> NodeConnection:
    return NodeConnection(can_carry_handles=True, **kw)


def output(c: NodeConnection) -> list[tuple[bytes, list[int]]]:
    segs = []
    while (seg := c.take_output()) is not None:
        segs.append((bytes(seg[0]), seg[1]))
    return segs


def out_bytes(c: NodeConnection) -> bytes:
    return b"".join(data for data, _ in output(c))


def events(c: NodeConnection) -> list[Any]:
    evs = []
    while (ev := c.next_event()) is not NEED_DATA:
        evs.append(ev)
        if isinstance(ev, Closed):
            break
    return evs


def feed_bytewise(c: NodeConnection, data: bytes, fds_at: dict[int, list[int]] | None = None) -> None:
    for i in range(len(data)):
        c.receive_data(data[i : i + 1], (fds_at or {}).get(i, ()))


def messages(c: NodeConnection) -> list[Any]:
    return [ev.data for ev in events(c) if type(ev) is Message]


# ------------------------------------------------------------------ writer


def test_NodeJSONCodec_writes_what_JSON_stringify_writes() -> None:
    codec = NodeJSONCodec()
    assert codec.encode({"hello": "world"}) == b'{"hello":"world"}'
    # U+2028/2029 raw (only \n delimits), \n escaped, emoji raw UTF-8.
    assert codec.encode("line1\nline2\u2028\u2029😀") == '"line1\\nline2\u2028\u2029😀"'.encode()
    # A lone surrogate goes out as an escape, as JSON.stringify sends it.
    assert codec.encode({"lone": "\ud800"}) == b'{"lone":"\\ud800"}'
    assert codec.encode(None) == b"null"
    assert codec.encode([1, 2.5, True]) == b"[1,2.5,true]"


@pytest.mark.parametrize(
    "value",
    [float("nan"), {"x": float("inf")}, [float("-inf")], {1: "a"}, {"a": {(1, 2): 3}}, {1, 2}, b"bytes", object()],
)
def test_NodeJSONCodec_refuses_what_JSON_cannot_carry(value: Any) -> None:
    with pytest.raises(CodecError):
        NodeJSONCodec().encode(value)


# Values that a flat dict (string keys, scalar values) may carry, and some
# it may not; keys that need escaping (and a % that must stay literal).
FLAT_VALUES: list[Any] = [
    "plain", 'quote " backslash \\ newline \n tab \t nul \u0000 del \x7f', "é ß 中文 😀 \u2028\u2029",
    "%s %d %%", "", 0, -(2**53) + 1, 10**40, 2.5, -0.0, 1e300, 5e-324, True, False, None,
]
FLAT_KEYS = ("op", 'k "%s" \n\u2028', "é")


def test_NodeJSONCodec_flat_dicts_are_written_as_the_general_path_writes_them() -> None:
    """A dict of a shape seen before takes the codec's flat path: the bytes
    must be those of a codec that has never seen the shape."""
    codec = NodeJSONCodec()
    for value in FLAT_VALUES:
        for other in (FLAT_VALUES[0], value, None):
            message = dict(zip(FLAT_KEYS, (value, other, 1), strict=True))
            expected = NodeJSONCodec().encode(message)
            assert codec.encode(message) == expected
            assert codec.encode(message) == expected
            assert json.loads(expected) == message


@pytest.mark.parametrize(
    "value",
    [
        "\ud800",
        "a\udfffb",
        pytest.param(10**5000, id="int-over-the-digit-limit"),
        float("nan"),
        float("inf"),
        [1, "x"],
        {"k": "v"},
        {1: "v"},
        b"x",
        1 + 2j,
    ],
)
def test_NodeJSONCodec_flat_shape_with_other_values(value: Any) -> None:
    """What a flat shape does not carry takes the general path: escaped,
    written, or refused as the general path does, before and after."""
    codec = NodeJSONCodec()
    flat = {"a": 1, "b": "x"}
    assert codec.encode(flat) == codec.encode(flat) == b'{"a":1,"b":"x"}'
    message = {"a": value, "b": "x"}
    try:
        expected: Any = NodeJSONCodec().encode(message)
    except CodecError:
        expected = CodecError
    if expected is CodecError:
        with pytest.raises(CodecError):
            codec.encode(message)
    else:
        assert codec.encode(message) == expected
    assert codec.encode(flat) == b'{"a":1,"b":"x"}'


def test_NodeJSONCodec_refuses_NaN_when_decoding() -> None:
    with pytest.raises(CodecError):
        NodeJSONCodec().decode(b"NaN")
    assert NodeJSONCodec().decode('{"s":"\\ud800\u2028"}'.encode()) == {"s": "\ud800\u2028"}


def test_NodeConnection_writes_one_line_per_message_never_empty() -> None:
    c = conn()
    for value in [{"a": 1}, "", [], {}, 0, None, "x\ny"]:
        c.send(value)
    data = out_bytes(c)
    lines = data.split(b"\n")
    assert lines[-1] == b""
    assert all(lines[:-1]), "an empty line would kill Node"
    assert [json.loads(line) for line in lines[:-1]] == [{"a": 1}, "", [], {}, 0, None, "x\ny"]


def test_NodeConnection_send_refuses_a_value_before_queuing_anything() -> None:
    c = conn()
    with pytest.raises(CodecError):
        c.send({"bad": float("nan")})
    assert not c.has_output()


def test_NodeConnection_refuses_a_message_over_max_message_size() -> None:
    c = conn(max_message_size=1024)
    with pytest.raises(CodecError, match="1024"):
        c.send("x" * 2000)
    c.send("x" * 1000)
    assert len(out_bytes(c)) == 1003


def test_NodeConnection_is_established_without_a_handshake() -> None:
    c = conn()
    assert c.established and c.state == "OPEN"
    assert c.peer is not None and c.peer.peer_pid is None and not c.peer.authenticated
    assert not c.has_output()  # nothing is written before the first message
    assert c.next_event() is NEED_DATA


# ------------------------------------------------------------------ reader


def test_NodeConnection_reads_messages_byte_at_a_time() -> None:
    values = [{"hello": "world"}, "\u2028\u2029 😀 é", {"nested": {"a": [1, {"b": None}]}}, 42, None]
    stream = b"".join(json.dumps(v, ensure_ascii=False).encode() + b"\n" for v in values)
    c = conn()
    feed_bytewise(c, stream)
    assert messages(c) == values


def test_NodeConnection_reads_several_messages_from_one_chunk() -> None:
    c = conn()
    c.receive_data(b"1\n2\n3\n4")
    assert messages(c) == [1, 2, 3]
    c.receive_data(b"5\n")
    assert messages(c) == [45]


def test_NodeConnection_tolerates_CR_and_whitespace() -> None:
    c = conn()
    feed_bytewise(c, b'{"a":1}\r\n  [2] \t\r\n"x"\n')
    assert messages(c) == [{"a": 1}, [2], "x"]


def test_NodeConnection_reads_a_lone_surrogate_escape() -> None:
    c = conn()
    c.receive_data(b'{"lone":"\\ud800"}\n')
    assert messages(c) == [{"lone": "\ud800"}]


@pytest.mark.parametrize(
    ("stream", "match"),
    [
        (b"1\n\n2\n", "empty line"),
        (b"1\n \r\n2\n", "empty line"),
        (b'1\n{"a":\n', "not valid JSON"),
        (b"1\nNaN\n", "NaN"),
        (b'1\n{"a":Infinity}\n', "Infinity"),
        (b"1\n\xff\xfe\n", "UTF-8"),
        (b"1\n" + b"[" * 3000 + b"\n", "nested too deeply|not valid JSON"),
        (b"1\n2 3\n", "not valid JSON"),
    ],
    ids=["empty", "blank", "truncated", "NaN", "Infinity", "not-utf8", "deep", "two-values"],
)
def test_NodeConnection_bad_input_is_a_ProtocolError_after_the_good(stream: bytes, match: str) -> None:
    for feed in ("whole", "bytewise"):
        c = conn()
        if feed == "whole":
            c.receive_data(stream)
        else:
            feed_bytewise(c, stream)
        ev = c.next_event()
        assert type(ev) is Message and ev.data == 1
        with pytest.raises(ProtocolError, match=match):
            c.next_event()
        with pytest.raises(ProtocolError):  # sticky
            c.next_event()
        with pytest.raises(ProtocolError):
            c.send("more")


def test_NodeConnection_refuses_an_overlong_line_before_its_end() -> None:
    c = conn(max_message_size=1024)
    c.receive_data(b'"' + b"x" * 1000)
    assert c.next_event() is NEED_DATA
    c.receive_data(b"x" * 100)  # no newline yet: refused now, not at the end
    with pytest.raises(ProtocolError, match="max_message_size 1024"):
        c.next_event()


def test_NodeConnection_scans_a_long_line_linearly() -> None:
    # Fed 1 KiB at a time, a 2 MiB line must not be rescanned from its start
    # at every chunk; this would take minutes if it were quadratic.
    c = conn()
    body = b'"' + b"y" * (2 * 1024 * 1024) + b'"\n'
    for i in range(0, len(body), 1024):
        c.receive_data(body[i : i + 1024])
    assert messages(c) == ["y" * (2 * 1024 * 1024)]


def test_NodeConnection_clean_EOF_is_Closed() -> None:
    c = conn()
    c.receive_data(b"1\n \r\n"[:3])
    c.receive_data(b"")
    assert events(c) == [Message(1, None), Closed()]
    c = conn()
    c.receive_data(b"1\n  ")  # whitespace after the last line is no message
    c.receive_data(b"")
    assert isinstance(events(c)[-1], Closed)


def test_NodeConnection_EOF_inside_a_message_is_a_ProtocolError() -> None:
    # Node drops such a tail silently (a child that exits right after a big
    # send, §6 row 5); we say it.
    c = conn()
    c.receive_data(b'1\n{"half":')
    c.receive_data(b"")
    assert c.next_event() == Message(1, None)
    with pytest.raises(ProtocolError, match="EOF inside a message"):
        c.next_event()


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.recursive(
            st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
            max_leaves=8,
        ),
        max_size=12,
    ),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
)
def test_NodeConnection_any_chunking_gives_the_same_messages(values: list[Any], cuts: list[int]) -> None:
    writer = conn()
    for v in values:
        writer.send(v)
    stream = out_bytes(writer)
    reader = conn()
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    for a, b in itertools.pairwise(points):
        reader.receive_data(stream[a:b])
    assert messages(reader) == values


# ------------------------------------------------------------ internal messages


def test_NodeConnection_NODE_messages_never_reach_the_application() -> None:
    c = conn()
    c.receive_data(
        b'{"cmd":"NODE_CLUSTER","act":"online"}\n{"cmd":"NODE_"}\n{"cmd":"NODE_X"}\n'
        b'{"cmd":"node_lower"}\n{"cmd":5}\n"NODE_STRING"\n'
    )
    evs = events(c)
    assert [ev.data for ev in evs if type(ev) is Message] == [
        {"cmd": "NODE_"},  # exactly the prefix is an ordinary message (§4)
        {"cmd": "node_lower"},
        {"cmd": 5},
        "NODE_STRING",
    ]
    internal = [ev for ev in evs if isinstance(ev, InternalMessage)]
    assert [ev.data["cmd"] for ev in internal] == ["NODE_CLUSTER", "NODE_X"]
    assert all(ev.prefix == "NODE_" for ev in internal)
    assert is_node_internal({"cmd": "NODE_X"}) and not is_node_internal({"cmd": "NODE_"})


def test_NodeConnection_application_prefixes_can_be_claimed() -> None:
    c = conn()
    c.claim_prefix("APP_")
    c.claim_prefix("NODE_CLUSTER")
    c.receive_data(b'{"cmd":"APP_PING"}\n{"cmd":"NODE_CLUSTER","seq":1}\n{"cmd":"APPX"}\n')
    evs = events(c)
    assert [(ev.prefix, ev.data["cmd"]) for ev in evs if isinstance(ev, InternalMessage)] == [
        ("APP_", "APP_PING"),
        ("NODE_CLUSTER", "NODE_CLUSTER"),
    ]
    assert [ev.data for ev in evs if type(ev) is Message] == [{"cmd": "APPX"}]


# ------------------------------------------------------------ receiving handles

ACK = b'{"cmd":"NODE_HANDLE_ACK"}\n'
NACK = b'{"cmd":"NODE_HANDLE_NACK"}\n'


def envelope(htype: str, msg: Any = "m", **extra: Any) -> bytes:
    return json.dumps({"cmd": "NODE_HANDLE", "type": htype, "msg": msg, **extra}).encode() + b"\n"


@pytest.mark.parametrize(
    ("htype", "extra", "desc"),
    [
        ("net.Server", {}, bytes([KIND_NODE_SOCKET, 1, 0, 0])),
        ("net.Socket", {"key": "4:127.0.0.1:0"}, bytes([KIND_NODE_SOCKET, 2, 0, 0])),
        ("net.Native", {}, bytes([KIND_NODE_SOCKET, 3, 0, 0])),
        ("dgram.Socket", {"dgramType": "udp4"}, bytes([KIND_NODE_SOCKET, 4, 2, 0])),
        ("dgram.Socket", {"dgramType": "udp6"}, bytes([KIND_NODE_SOCKET, 4, 3, 0])),
        ("dgram.Native", {}, bytes([KIND_NODE_SOCKET, 4, 0, 0])),
    ],
)
def test_NodeConnection_receives_each_envelope_type_with_one_ACK(htype: str, extra: dict, desc: bytes) -> None:
    c = conn()
    line = envelope(htype, {"x": 1}, **extra)
    # The fd rides with the envelope's first byte; feed the rest bytewise.
    feed_bytewise(c, b"0\n" + line + b"1\n", {2: [70]})
    evs = events(c)
    assert evs[0] == Message(0, None)
    assert evs[1] == RawMessage({"x": 1}, [(desc, 70)], False)
    assert evs[2] == Message(1, None)
    assert out_bytes(c) == ACK


def test_NodeConnection_NACKs_and_drops_an_envelope_without_fd() -> None:
    c = conn()
    c.receive_data(envelope("net.Server") + b'"after"\n')
    assert messages(c) == ["after"]
    assert out_bytes(c) == NACK


def test_NodeConnection_an_fd_belongs_to_an_envelope_in_its_own_chunk() -> None:
    # The fd-less envelope came before the chunk that carried the fd: NACK,
    # and the fd goes to the envelope that arrived with it.
    c = conn()
    c.receive_data(envelope("net.Server", "first")[:10])
    c.receive_data(envelope("net.Server", "first")[10:] + envelope("net.Socket", "second"), [71])
    evs = events(c)
    assert [type(ev) for ev in evs] == [RawMessage]
    assert evs[0].data == "second" and evs[0].handles[0][1] == 71
    assert out_bytes(c) == NACK + ACK


def test_NodeConnection_keeps_a_stray_fd_for_the_next_envelope() -> None:
    # As Node does: an fd that came with a plain message waits for the next
    # NODE_HANDLE, even one arriving without an fd (§3.2).
    c = conn()
    c.receive_data(b'"plain"\n', [72])
    c.receive_data(envelope("net.Native", "later"))
    evs = events(c)
    assert evs[0] == Message("plain", None)
    assert evs[1].handles == [(bytes([KIND_NODE_SOCKET, 3, 0, 0]), 72)]
    assert out_bytes(c) == ACK


def test_NodeConnection_accepts_the_nested_resend_form_with_one_ACK() -> None:
    inner = {"cmd": "NODE_HANDLE", "type": "net.Socket", "msg": {"user": 1}, "key": "k"}
    line = json.dumps({"cmd": "NODE_HANDLE", "type": "net.Native", "msg": inner}).encode() + b"\n"
    c = conn()
    c.receive_data(line, [73])
    evs = events(c)
    assert evs == [RawMessage({"user": 1}, [(bytes([KIND_NODE_SOCKET, 2, 0, 0]), 73)], False)]
    assert out_bytes(c) == ACK


def test_NodeConnection_cluster_style_internal_message_with_a_handle() -> None:
    line = envelope("net.Native", {"cmd": "NODE_CLUSTER", "act": "newconn", "seq": 2})
    c = conn()
    c.receive_data(line, [74])
    (ev,) = events(c)
    assert isinstance(ev, InternalMessage) and ev.prefix == "NODE_"
    assert ev.data["act"] == "newconn" and ev.handles[0][1] == 74
    assert out_bytes(c) == ACK


def test_NodeConnection_unknown_envelope_type_is_an_error_and_keeps_the_fd() -> None:
    c = conn()
    c.receive_data(envelope("net.Bogus"), [75])
    with pytest.raises(ProtocolError, match=r"net\.Bogus"):
        c.next_event()
    assert c.unclaimed_fds() == [75]  # the frontend closes it


def test_NodeConnection_two_fds_in_one_write_is_a_HandleError() -> None:
    c = conn()
    c.receive_data(envelope("net.Server"), [76, 77])
    with pytest.raises(HandleError, match="2 fds"):
        c.next_event()
    assert sorted(c.unclaimed_fds()) == [76, 77]


def test_NodeConnection_bounds_fds_nobody_claims() -> None:
    c = conn()
    for fd in range(100, 117):
        c.receive_data(b"1\n", [fd])
    with pytest.raises(HandleError, match="no NODE_HANDLE"):
        events(c)
    assert len(c.unclaimed_fds()) == 17


def test_NodeConnection_fd_with_no_envelope_at_EOF_is_an_error() -> None:
    c = conn()
    c.receive_data(b"1\n", [78])
    c.receive_data(b"")
    assert c.next_event() == Message(1, None)
    with pytest.raises(HandleError):
        c.next_event()
    assert c.unclaimed_fds() == [78]


# ------------------------------------------------------------ sending handles


@pytest.mark.parametrize(
    ("desc", "htype", "dgram"),
    [
        (TCP_SERVER, "net.Server", None),
        (UNIX_SERVER, "net.Server", None),
        (TCP_SOCKET, "net.Socket", None),
        (UDP4, "dgram.Socket", "udp4"),
        (UDP6, "dgram.Socket", "udp6"),
    ],
)
def test_NodeConnection_sends_an_envelope_with_one_fd(desc: bytes, htype: str, dgram: str | None) -> None:
    c = conn()
    c.send("before")
    c.send({"k": "v"}, [(desc, 9)])
    segs = output(c)
    assert segs[0] == (b'"before"\n', [])
    line, fds = segs[1]
    assert fds == [9]
    env = json.loads(line)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert env["cmd"] == "NODE_HANDLE" and env["type"] == htype and env["msg"] == {"k": "v"}
    assert env.get("dgramType") == dgram


@pytest.mark.parametrize("desc", [FILE, BARE_FD, UNIX_DGRAM, UNIX_SEQPACKET, b"\x01\x09\x01\x00"])
def test_NodeConnection_refuses_kinds_Node_cannot_take(desc: bytes) -> None:
    c = conn()
    with pytest.raises(HandleError):
        c.send("x", [(desc, 9)])
    assert not c.has_output() and not c.awaiting_ack


def test_NodeConnection_refuses_two_handles_and_channels_without_fd_passing() -> None:
    c = conn()
    with pytest.raises(HandleError, match="one handle"):
        c.send("x", [(TCP_SERVER, 9), (TCP_SERVER, 10)])
    assert not c.has_output()
    c = NodeConnection(can_carry_handles=False)
    with pytest.raises(HandleError):
        c.send("x", [(TCP_SERVER, 9)])


def test_NodeConnection_holds_every_later_message_until_the_ACK() -> None:
    c = conn()
    c.send("h1", [(TCP_SERVER, 9)], release="token1")
    c.send("m1")
    c.send_encoded(b'"m2"')
    c.send("h2", [(UDP4, 10)])
    c.send("m3")
    assert c.awaiting_ack
    assert [fds for _, fds in output(c)] == [[9]]
    # Our own ACK for a handle the peer sent goes out meanwhile (exempt).
    c.receive_data(envelope("net.Server", "theirs"), [80])
    assert out_bytes(c) == ACK
    events(c)
    c.receive_data(ACK)
    assert [ev for ev in events(c) if isinstance(ev, HandlesReleased)] == [HandlesReleased(["token1"])]
    segs = output(c)
    assert b"".join(d for d, _ in segs) == b'"m1"\n"m2"\n' + segs[-1][0]
    assert segs[-1][1] == [10] and json.loads(segs[-1][0])["msg"] == "h2"
    assert c.awaiting_ack
    c.receive_data(ACK)
    assert out_bytes(c) == b'"m3"\n'
    assert not c.awaiting_ack


def test_NodeConnection_NACK_resends_then_fails() -> None:
    c = conn()
    c.send("h", [(TCP_SOCKET, 9)], release="tok")
    first = output(c)
    for _ in range(MAX_RETRANSMISSIONS):
        c.receive_data(NACK)
        assert output(c) == first  # the same envelope and fd again
    c.send("queued")
    c.receive_data(NACK)
    assert c.next_event() == HandlesReleased(["tok"])
    with pytest.raises(HandleError, match="NACK"):
        c.next_event()
    assert not c.has_output()


def test_NodeConnection_tolerates_a_surplus_ACK() -> None:
    c = conn()
    c.receive_data(ACK + b'"still fine"\n')
    assert messages(c) == ["still fine"]
    c.send("h", [(TCP_SERVER, 9)])
    c.receive_data(ACK + ACK)
    assert not c.awaiting_ack
    c.send("after")
    assert out_bytes(c).endswith(b'"after"\n')


def test_NodeConnection_take_unreleased_returns_unanswered_tokens() -> None:
    c = conn()
    c.send("a", [(TCP_SERVER, 9)], release="t1")
    c.send("b", [(TCP_SERVER, 10)], release="t2")
    c.send("c", [(TCP_SERVER, 11)])
    c.close_sending()
    assert c.take_unreleased() == ["t1", "t2"]
    with pytest.raises(ChannelClosed):
        c.send("d")


# ------------------------------------------------------------ socket lists


class FakeSocket:
    def __init__(self) -> None:
        self.fd = 5

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        self.fd = -1


def receive_keyed(c: NodeConnection, key: str, fd: int) -> FakeSocket:
    c.receive_data(envelope("net.Socket", "conn", key=key), [fd])
    (ev,) = [ev for ev in events(c) if isinstance(ev, RawMessage)]
    sock = FakeSocket()
    c.on_restored(ev, [sock])
    return sock


def test_NodeConnection_answers_socket_counts_and_close_notifications() -> None:
    c = conn()
    a = receive_keyed(c, "4:127.0.0.1:0", 90)
    b = receive_keyed(c, "4:127.0.0.1:0", 91)
    output(c)
    c.receive_data(b'{"cmd":"NODE_SOCKET_GET_COUNT","key":"4:127.0.0.1:0"}\n')
    events(c)
    assert json.loads(out_bytes(c)) == {"cmd": "NODE_SOCKET_COUNT", "key": "4:127.0.0.1:0", "count": 2}
    c.receive_data(b'{"cmd":"NODE_SOCKET_NOTIFY_CLOSE","key":"4:127.0.0.1:0"}\n')
    assert events(c) == []
    assert out_bytes(c) == b""  # two are still open
    a.close()
    assert c.next_event() is NEED_DATA
    assert out_bytes(c) == b""
    b.close()
    assert c.next_event() is NEED_DATA  # the frontend's next wait for data
    assert json.loads(out_bytes(c)) == {"cmd": "NODE_SOCKET_ALL_CLOSED", "key": "4:127.0.0.1:0"}


def test_NodeConnection_answers_for_keys_it_never_saw() -> None:
    c = conn()
    c.receive_data(b'{"cmd":"NODE_SOCKET_NOTIFY_CLOSE","key":"k"}\n{"cmd":"NODE_SOCKET_GET_COUNT","key":"k"}\n')
    assert events(c) == []
    lines = out_bytes(c).splitlines()
    assert [json.loads(x) for x in lines] == [
        {"cmd": "NODE_SOCKET_ALL_CLOSED", "key": "k"},
        {"cmd": "NODE_SOCKET_COUNT", "key": "k", "count": 0},
    ]


# ------------------------------------------------------------ no I/O


def test_node_protocol_core_imports_nothing_that_does_IO() -> None:
    source = Path(__file__).parent.parent / "ipcbus" / "_node_protocol.py"
    tree = ast.parse(source.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add((node.module or "").split(".")[0])
    assert not imported & {"os", "socket", "select", "selectors", "trio", "subprocess", "threading", "asyncio"}


def test_send_encoded_many_is_lines_in_order_and_all_or_nothing() -> None:
    c = conn(max_message_size=1024)
    c.send_encoded_many([b'"a"', b'{"b":1}'])
    c.send_encoded_many([b"1", b"2"], 16)  # a size bound the caller knows
    assert out_bytes(c) == b'"a"\n{"b":1}\n1\n2\n'
    with pytest.raises(CodecError, match="exceeds the max_message_size"):
        c.send_encoded_many([b'"fine"', b'"' + b"x" * 2000 + b'"'])
    assert c.output_size == 0 and out_bytes(c) == b""
