"""Built-in codecs: round trips, refusals at send, pickle's trust rule, and
codec agreement in the handshake."""

from __future__ import annotations

import math
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ipcbus
from ipcbus.codecs import JSONCodec, MsgpackCodec, PickleCodec, RawCodec, available_codecs, get_codec

MSGPACK_SAMPLES: list[Any] = [
    None, True, False, 0, -1, 2**64 - 1, -(2**63), 1.5, -0.0, math.inf, "", "héllo ☃", b"", b"\x00\xff",
    [], [1, [2, [3]]], {}, {"a": {"b": [1, b"x"]}}, {1: "int key", b"k": "bytes key"}, "x" * 100_000,
]
JSON_SAMPLES: list[Any] = [
    None, True, 0, -1, 10**30, 1.5, 1e300, "", "héllo ☃ \u2028", "\ud800", [], [1, [2]], {}, {"a": {"b": [1, "x"]}},
]
PICKLE_SAMPLES: list[Any] = [*MSGPACK_SAMPLES, (1, 2), {1, 2}, frozenset({"a"}), complex(1, 2), range(3), math.nan]
RAW_SAMPLES: list[Any] = [b"", b"\x00", b"x" * 100_000]


def _local_url(tmp_path: Path, name: str) -> str:
    """A listener address on this machine: a Unix socket, or on Windows a
    named pipe (the trust and agreement rules are the same on both)."""
    if sys.platform == "win32":
        return f"pipe://ipcbus-test-{uuid.uuid4().hex}"
    return f"unix://{tmp_path}/{name}"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b and type(a) is type(b)


@pytest.mark.parametrize(
    "codec, samples",
    [("msgpack", MSGPACK_SAMPLES), ("json", JSON_SAMPLES), ("pickle", PICKLE_SAMPLES), ("raw", RAW_SAMPLES)],
)
def test_builtin_round_trip_through_a_channel(codec: str, samples: list[Any]) -> None:
    a, b = ipcbus.pair(codec=codec)
    with a, b:
        for value in samples:
            a.send(value)
        got = [b.recv(timeout=10).data for _ in samples]
    for value, back in zip(samples, got, strict=True):
        assert _same(value, back), (value, back)


@settings(max_examples=50, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=20,
))
def test_json_round_trip(value: Any) -> None:
    codec = JSONCodec()
    assert codec.decode(memoryview(codec.encode(value))) == value


@settings(max_examples=50, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text()
    | st.binary(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text() | st.integers(0, 100), inner),
    max_leaves=20,
))
def test_msgpack_round_trip(value: Any) -> None:
    codec = MsgpackCodec()
    assert codec.decode(bytearray(codec.encode(value))) == value


def test_tuples_arrive_as_lists() -> None:
    assert MsgpackCodec().decode(MsgpackCodec().encode((1, (2,)))) == [1, [2]]
    assert JSONCodec().decode(JSONCodec().encode((1, (2,)))) == [1, [2]]


@pytest.mark.parametrize(
    "value, match",
    [
        (math.nan, "nan"),
        (math.inf, "inf"),
        ([1, {"x": -math.inf}], "inf"),
        (b"bytes", "bytes"),
        ({"ok": [bytearray(b"x")]}, "bytearray"),
        ({1: "int key"}, "int map key"),
        ({"a": {(1, 2): "tuple key"}}, "tuple map key"),
        ({None: 1}, "NoneType map key"),
        ({1, 2}, "set"),
        (object(), "object"),
    ],
)
def test_json_refuses_at_send(value: Any, match: str) -> None:
    a, b = ipcbus.pair(codec="json")
    with a, b:
        with pytest.raises(ipcbus.CodecError, match=match):
            a.send(value)
        # Nothing was sent and the channel still works.
        a.send("fine")
        assert b.recv(timeout=10).data == "fine"


def test_json_never_emits_nan_or_infinity() -> None:
    codec = JSONCodec()
    for value in (math.nan, -math.inf, [math.inf], {"x": math.nan}):
        with pytest.raises(ipcbus.CodecError):
            codec.encode(value)
    text = codec.encode({"big": 1e308, "small": -1e-308, "l": [1.0] * 3})
    assert b"NaN" not in text and b"Infinity" not in text


def test_json_decode_errors() -> None:
    with pytest.raises(ipcbus.CodecError, match="undecodable json"):
        JSONCodec().decode(b"{not json")
    with pytest.raises(ipcbus.CodecError, match="undecodable json"):
        JSONCodec().decode(b"\xff\xfe")


def test_msgpack_refuses_unencodable_values() -> None:
    for value in ({1, 2}, object(), 2**64):
        with pytest.raises(ipcbus.CodecError, match="msgpack cannot encode"):
            MsgpackCodec().encode(value)
    with pytest.raises(ipcbus.CodecError, match="undecodable msgpack"):
        MsgpackCodec().decode(b"\xc1")


def test_raw_carries_bytes_only() -> None:
    a, b = ipcbus.pair(codec="raw")
    with a, b:
        for bad in ("text", 1, [b"x"], None):
            with pytest.raises(ipcbus.CodecError, match="bytes only"):
                a.send(bad)
        a.send(bytearray(b"ba"))
        a.send(memoryview(b"mv"))
        assert [b.recv(timeout=10).data for _ in range(2)] == [b"ba", b"mv"]
    assert RawCodec().decode(memoryview(b"x")) == b"x"


