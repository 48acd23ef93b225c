"""The msgpack codec's C encoder and decoders (ipcbus._speedups.MsgpackPack,
MsgpackUnpackb, MsgpackValues) against msgpack itself.

They must be invisible: the same bytes out of the encoder as
``msgpack.Packer(use_bin_type=True).pack``, the same values (and, for data
they leave to msgpack, the same errors and positions) out of the decoders as
``msgpack.unpackb`` and ``msgpack.Unpacker``. Each is compared with msgpack
on generated values, on the edges of every size class, on values outside
what the C code handles (which msgpack must then handle), and on damaged
bytes. Where the accelerator was not built the tests skip, except under
``IPCBUS_REQUIRE_SPEEDUPS=1`` (CI sets it), where that is a failure.
"""

from __future__ import annotations

import datetime
import functools
import gc
import math
import random
import sys
import tracemalloc
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ipcbus
from ipcbus._fastpath import ACCELERATED, msgpack_pack, msgpack_unpackb, msgpack_values
from ipcbus.codecs import MsgpackCodec, _values_from, get_codec

REFERENCE_PACK = msgpack.Packer(use_bin_type=True).pack
REFERENCE_UNPACKB = functools.partial(msgpack.unpackb, strict_map_key=False)
# (The speedups fixture is the same module for every example.)
HEALTH = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]


def outcome(fn: Callable[..., Any], *args: Any) -> str:
    """What fn(*args) gives, as text: the value's repr (with its type, so
    that 1 and True, or a tuple and a list, differ; NaN equals NaN), or the
    exception's type and message."""
    try:
        value = fn(*args)
    except Exception as exc:
        return f"raised {type(exc).__name__}: {exc}"
    return typed_repr(value)


def typed_repr(value: Any) -> str:
    if isinstance(value, dict):
        items = ", ".join(f"{typed_repr(k)}: {typed_repr(v)}" for k, v in value.items())
        return f"{type(value).__name__}{{{items}}}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}[{', '.join(map(typed_repr, value))}]"
    return f"{type(value).__name__}({value!r})"


