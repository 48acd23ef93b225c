"""A hostile or broken peer, driven from a raw socket into a real unix://
listener, gets a typed error on its own channel, while a well-behaved
client of the same listener keeps exchanging messages."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import pytest

import ipcbus
from ipcbus._protocol import FRAME, HELLO, Connection
from ipcbus.codecs import get_codec

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs AF_UNIX sockets")


def good_hello() -> bytes:
    """The hello a correct msgpack client sends (made by the real core)."""
    core = Connection(get_codec("msgpack"), pid=4242, can_carry_handles=True)
    seg = core.take_output()
    assert seg is not None
    return bytes(seg[0])


def frame(ftype: int, payload: bytes, length: int | None = None) -> bytes:
    return FRAME.pack(len(payload) if length is None else length, ftype, 0, 0) + payload


HELLO_BYTES = good_hello()
_, _, FLAGS, BODY_LEN, PID = HELLO.unpack_from(HELLO_BYTES)

CASES = {
    "garbage": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ipcbus.HandshakeError, "bad magic"),
    "wrong-magic": (b"IPCX" + HELLO_BYTES[4:], ipcbus.HandshakeError, "bad magic b'IPCX'"),
    "wrong-version": (HELLO.pack(b"IPCB", 9, FLAGS, BODY_LEN, PID) + HELLO_BYTES[HELLO.size :],
                      ipcbus.HandshakeError, "this side 1, peer 9"),
    "oversized-length": (HELLO_BYTES + FRAME.pack(2**30, 0, 0, 0), ipcbus.ProtocolError,
                         "1073741824 bytes exceeds max_message_size"),
    "truncated-then-eof": (HELLO_BYTES + frame(0, msgpack.packb("whole")) + frame(0, b"\xa5ab", length=6),
                           ipcbus.ProtocolError, "truncated frame"),
    "undecodable": (HELLO_BYTES + frame(0, msgpack.packb("fine")) + frame(0, b"\xc1"), ipcbus.CodecError,
                    "undecodable msgpack"),
}


@dataclass
class GoodClient:
    """A correct client in a thread: ping-pong with the server's echo loop."""

    exchanged: int = 0
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, address: str) -> None:
        try:
            with ipcbus.connect(address) as ch:
                i = 0
                while not self.stop.is_set():
                    ch.send({"i": i})
                    if ch.recv(timeout=10).data != {"i": i}:
                        raise AssertionError(f"echo {i} mismatched")
                    i += 1
                    self.exchanged = i
        except BaseException as exc:
            self.errors.append(exc)

    def wait_for_progress(self, n: int = 20) -> None:
        # The good client makes progress now, whatever the bad one did.
        target = self.exchanged + n
        deadline = time.monotonic() + 20
        while self.exchanged < target and not self.errors and time.monotonic() < deadline:
            time.sleep(0.005)
        assert not self.errors, self.errors
        assert self.exchanged >= target, f"good client stalled at {self.exchanged}"


def _echo(ch: ipcbus.Channel) -> None:
    try:
        for msg in ch:
            ch.send(msg.data)
    except ipcbus.IPCError:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ipcbus.Listener, GoodClient]]:
    with ipcbus.listen(f"unix://{tmp_path}/bus.sock") as listener:
        good = GoodClient()
        client = threading.Thread(target=good.run, args=(listener.address,))
        client.start()
        ch = listener.accept(timeout=10)
        echo = threading.Thread(target=_echo, args=(ch,))
        echo.start()
        try:
            good.wait_for_progress()
            yield listener, good
            good.wait_for_progress()
        finally:
            good.stop.set()
            client.join(20)
            echo.join(20)
            ch.close()
        assert not good.errors


@pytest.mark.parametrize("case", list(CASES))
def test_bad_peer_gets_a_typed_error_on_its_channel_only(
    case: str, server: tuple[ipcbus.Listener, GoodClient]
) -> None:
    listener, good = server
    data, error, match = CASES[case]
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        raw.connect(listener.address.removeprefix("unix://"))
        # accept() does not read the peer's bytes: it returns at once.
        bad = listener.accept(timeout=10)
        with bad:
            raw.sendall(data)
            if case == "truncated-then-eof":
                raw.shutdown(socket.SHUT_WR)
            good.wait_for_progress()  # while the bad bytes wait to be read
            with pytest.raises(error, match=match) as info:
                # A good message ahead of the bad bytes is still delivered.
                assert bad.recv(timeout=10).data in ("whole", "fine")
                bad.recv(timeout=10)
            if error is not ipcbus.HandshakeError:
                assert not isinstance(info.value, ipcbus.HandshakeError)
            assert bad.closed
            with pytest.raises(ipcbus.IPCError):
                bad.recv(timeout=1)  # the error is sticky; nothing blocks
            good.wait_for_progress()
    finally:
        raw.close()


def test_the_good_message_before_the_bad_one_is_delivered(server: tuple[ipcbus.Listener, GoodClient]) -> None:
    listener, _good = server
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with raw:
        raw.connect(listener.address.removeprefix("unix://"))
        with listener.accept(timeout=10) as bad:
            raw.sendall(CASES["undecodable"][0])
            assert bad.recv(timeout=10).data == "fine"
            with pytest.raises(ipcbus.CodecError):
                bad.recv(timeout=10)


def test_silent_peer_times_out_its_handshake_only(server: tuple[ipcbus.Listener, GoodClient], tmp_path: Path) -> None:
    listener, good = server
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with raw:
        raw.connect(listener.address.removeprefix("unix://"))
        with listener.accept(timeout=10) as silent:
            silent._handshake_deadline = time.monotonic() + 0.3  # instead of waiting the default 10 s
            with pytest.raises(ipcbus.HandshakeTimeout):
                silent.recv(timeout=10)
        good.wait_for_progress()


def test_listener_accepts_new_clients_after_bad_ones(server: tuple[ipcbus.Listener, GoodClient]) -> None:
    listener, _ = server
    for data, _err, _match in CASES.values():
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with raw:
            raw.connect(listener.address.removeprefix("unix://"))
            raw.sendall(data)
            raw.shutdown(socket.SHUT_WR)
            with listener.accept(timeout=10) as bad, pytest.raises(ipcbus.IPCError):
                for _ in range(2):
                    bad.recv(timeout=10)
    got: list[object] = []

    def late_client() -> None:
        with ipcbus.connect(listener.address) as ch:
            ch.send("late")
            got.append(ch.recv(timeout=10).data)

    t = threading.Thread(target=late_client)
    t.start()
    with listener.accept(timeout=10) as ch:
        assert ch.recv(timeout=10).data == "late"
        ch.send("welcome")
        t.join(10)
    assert got == ["welcome"]