def test_pickle_decode_error_is_a_codec_error() -> None:
    with pytest.raises(ipcbus.CodecError, match="undecodable pickle"):
        PickleCodec().decode(b"not a pickle")
    with pytest.raises(ipcbus.CodecError, match="pickle cannot encode"):
        PickleCodec().encode(threading.Lock())


# --------------------------------------------------------------- pickle trust


def test_pickle_refused_on_listen_without_a_key(tmp_path: Path) -> None:
    with pytest.raises(ipcbus.CodecError, match="pickle"):
        ipcbus.listen(_local_url(tmp_path, "p.sock"), codec="pickle")
    assert not (tmp_path / "p.sock").exists()  # nothing left listening


def test_pickle_refused_on_connect_without_a_key(tmp_path: Path) -> None:
    with ipcbus.listen(_local_url(tmp_path, "p.sock")) as listener:
        with pytest.raises(ipcbus.CodecError, match="pickle"):
            ipcbus.connect(listener.address, codec="pickle")
        # The refused client's socket was closed: the server sees it leave.
        with listener.accept(timeout=10) as ch, pytest.raises((ipcbus.ChannelClosed, ipcbus.HandshakeError)):
            ch.recv(timeout=10)


def test_pickle_allowed_with_a_key_on_listen_and_connect(tmp_path: Path) -> None:
    with ipcbus.listen(_local_url(tmp_path, "p.sock"), codec="pickle", authkey=b"secret") as listener:
        box: list[Any] = []

        def client() -> None:
            with ipcbus.connect(listener.address, codec="pickle", authkey=b"secret") as ch:
                ch.send({1, 2, 3})
                box.append(ch.recv(timeout=10).data)

        t = threading.Thread(target=client)
        t.start()
        with listener.accept(timeout=10) as ch:
            assert ch.recv(timeout=10).data == {1, 2, 3}
            assert ch.authenticated
            ch.send(("tuple", 1))
            t.join(10)
    assert box == [("tuple", 1)]


def test_pickle_allowed_on_pair() -> None:
    a, b = ipcbus.pair(codec="pickle")
    with a, b:
        a.send(complex(1, 2))
        assert b.recv(timeout=10).data == complex(1, 2)


# ------------------------------------------------------------ codec agreement


def test_codec_mismatch_is_a_handshake_error_naming_both(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def client(address: str) -> None:
        try:
            ipcbus.connect(address, codec="json")
        except ipcbus.IPCError as exc:
            errors.append(exc)

    with ipcbus.listen(_local_url(tmp_path, "m.sock"), codec="msgpack") as listener:
        t = threading.Thread(target=client, args=(listener.address,))
        t.start()
        with listener.accept(timeout=10) as ch, pytest.raises(ipcbus.HandshakeError) as server_err:
            ch.recv(timeout=10)
        t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], ipcbus.HandshakeError)
    for err in (errors[0], server_err.value):
        assert "'msgpack'" in str(err) and "'json'" in str(err)


def test_codec_mismatch_on_a_pair_of_different_codecs() -> None:
    # Both ends of one socket, built by hand with different codecs.
    import socket

    from ipcbus._channel import Channel
    from ipcbus.transports import SocketStream

    s1, s2 = socket.socketpair()
    a = Channel._open(SocketStream(s1, name="socketpair", trusted=True), "peer", codec="raw")
    b = Channel._open(SocketStream(s2, name="socketpair", trusted=True), "peer", codec="pickle")
    with a, b:
        for ch in (a, b):
            with pytest.raises(ipcbus.HandshakeError, match=r"'raw'.*'pickle'|'pickle'.*'raw'"):
                ch.recv(timeout=10)


# ------------------------------------------------------------------- registry


def test_unknown_codec_names_the_available_ones() -> None:
    with pytest.raises(ipcbus.CodecError, match=r"unknown codec 'nope'.*json.*msgpack.*pickle.*raw"):
        get_codec("nope")
    assert {"json", "msgpack", "pickle", "raw"} <= set(available_codecs())


def test_each_channel_gets_its_own_codec_instance() -> None:
    assert get_codec("msgpack") is not get_codec("msgpack")
    codec = JSONCodec()
    assert get_codec(codec) is codec
    with pytest.raises(TypeError):
        get_codec(42)  # type: ignore[arg-type]


def test_register_codec() -> None:
    class Upper:
        name = "test-upper-codec"

        def encode(self, value: Any) -> bytes:
            return value.upper().encode()

        def decode(self, data: Any) -> Any:
            return bytes(data).decode()

    ipcbus.register_codec("test-upper-codec", Upper)
    with pytest.raises(ValueError, match="already registered"):
        ipcbus.register_codec("test-upper-codec", Upper)
    ipcbus.register_codec("test-upper-codec", Upper, replace=True)
    a, b = ipcbus.pair(codec="test-upper-codec")
    with a, b:
        a.send("shout")
        assert b.recv(timeout=10).data == "SHOUT"
    ipcbus.register_codec("test-misnamed-codec", Upper)
    with pytest.raises(ipcbus.CodecError, match="calls itself"):
        get_codec("test-misnamed-codec")
    with pytest.raises(ValueError):
        ipcbus.register_codec("", Upper)