def reference_values(data: bytes) -> list[str]:
    """msgpack's own reading of the values in data, one unpack() at a time,
    as text; "cut short" for a last value that the end of data cuts."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    out = []
    try:
        while unpacker.tell() < len(data):
            out.append(typed_repr(unpacker.unpack()))
    except msgpack.OutOfData:
        out.append("cut short")
    except Exception as exc:
        out.append(f"raised {type(exc).__name__}: {exc}")
    return out


def drain(values: Iterator[Any]) -> list[str]:
    """Every value of an iterator as text, then the error that ended it."""
    out = []
    try:
        for value in values:
            out.append(typed_repr(value))
    except ValueError as exc:
        out.append("cut short" if "ends inside a value" in str(exc) else f"raised {type(exc).__name__}: {exc}")
    except Exception as exc:
        out.append(f"raised {type(exc).__name__}: {exc}")
    return out


def batch_values(speedups: Any, data: bytes) -> list[str]:
    # The C batch decoder and the Python one (its fallback) must both read
    # data as msgpack does.
    c_read, python_read = drain(speedups.MsgpackValues(data, _values_from)), drain(_values_from(data, 0))
    assert c_read == python_read, data
    return c_read


# Values of every kind the C code handles, with the edges of each size class.
EDGE_INTS = [
    0, 1, 31, 32, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1,
    -1, -31, -32, -33, -127, -128, -129, -32767, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63),
]
EDGE_SIZES = [0, 1, 15, 16, 31, 32, 255, 256, 65535, 65536]
EDGE_VALUES: list[Any] = [
    None, True, False, 0.0, -0.0, 1.5, math.inf, -math.inf, math.nan, 1e308, 5e-324,
    *EDGE_INTS,
    *("x" * n for n in EDGE_SIZES),
    *(b"y" * n for n in EDGE_SIZES),
    *([1] * n for n in (0, 15, 16, 65535, 65536, 70000)),
    *((None,) * n for n in (0, 15, 16)),
    *({i: i for i in range(n)} for n in (0, 15, 16, 65536, 70000)),
    "é" * 20, "日本語", "\U0001f600", "x" * 5000, "é" * 5000, b"z" * 70000,
    {"op": "put", "key": "k12345", "value": 123456, "ok": True, "n": 7},
    {1: "int key", b"bin": 2, None: 3, 1.5: 4, (1, 2): "tuple key", "é": "non-ASCII key", "k" * 40: "long key"},
    [[[]], {"a": {"b": {"c": [1, 2, {"d": None}]}}}],
]

# Values the C encoder leaves to msgpack: the result (or error) must be msgpack's.
OUTSIDE_VALUES: list[Any] = [
    2**64, -(2**63) - 1, 10**30,
    "\ud800", "ok" + "\udfff" * 3000, {"a": "\ud800"},
    bytearray(b"ab"), memoryview(b"cd"),
    msgpack.ExtType(5, b"ext"), msgpack.Timestamp(1, 2),
    {1, 2}, frozenset(), object(), datetime.datetime(2020, 1, 1), 1j,
    OrderedDict(a=1), type("Str", (str,), {})("sub"), type("Int", (int,), {})(3), True.__class__(1),
    [1, 2, {3}], {"k": [object()]},
]


def nested(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


keys = st.one_of(
    st.text(max_size=30), st.integers(min_value=-(2**63), max_value=2**64 - 1), st.binary(max_size=10),
    st.none(), st.booleans(), st.floats(allow_nan=False),
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(), st.floats(width=32), st.text(), st.binary(),
)


def trees(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=20), st.lists(children, max_size=5).map(tuple),
            st.dictionaries(keys, children, max_size=20),
        ),
        max_leaves=60,
    )


# What msgpack can encode, and (for the encoder) also what it cannot: ints
# of any size, surrogates, sets, subclasses, ext types.
values = trees(scalars)
any_values = trees(
    scalars | st.integers() | st.text(st.characters(categories=["Cs", "Ll"])) | st.sampled_from(OUTSIDE_VALUES)
)


# ------------------------------------------------------------------ encoder


def test_the_encoder_gives_msgpacks_bytes_for_every_edge(speedups: Any) -> None:
    pack = speedups.MsgpackPack(REFERENCE_PACK)
    for value in EDGE_VALUES + [nested(d) for d in (1, 31, 32, 33, 100)]:
        assert pack(value) == REFERENCE_PACK(value), typed_repr(value)[:200]


def test_values_outside_the_c_encoder_get_msgpacks_result_or_error(speedups: Any) -> None:
    pack = speedups.MsgpackPack(REFERENCE_PACK)
    for value in [*OUTSIDE_VALUES, nested(600)]:
        assert outcome(pack, value) == outcome(REFERENCE_PACK, value), repr(value)[:200]


@settings(max_examples=300, deadline=None, suppress_health_check=HEALTH)
@given(value=any_values)
def test_the_encoder_gives_msgpacks_bytes(speedups: Any, value: Any) -> None:
    pack = speedups.MsgpackPack(REFERENCE_PACK)
    assert outcome(pack, value) == outcome(REFERENCE_PACK, value)


def test_the_encoder_calls_msgpack_for_what_it_does_not_take(speedups: Any) -> None:
    calls = []

    def fallback(value: Any) -> bytes:
        calls.append(value)
        return b"fallback"

    pack = speedups.MsgpackPack(fallback)
    assert pack({"a": [1, "b", b"c", 1.5, None]}) == REFERENCE_PACK({"a": [1, "b", b"c", 1.5, None]})
    assert calls == []
    ext = msgpack.ExtType(1, b"")
    assert pack([1, ext]) == b"fallback"  # the whole value, not its rest
    assert calls == [[1, ext]]
    with pytest.raises(TypeError):
        pack()  # other calls: the fallback's own
    with pytest.raises(TypeError, match="callable"):
        speedups.MsgpackPack(42)


def test_the_encoders_buffer_does_not_carry_over(speedups: Any) -> None:
    # A big value, then a small one, then one that fails half-way: each
    # result is its own value's bytes alone.
    pack = speedups.MsgpackPack(REFERENCE_PACK)
    big = [b"x" * 1000] * 200
    assert pack(big) == REFERENCE_PACK(big)
    assert pack({"a": 1}) == REFERENCE_PACK({"a": 1})
    with pytest.raises(TypeError):
        pack(["partly encoded", {1, 2}])
    assert pack("after") == REFERENCE_PACK("after")


def test_the_codec_uses_the_accelerator_unless_it_is_switched_off(speedups: Any) -> None:
    codec = get_codec("msgpack")
    data = REFERENCE_PACK({"a": 1}) * 3
    assert (type(codec._pack) is speedups.MsgpackPack) is ACCELERATED
    assert (type(codec._unpackb) is speedups.MsgpackUnpackb) is ACCELERATED
    assert (type(MsgpackCodec._batch_values(data)) is speedups.MsgpackValues) is ACCELERATED
    assert (type(msgpack_values(memoryview(data), _values_from)) is speedups.MsgpackValues) is ACCELERATED
    with pytest.raises(ipcbus.CodecError, match="msgpack cannot encode set"):
        codec.encode({1})
    with pytest.raises(ipcbus.CodecError, match="ends inside a value"):
        codec.decode_batch(data[:-1])


def test_without_the_accelerator_the_codec_uses_msgpack_itself() -> None:
    if ACCELERATED:
        assert msgpack_pack(REFERENCE_PACK) is not REFERENCE_PACK
    else:
        assert msgpack_pack(REFERENCE_PACK) is REFERENCE_PACK
        assert msgpack_unpackb(REFERENCE_UNPACKB) is REFERENCE_UNPACKB
        assert type(MsgpackCodec()._pack) is type(REFERENCE_PACK)


# ------------------------------------------------------------------ decoders


def test_the_decoders_give_msgpacks_values_for_every_edge(speedups: Any) -> None:
    unpackb = speedups.MsgpackUnpackb(REFERENCE_UNPACKB)
    for value in EDGE_VALUES + OUTSIDE_VALUES[7:10] + [nested(d) for d in (1, 31, 32, 33, 100)]:
        data = msgpack.packb(value, use_bin_type=True, default=lambda v: msgpack.ExtType(9, b""))
        assert outcome(unpackb, data) == outcome(REFERENCE_UNPACKB, data), typed_repr(value)[:200]
    # One batch of all of them: the same values, and the same end.
    batch = b"".join(msgpack.packb(v, use_bin_type=True) for v in EDGE_VALUES + OUTSIDE_VALUES[7:10])
    assert batch_values(speedups, batch) == reference_values(batch)


@settings(max_examples=300, deadline=None, suppress_health_check=HEALTH)
@given(items=st.lists(values, min_size=1, max_size=5))
def test_the_decoders_give_msgpacks_values(speedups: Any, items: list[Any]) -> None:
    encoded = [REFERENCE_PACK(v) for v in items]
    unpackb = speedups.MsgpackUnpackb(REFERENCE_UNPACKB)
    for data in encoded:
        assert outcome(unpackb, data) == outcome(REFERENCE_UNPACKB, data)
    batch = b"".join(encoded)
    assert batch_values(speedups, batch) == reference_values(batch)


def damaged(data: bytes, rng: random.Random) -> bytes:
    # Cut short, bytes replaced, or bytes inserted: what a broken or hostile
    # peer could send.
    out = bytearray(data[: rng.randrange(1, len(data) + 1)] if rng.random() < 0.5 else data)
    for _ in range(rng.randrange(0, 4)):
        at = rng.randrange(len(out) + 1)
        if rng.random() < 0.7 and at < len(out):
            out[at] = rng.randrange(256)
        else:
            out[at:at] = bytes([rng.choice([0xC1, 0xC7, 0xD4, 0xDD, 0xDF, 0xDB, 0xC6, 0xFF, 0x80, 0x9F])])
    return bytes(out)


def test_damaged_bytes_give_msgpacks_values_errors_and_positions(speedups: Any) -> None:
    rng = random.Random(20261127)
    unpackb = speedups.MsgpackUnpackb(REFERENCE_UNPACKB)
    sample = [v for v in EDGE_VALUES if len(REFERENCE_PACK(v)) < 80] + OUTSIDE_VALUES[7:10]
    clean = b"".join(msgpack.packb(v, use_bin_type=True) for v in sample)
    for _ in range(4000):
        start = rng.randrange(len(clean))
        data = damaged(clean[start : start + rng.randrange(1, 200)], rng)
        assert batch_values(speedups, data) == reference_values(data), data
        assert outcome(unpackb, data) == outcome(REFERENCE_UNPACKB, data), data
    for _ in range(4000):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        assert batch_values(speedups, data) == reference_values(data), data
        assert outcome(unpackb, data) == outcome(REFERENCE_UNPACKB, data), data


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\xdd\xff\xff\xff\xff", "an array of 4 G values in 5 bytes"),
        (b"\xdc\xff\xff" + b"\x01" * 100, "an array of 65535 values in 103 bytes"),
        (b"\xde\xff\xff" + b"\x01" * 100, "a map of 65535 pairs in 103 bytes"),
        (b"\xdf\xff\xff\xff\xff\x01", "a map of 4 G pairs in 6 bytes"),
        (b"\xdb\xff\xff\xff\xff" + b"x" * 10, "a str of 4 GiB in 15 bytes"),
        (b"\xc6\x7f\xff\xff\xff", "a bin of 2 GiB in 5 bytes"),
        (b"\x91" * 100_000, "arrays nested 100,000 deep"),
        (b"\x81\x91\x01\x02", "a map key that is an array (unhashable)"),
        (b"\x81\x81\x01\x02\x03", "a map key that is a map (unhashable)"),
        (b"\xa3\xff\xfe\xfd", "a str that is not UTF-8"),
        (b"\x82\xa1a\x01\xa3\xed\xa0\x80\x02", "a map key that is not UTF-8"),
        (b"\xc1", "the byte msgpack never uses"),
    ],
)
def test_hostile_lengths_and_shapes_are_msgpacks_errors(speedups: Any, data: bytes, why: str) -> None:
    # Nothing is allocated for a length the data cannot hold: the C decoder
    # leaves such data to msgpack, whose error it then is.
    unpackb = speedups.MsgpackUnpackb(REFERENCE_UNPACKB)
    assert outcome(unpackb, data) == outcome(REFERENCE_UNPACKB, data), why
    assert batch_values(speedups, data) == reference_values(data), why
    tracemalloc.start()
    try:
        outcome(unpackb, data)
        drain(speedups.MsgpackValues(data, _values_from))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 + 2 * len(data), f"{why}: {peak} bytes allocated"


def test_the_batch_decoder_hands_the_rest_over_at_the_first_value_it_leaves(speedups: Any) -> None:
    calls = []

    def rest(data: bytes, offset: int) -> Iterator[Any]:
        calls.append(offset)
        return _values_from(data, offset)

    head = REFERENCE_PACK({"a": 1}) + REFERENCE_PACK([1, 2])
    tail = REFERENCE_PACK(msgpack.ExtType(3, b"x")) + REFERENCE_PACK("after")
    it = speedups.MsgpackValues(head + tail, rest)
    assert [next(it), next(it)] == [{"a": 1}, [1, 2]]
    assert calls == []
    assert list(it) == [msgpack.ExtType(3, b"x"), "after"]
    assert calls == [len(head)]  # once, at the ext value
    with pytest.raises(TypeError, match="bytes"):
        speedups.MsgpackValues(bytearray(head), rest)
    with pytest.raises(TypeError, match="not an iterator"):
        next(speedups.MsgpackValues(tail, lambda data, offset: 42))


def test_str_keys_are_interned_and_the_key_cache_never_confuses_two_keys(speedups: Any) -> None:
    unpackb = speedups.MsgpackUnpackb(REFERENCE_UNPACKB)
    # Far more distinct short keys than the cache has slots, so that slots
    # are shared and replaced; keys of one length that differ in one byte.
    names = [f"k{i:04d}" for i in range(3000)] + ["", "a", "é", "ascii-but-rather-longer-than-the-cache-takes"]
    for _ in range(2):
        for lo in range(0, len(names), 97):
            chunk = {name: i for i, name in enumerate(names[lo : lo + 97])}
            decoded = unpackb(REFERENCE_PACK(chunk))
            assert decoded == chunk
            for key in decoded:
                assert sys.intern(key) is key
    # A batch's values too.
    data = REFERENCE_PACK({"cmd": 1}) + REFERENCE_PACK({"cmd": 2, "x" * 300: 3})
    for value in speedups.MsgpackValues(data, _values_from):
        assert all(sys.intern(key) is key for key in value)


def test_the_decoders_leak_nothing(speedups: Any) -> None:
    # Every path, the failing ones included (a value left to msgpack after a
    # half-built dict or list), run many times: memory stays flat.
    unpackb = speedups.MsgpackUnpackb(REFERENCE_UNPACKB)
    pack = speedups.MsgpackPack(REFERENCE_PACK)
    rng = random.Random(7)
    clean = b"".join(REFERENCE_PACK(v) for v in EDGE_VALUES[:60])
    inputs = [damaged(clean[i : i + 120], rng) for i in range(0, 2000, 7)]
    outside = [{"a": [1, 2, {"b": "\ud800"}]}, [1, "x", {2}], {"k": 2**70}]

    def once() -> None:
        for data in inputs:
            outcome(unpackb, data)
            drain(speedups.MsgpackValues(data, _values_from))
        for value in outside:
            outcome(pack, value)

    for _ in range(3):
        once()
    gc.collect()
    tracemalloc.start()
    try:
        once()
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(10):
            once()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes more after 10 more rounds"


# ------------------------------------------------------- through a channel


def test_values_beside_the_c_subset_cross_a_channel_in_bursts_and_alone() -> None:
    # Ext types, Timestamps, int keys and deep values, alone (the round
    # trip's decoder) and inside bursts (the batch decoder's fallback to
    # msgpack in the middle of a batch).
    odd: list[Any] = [
        msgpack.ExtType(7, b"ext"), msgpack.Timestamp(5, 6), {1: "int key", 2.5: "float key", b"k": "bin key"},
        nested(40), bytearray(b"arrives as bytes"),
    ]
    expected = [REFERENCE_UNPACKB(REFERENCE_PACK(v)) for v in odd]
    a, b = ipcbus.pair()
    with a, b:
        for value, want in zip(odd, expected, strict=True):
            a.send(value)
            assert b.recv().data == want
        burst = [{"n": i} if i % 7 else odd[(i // 7) % len(odd)] for i in range(500)]
        for value in burst:
            a.send(value)
        a.flush()
        got = [b.recv().data for _ in burst]
        assert got == [REFERENCE_UNPACKB(REFERENCE_PACK(v)) for v in burst]
