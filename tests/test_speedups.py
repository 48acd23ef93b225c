"""The optional C accelerator (ipcbus._speedups) and its pure-Python twin.

The C fast paths must behave exactly like the Python methods they wrap: each
handles only its common case and hands every other call to the method. These
tests drive the C types directly with stand-in objects (every branch), then
through real channels, and check that ``IPCBUS_NO_SPEEDUPS=1`` really gives
the pure-Python code. Where the accelerator was not built they skip, except
under ``IPCBUS_REQUIRE_SPEEDUPS=1`` (CI sets it), where that is a failure.
"""

from __future__ import annotations

import functools
import gc
import inspect
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import trio

import ipcbus
import ipcbus.trio
from ipcbus import Message
from ipcbus._fastpath import ACCELERATED, CORE_FIELDS, FRONT_FIELDS, messages
from ipcbus._protocol import FRAME, FRAME_BATCH, Connection
from ipcbus.codecs import get_codec


def test_the_accelerator_is_used_unless_switched_off(speedups: Any) -> None:
    assert ACCELERATED is not bool(os.environ.get("IPCBUS_NO_SPEEDUPS"))
    code = (
        "import ipcbus, ipcbus.trio, inspect, ipcbus._fastpath as f; "
        "print(f.ACCELERATED, inspect.isfunction(ipcbus.Channel.send), "
        "inspect.isfunction(ipcbus.trio.AsyncChannel.recv_nowait))"
    )
    for env, expected in (({"IPCBUS_NO_SPEEDUPS": "1"}, "False True True"), ({}, "True False False")):
        environ = {k: v for k, v in os.environ.items() if k != "IPCBUS_NO_SPEEDUPS"}
        out = subprocess.run(
            [sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True, check=True
        )
        assert out.stdout.split() == expected.split()


def test_the_slot_bases_have_the_fields_of_their_twins(speedups: Any) -> None:
    for cls, fields in ((speedups.FrontSlots, FRONT_FIELDS), (speedups.CoreSlots, CORE_FIELDS)):
        members = {name for name, v in vars(cls).items() if inspect.ismemberdescriptor(v)}
        assert members == set(fields)
        obj = type("Sub", (cls,), {})()
        for name in fields:
            with pytest.raises(AttributeError):
                getattr(obj, name)  # unset: as a missing attribute
            setattr(obj, name, [name])
            assert getattr(obj, name) == [name]
        obj.other = 1  # a subclass keeps its __dict__
    a, b = ipcbus.pair()
    with a, b:
        assert isinstance(a, speedups.FrontSlots) is ACCELERATED
        assert isinstance(a._core, speedups.CoreSlots) is ACCELERATED


# ----------------------------------------------------------------- BurstSend


class Sender:
    """A stand-in channel: records what the fast path and the fallback do.
    (The fast paths read their fields from speedups.FrontSlots, which the
    classes the tests make derive from too.)"""

    def __init__(self, quick: list[bytes]) -> None:
        self._quick = quick
        self._fast_encode = msgpack.Packer().pack
        self.calls: list[tuple[Any, ...]] = []

    def _full(self) -> None:
        self.calls.append(("full", len(self._quick)))
        self._quick[1:] = []

    def _plain(self, payload: bytes) -> str:
        self.calls.append(("plain", payload))
        return "plain result"

    def send(self, data: Any, handle: Any = None, *, keep_open: bool = True) -> str:
        """The Python send (the fallback)."""
        self.calls.append(("fallback", data, handle, keep_open))
        return "fallback result"


def make_sender(speedups: Any, quick: list[bytes], *, count: int = 4, limit: int = 16) -> Sender:
    cls = type("FastSender", (Sender, speedups.FrontSlots), {})
    fast = speedups.BurstSend(Sender.send, "_full", "_plain", count, limit)
    functools.update_wrapper(fast, Sender.send)
    cls.send = fast
    return cls(quick)


def test_burst_send_appends_while_a_burst_is_collected(speedups: Any) -> None:
    s = make_sender(speedups, [b"first"])
    assert s.send({"a": 1}) is None
    assert s._quick == [b"first", msgpack.packb({"a": 1})]
    assert s.calls == []


def test_burst_send_calls_full_at_count(speedups: Any) -> None:
    s = make_sender(speedups, [b"first"], count=3)
    s.send(1)
    assert s.calls == []
    s.send(2)
    assert s.calls == [("full", 3)]
    assert s._quick == [b"first"]


def test_burst_send_hands_the_payload_to_plain_without_a_burst(speedups: Any) -> None:
    s = make_sender(speedups, [])
    assert s.send("x") == "plain result"
    assert s.calls == [("plain", msgpack.packb("x"))]
    assert s._quick == []


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        (("x", "h"), {}, ("fallback", "x", "h", True)),
        (("x",), {"keep_open": False}, ("fallback", "x", None, False)),
        (("x",), {"handle": None}, ("fallback", "x", None, True)),
    ],
)
def test_burst_send_falls_back_for_any_other_arguments(
    speedups: Any, args: tuple[Any, ...], kwargs: dict[str, Any], expected: tuple[Any, ...]
) -> None:
    s = make_sender(speedups, [b"first"])
    assert s.send(*args, **kwargs) == "fallback result"
    assert s.calls == [expected]
    assert s._quick == [b"first"]


def test_burst_send_hands_a_large_payload_to_plain(speedups: Any) -> None:
    s = make_sender(speedups, [b"first"], limit=8)
    assert s.send("a" * 20) == "plain result"
    assert s.calls == [("plain", msgpack.packb("a" * 20))]
    assert s._quick == [b"first"]


def test_burst_send_leaves_an_encoding_error_to_the_method(speedups: Any) -> None:
    s = make_sender(speedups, [b"first"])
    assert s.send({1, 2}) == "fallback result"  # msgpack: TypeError (a set)
    assert s.calls == [("fallback", {1, 2}, None, True)]
    assert s._quick == [b"first"]


def test_burst_send_propagates_other_errors(speedups: Any) -> None:
    class Boom:
        pass

    s = make_sender(speedups, [b"first"])

    def encode(value: Any) -> bytes:
        raise RuntimeError("not an encoding error")

    s._fast_encode = encode
    with pytest.raises(RuntimeError, match="not an encoding error"):
        s.send(Boom())
    assert s.calls == []


def test_burst_send_is_a_method_with_the_wrapped_metadata(speedups: Any) -> None:
    s = make_sender(speedups, [b"first"])
    cls = type(s)
    assert cls.__dict__["send"].__doc__ == "The Python send (the fallback)."
    assert cls.__dict__["send"].__wrapped__ is Sender.send
    assert inspect.signature(cls.__dict__["send"]) == inspect.signature(Sender.send)
    bound = s.send
    assert bound.__self__ is s
    assert bound("x", "h") == "fallback result"
    assert cls.send(s, "y", "h") == "fallback result"  # called through the class
    assert repr(cls.__dict__["send"]).startswith("<ipcbus._speedups.BurstSend of <function Sender.send")


def test_burst_send_keeps_no_references(speedups: Any) -> None:
    s = make_sender(speedups, [b"first"], count=10**9)
    data = {"some": "value"}
    before = sys.getrefcount(data)
    for _ in range(1000):
        s.send(data)
        s.send(data, None)
    assert sys.getrefcount(data) == before + 1000  # the fallback's record of each call
    s.calls.clear()
    assert sys.getrefcount(data) == before
    payload = s._quick[1]
    assert sys.getrefcount(payload) == 3  # the list's, ours and getrefcount's


def test_burst_send_falls_back_without_its_fields(speedups: Any) -> None:
    # Not a FrontSlots, a field not set, a burst list that is not a list:
    # the Python method runs (which raises, or copes, as Python would).
    class NotSlots:  # the same attributes, in a __dict__
        def __init__(self) -> None:
            self._quick = [b"first"]
            self._fast_encode = msgpack.Packer().pack
            self.calls: list[Any] = []

    cls = type("FastNotSlots", (NotSlots,), {"send": speedups.BurstSend(Sender.send, "_full", "_plain", 4, 16)})
    other = cls()
    assert other.send("x") == "fallback result"
    assert other.calls == [("fallback", "x", None, True)] and other._quick == [b"first"]

    s = make_sender(speedups, [b"first"])
    del s._fast_encode
    assert s.send("x") == "fallback result"
    s = make_sender(speedups, [b"first"])
    s._quick = (b"first",)  # type: ignore[assignment]
    assert s.send("x") == "fallback result"
    fresh = type(s).__new__(type(s))  # __init__ never ran: no fields at all
    fresh.calls = []
    assert fresh.send("x") == "fallback result"


def test_burst_send_checks_its_arguments(speedups: Any) -> None:
    with pytest.raises(TypeError):
        speedups.BurstSend(42, "_full", "_plain", 1, 1)
    with pytest.raises(TypeError):
        speedups.BurstSend(len, b"_full", "_plain", 1, 1)


# ------------------------------------------------------------------ LazyRecv


class Core:
    def __init__(self, lazy: Iterator[Any] | None) -> None:
        self._lazy = lazy


class Receiver:
    core_class: type = Core

    def __init__(self, lazy: Iterator[Any] | None) -> None:
        self._core = self.core_class(lazy)
        self.calls: list[Any] = []

    def _lazy_failed(self, exc: Exception) -> None:
        self.calls.append(("failed", exc))
        self._core._lazy = None

    def recv(self, timeout: float | None = None) -> Any:
        self.calls.append(("fallback", timeout))
        return "fallback result"


def make_receiver(speedups: Any, lazy: Iterator[Any] | None) -> Receiver:
    core_class = type("FastCore", (Core, speedups.CoreSlots), {})
    cls = type("FastReceiver", (Receiver, speedups.FrontSlots), {"core_class": core_class})
    cls.recv = speedups.LazyRecv(Receiver.recv, "_lazy_failed")
    return cls(lazy)


def test_lazy_recv_takes_the_next_value_then_falls_back(speedups: Any) -> None:
    r = make_receiver(speedups, iter(["a", "b"]))
    assert [r.recv(), r.recv()] == ["a", "b"]
    assert r.calls == []
    assert r.recv() == "fallback result"  # the batch is over
    assert r.calls == [("fallback", None)]


def test_lazy_recv_falls_back_without_a_batch_or_with_arguments(speedups: Any) -> None:
    r = make_receiver(speedups, None)
    assert r.recv() == "fallback result"
    r._core._lazy = iter(["a"])
    assert r.recv(5) == "fallback result"
    assert r.recv(timeout=None) == "fallback result"
    assert r.calls == [("fallback", None), ("fallback", 5), ("fallback", None)]
    assert r.recv() == "a"


def test_lazy_recv_reports_a_decoder_error_then_falls_back(speedups: Any) -> None:
    def values() -> Iterator[str]:
        yield "a"
        raise ValueError("bad byte")

    r = make_receiver(speedups, values())
    assert r.recv() == "a"
    assert r.recv() == "fallback result"
    (failed, exc), fallback = r.calls
    assert failed == "failed" and isinstance(exc, ValueError) and str(exc) == "bad byte"
    assert exc.__traceback__ is not None
    assert fallback == ("fallback", None)


def test_lazy_recv_falls_back_without_its_fields(speedups: Any) -> None:
    class DictCore:  # a core of another kind (as NodeConnection): Python decides
        def __init__(self, lazy: Iterator[Any] | None) -> None:
            self._lazy = lazy

    r = make_receiver(speedups, None)
    fast_core = r._core
    r._core = DictCore(iter(["a"]))
    assert r.recv() == "fallback result"
    del r._core
    assert r.recv() == "fallback result"
    r._core = fast_core
    del r._core._lazy
    assert r.recv() == "fallback result"
    r._core._lazy = iter(["c"])
    assert r.recv() == "c"
    assert r.calls == [("fallback", None)] * 3

    class NotSlots:
        _core = type(fast_core)(iter(["a"]))

        def recv(self, timeout: float | None = None) -> str:
            return "fallback result"

    cls = type("FastNotSlots", (NotSlots,), {"recv": speedups.LazyRecv(NotSlots.recv, "_lazy_failed")})
    assert cls().recv() == "fallback result"


def test_lazy_recv_lets_keyboard_interrupt_through(speedups: Any) -> None:
    def values() -> Iterator[str]:
        raise KeyboardInterrupt
        yield "never"

    r = make_receiver(speedups, values())
    with pytest.raises(KeyboardInterrupt):
        r.recv()
    assert r.calls == []


# ------------------------------------------------------------------ Messages


def test_messages_makes_message_tuples(speedups: Any) -> None:
    out = list(speedups.Messages(["a", {"b": 1}], Message))
    assert out == [("a", None), ({"b": 1}, None)]
    assert all(type(m) is Message for m in out)
    assert out[1].data == {"b": 1} and out[1].handle is None
    data, handle = out[0]
    assert (data, handle) == ("a", None)
    assert list(messages(iter([1]))) == [Message(1, None)]


def test_messages_reuses_only_a_message_nobody_holds(speedups: Any) -> None:
    # A Message the caller dropped becomes a later one (as zip() reuses its
    # tuple); one the caller still holds is never touched. A class that
    # counts its instances' deaths shows which were reused.
    deaths: list[int] = []

    class Counted(Message):
        __slots__ = ()

        def __del__(self) -> None:
            deaths.append(1)

    it = speedups.Messages(iter(range(1000)), Counted)
    held = [next(it) for _ in range(10)]
    assert held == [(i, None) for i in range(10)] and len({id(m) for m in held}) == 10

    for i in range(10, 30, 2):  # unpacked (data, handle = recv()), or dropped at once
        data, handle = next(it)
        assert (data, handle) == (i, None)
        assert next(it) == (i + 1, None)
    assert len(deaths) <= 2  # (not one per message: reused)

    del deaths[:]
    previous = None
    for expected, msg in zip(range(30, 60), it, strict=False):  # `msg = recv()`: the last held meanwhile
        assert msg == (expected, None) and type(msg) is Counted
        if previous is not None:
            assert previous == (expected - 1, None)  # the one still held is intact
        previous = msg
    assert len(deaths) <= 2
    assert held == [(i, None) for i in range(10)]  # never reused while held


def test_messages_survives_a_value_whose_release_takes_the_next(speedups: Any) -> None:
    # Reusing a Message releases the value it held, which may run code that
    # takes the next Message of the same iterator: that one is a new Message.
    got: list[Any] = []

    class Reentrant:
        def __init__(self, n: int) -> None:
            self.n = n

        def __del__(self) -> None:
            if self.n == 0:
                got.append(next(it))

    it = speedups.Messages((Reentrant(i) for i in range(5)), Message)
    assert next(it).data.n == 0  # dropped at once: reused by the next call
    second = next(it)  # releasing value 0 took value 2 into got
    assert second.data.n == 1 and [m.data.n for m in got] == [2]
    assert got[0] is not second
    assert [m.data.n for m in it] == [3, 4]


def test_messages_refuses_classes_it_cannot_fill(speedups: Any) -> None:
    class WithDict(tuple):
        pass

    for cls in (list, WithDict, int):
        with pytest.raises(TypeError):
            speedups.Messages([], cls)
    with pytest.raises(TypeError):
        speedups.Messages(42, Message)


def test_messages_passes_errors_through_and_keeps_no_references(speedups: Any) -> None:
    value = object()
    before = sys.getrefcount(value)
    it = speedups.Messages([value] * 100, Message)
    held = list(it)
    assert sys.getrefcount(value) == before + 100  # the messages' (the exhausted source let go)
    del held, it
    gc.collect()
    assert sys.getrefcount(value) == before

    def broken() -> Iterator[int]:
        yield 1
        raise ValueError("decoder says no")

    it = speedups.Messages(broken(), Message)
    assert next(it) == (1, None)
    with pytest.raises(ValueError, match="decoder says no"):
        next(it)


# ---------------------------------------------- through real channels (both ways)


def hello_bytes() -> bytes:
    core = Connection(get_codec("msgpack"), pid=4242, can_carry_handles=True)
    seg = core.take_output()
    assert seg is not None
    return bytes(seg[0])


def batch_with_a_bad_value() -> bytes:
    payload = msgpack.packb("a") + msgpack.packb({"b": 2}) + b"\xc1" + msgpack.packb("never")
    return hello_bytes() + FRAME.pack(len(payload), FRAME_BATCH, 0, 0) + payload


@pytest.mark.posix("socketpair and fd://")
@pytest.mark.parametrize("how", ["recv", "iterate"])
def test_a_bad_value_in_a_batch_ends_the_channel_after_the_values_before_it(how: str) -> None:
    mine, theirs = socket.socketpair()
    theirs.sendall(batch_with_a_bad_value())  # (connect waits for the hello)
    with theirs, ipcbus.connect(f"fd://{mine.detach()}") as ch:
        got = []
        with pytest.raises(ipcbus.CodecError, match="undecodable msgpack batch"):
            if how == "recv":
                while True:
                    got.append(ch.recv().data)
            else:
                for msg in ch:
                    got.append(msg.data)
        assert got == ["a", {"b": 2}]
        assert ch.closed
        with pytest.raises(ipcbus.CodecError):
            ch.recv()


@pytest.mark.posix("socketpair and fd://")
def test_a_bad_value_in_a_batch_ends_a_trio_channel_after_the_values_before_it() -> None:
    async def main() -> None:
        mine, theirs = socket.socketpair()
        with theirs:
            theirs.sendall(batch_with_a_bad_value())
            async with await ipcbus.trio.connect(f"fd://{mine.detach()}") as ch:
                got = [(await ch.recv()).data]  # reads the batch
                with pytest.raises(ipcbus.CodecError, match="undecodable msgpack batch"):
                    while True:
                        got.append(ch.recv_nowait().data)
                assert got == ["a", {"b": 2}]

    trio.run(main)


@pytest.mark.posix("socketpair")
def test_a_burst_through_the_fast_paths_arrives_whole_and_in_order() -> None:
    a, b = ipcbus.pair()
    with a, b:
        n = 20_000
        expected = [{"i": i, "pad": "x" * (i % 300)} for i in range(n)]  # some over the burst list's limit
        got: list[Any] = []
        reader = threading.Thread(target=lambda: got.extend(b.recv().data for _ in range(n + 1)))
        reader.start()
        for value in expected:
            a.send(value)
        with pytest.raises(ipcbus.CodecError):
            a.send({1, 2})  # mid-burst: the method's own error, and nothing lost
        a.send("end")
        a.flush()
        reader.join(60)
        assert got[:n] == expected
        assert got[n:] == ["end"]


@pytest.mark.posix("socketpair")
def test_a_trio_burst_through_the_fast_paths_arrives_whole_and_in_order() -> None:
    async def main() -> None:
        a, b = ipcbus.trio.pair()
        async with a, b:
            n = 5_000
            expected = [{"i": i, "pad": "x" * (i % 300)} for i in range(n)]

            async def receive() -> list[Any]:
                return [(await b.recv()).data for _ in range(n + 1)]

            got: list[Any] = []
            async with trio.open_nursery() as nursery:

                async def collect() -> None:
                    got.extend(await receive())

                nursery.start_soon(collect)
                for value in expected:
                    try:
                        a.send_nowait(value)
                    except trio.WouldBlock:
                        await a.send(value)
                with pytest.raises(ipcbus.CodecError):
                    a.send_nowait({1, 2})
                await a.send("end")
            assert got[:n] == expected and got[n] == "end"

    trio.run(main)
