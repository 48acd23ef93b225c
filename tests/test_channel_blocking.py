"""The blocking channel between real processes: 100k messages in order for
every codec over every transport, and internal-message routing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import pytest

import ipcbus

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import core_stream_child as child  # noqa: E402

COUNT = 100_000
CODECS = ["msgpack", "json", "pickle", "raw"]
TRANSPORTS = ["pair", "fd", "unix", "unix-abstract"]
AUTHKEY = "stream-test-key"


def _parent_side(ch: ipcbus.Channel, codec: str) -> None:
    ch.send(b"go" if codec == "raw" else "go")
    child.expect_stream(ch, codec, COUNT)
    summary = ch.recv(timeout=30).data
    assert summary == (b"done" if codec == "raw" else {"done": COUNT})


def _run_forked(codec: str) -> None:
    # pair() + fork: the child keeps using the Channel object it inherited.
    a, b = ipcbus.pair(codec=codec)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        status = 1
        try:
            a.stream.close()
            child.serve(b, codec, COUNT)
            b.close(timeout=10)
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    try:
        b.stream.close()
        b.close()
        _parent_side(a, codec)
    finally:
        a.close()
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _spawn(url: str, codec: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    args = [sys.executable, str(HELPERS / "core_stream_child.py"), url, codec, str(COUNT)]
    if codec == "pickle" and not url.startswith("fd://"):
        args.append(AUTHKEY)
    return subprocess.Popen(args, pass_fds=pass_fds, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen[bytes]) -> None:
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode(errors="replace")


def _run_fd(codec: str) -> None:
    mine, theirs = socket.socketpair()
    try:
        proc = _spawn(f"fd://{theirs.fileno()}", codec, pass_fds=(theirs.fileno(),))
    finally:
        theirs.close()
    ch = ipcbus.connect(f"fd://{mine.detach()}", codec=codec)
    try:
        _parent_side(ch, codec)
    finally:
        ch.close()
        _finish(proc)


def _run_listener(url: str, codec: str) -> None:
    options: dict[str, Any] = {"codec": codec}
    if codec == "pickle":
        options["authkey"] = AUTHKEY
    with ipcbus.listen(url, **options) as listener:
        proc = _spawn(listener.address, codec)
        try:
            with listener.accept(timeout=30) as ch:
                _parent_side(ch, codec)
                assert ch.authenticated == (codec == "pickle")
        finally:
            _finish(proc)


@pytest.mark.posix("os.fork, fd:// pass_fds and unix:// sockets")
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_100k_messages_in_order(transport: str, codec: str, tmp_path: Path) -> None:
    if transport == "pair":
        _run_forked(codec)
    elif transport == "fd":
        _run_fd(codec)
    elif transport == "unix":
        _run_listener(f"unix://{tmp_path}/bus.sock", codec)
    else:
        if not sys.platform.startswith("linux"):
            pytest.skip("abstract unix sockets need Linux")
        _run_listener(f"unix-abstract://ipcbus-test-{uuid.uuid4().hex}", codec)


# --------------------------------------------------------------- internal messages


@pytest.mark.parametrize("codec", ["msgpack", "json"])
def test_reserved_prefix_never_reaches_recv(codec: str) -> None:
    a, b = ipcbus.pair(codec=codec)
    with a, b:
        a.send({"cmd": "IPCBUS_SOMETHING", "x": 1})
        a.send({"cmd": "IPCBUS_"})
        a.send({"cmd": "IPCBUS", "kept": True})  # no underscore: not the prefix
        a.send({"cmd": "ipcbus_lower"})  # prefixes are case-sensitive
        a.send("after")
        a.close()
        got = [m.data for m in b]
    assert got == [{"cmd": "IPCBUS", "kept": True}, {"cmd": "ipcbus_lower"}, "after"]


@pytest.mark.parametrize("codec", ["msgpack", "json"])
def test_claimed_prefix_goes_to_callback_in_order(codec: str) -> None:
    a, b = ipcbus.pair(codec=codec)
    log: list[Any] = []
    with a, b:
        b.on_internal("APP_", lambda m: log.append(("cb", m.data["cmd"])))
        b.on_internal("APP_SPECIAL_", lambda m: log.append(("special", m.data["cmd"])))
        for i in range(3):
            a.send(i)
            a.send({"cmd": f"APP_{i}"})
        a.send({"cmd": "APP_SPECIAL_X"})
        a.send({"cmd": "IPCBUS_HIDDEN"})
        a.send({"cmd": "APPX"})
        a.send({"cmd": "APP_LAST"})  # after the last application message
        a.close()
        for msg in b:
            log.append(("recv", msg.data))
    assert log == [
        ("recv", 0), ("cb", "APP_0"),
        ("recv", 1), ("cb", "APP_1"),
        ("recv", 2), ("cb", "APP_2"),
        ("special", "APP_SPECIAL_X"),
        ("recv", {"cmd": "APPX"}),
        ("cb", "APP_LAST"),
    ]


@pytest.mark.posix("os.fork")
def test_internal_callbacks_across_processes_with_a_thread_reader() -> None:
    # Same routing when the messages cross a real process boundary in a burst.
    a, b = ipcbus.pair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        status = 1
        try:
            b.stream.close()
            for i in range(1000):
                a.send({"cmd": "APP_TICK", "i": i} if i % 3 == 0 else i)
            a.close(timeout=10)
            status = 0
        finally:
            os._exit(status)
    a.stream.close()
    a.close()
    seen: list[Any] = []
    b.on_internal("APP_", lambda m: seen.append(("tick", m.data["i"])))
    done = threading.Event()

    def reader() -> None:
        for msg in b:
            seen.append(("msg", msg.data))
        done.set()

    t = threading.Thread(target=reader)
    t.start()
    t.join(30)
    b.close()
    _, status = os.waitpid(pid, 0)
    assert done.is_set()
    assert os.waitstatus_to_exitcode(status) == 0
    assert seen == [("tick", i) if i % 3 == 0 else ("msg", i) for i in range(1000)]


def test_on_internal_refuses_the_library_prefix() -> None:
    a, b = ipcbus.pair()
    with a, b, pytest.raises(ValueError, match="IPCBUS_"):
        a.on_internal("IPCBUS_", lambda m: None)


def test_flush_with_timeout_after_a_full_buffer_sends_each_byte_once() -> None:
    # Regression: flush(timeout) that found the socket full, waited and went
    # on writing left a stale partial segment behind, written a second time.
    a, b = ipcbus.pair(codec="json")
    sent = 0
    with a, b:
        try:
            while True:  # fill the socket buffer: nobody reads yet
                for _ in range(50):
                    a.send({"i": sent, "pad": "x" * 200})
                    sent += 1
                a.flush(timeout=0.05)
        except TimeoutError:
            pass
        got: list[int] = []

        def reader() -> None:
            started.wait(10)
            while (data := b.recv(timeout=10).data) != "end":
                got.append(data["i"])

        started = threading.Event()
        t = threading.Thread(target=reader)
        t.start()
        # The reader starts only once flush has had to wait for it.
        threading.Timer(0.1, started.set).start()
        a.flush(timeout=10)
        a.send("end")
        a.flush(timeout=10)
        t.join(15)
    assert got == list(range(sent))


def test_large_payloads_written_directly_keep_their_place_in_the_stream() -> None:
    # Payloads past DIRECT_WRITE skip the output segment (one sendmsg of
    # [header, payload]); they must still arrive whole, in order with the
    # small, batched and handle-carrying messages around them.
    import os

    from ipcbus._channel import DIRECT_WRITE

    big = os.urandom(DIRECT_WRITE + 12345)
    a, b = ipcbus.pair()
    got: list[object] = []

    def reader() -> None:
        for msg in b:
            got.append(msg.data)
            if msg.handle is not None:
                msg.handle.close()

    with a, b:
        t = threading.Thread(target=reader)
        t.start()
        expected: list[object] = []
        for i in range(40):
            for j in range(3):
                a.send({"i": i, "j": j})
                expected.append({"i": i, "j": j})
            a.send(big[i:] if i % 2 else big)
            expected.append(big[i:] if i % 2 else big)
            if i % 10 == 0:
                r, w = os.pipe()
                os.close(w)
                with open(r, "rb") as f:
                    a.send({"h": i}, handle=f)
                expected.append({"h": i})
        a.close()
        t.join(30)
        assert not t.is_alive()
    assert len(got) == len(expected)
    assert got == expected


# ------------------------------------------------------ bursts and the flusher


def _counting_pair(sndbuf: int | None = None) -> tuple[Any, Any, list[int]]:
    from ipcbus._channel import Channel
    from ipcbus.transports._sockets import SocketStream

    writes = [0]

    class CountingStream(SocketStream):
        def send(self, data: Any, fds: Any = (), *, block: bool = True) -> int:
            writes[0] += 1
            return super().send(data, fds, block=block)

    s1, s2 = socket.socketpair()
    if sndbuf is not None:
        s1.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    a = Channel._open(CountingStream(s1, name="socketpair", trusted=True), "peer")
    b = Channel._open(SocketStream(s2, name="socketpair", trusted=True), "peer")
    a.send("hello")
    # On Windows (a 15.6 ms clock) this send can look like the next of a
    # burst, the hello's, and be left to the flusher, which some tests
    # switch off: write it.
    a.flush()
    assert b.recv(timeout=5).data == "hello"
    return a, b, writes


def test_a_burst_goes_out_in_few_writes_and_its_tail_without_flush() -> None:
    a, b, writes = _counting_pair()
    try:
        before = writes[0]
        for i in range(3000):
            a.send({"n": i})
        # No flush, recv or close on the sending side: the flusher thread
        # writes the tail of the burst.
        for i in range(3000):
            assert b.recv(timeout=5).data == {"n": i}
        assert writes[0] - before < 100
    finally:
        a.close()
        b.close()


def test_sends_while_the_peer_is_behind_join_the_burst() -> None:
    # The kernel took only part of a write (the peer is not reading): the
    # sends after it are queued as a burst, not each tried as a lone write
    # against a full buffer, however long the gap since the last write.
    a, b, writes = _counting_pair(sndbuf=4096)
    try:
        n = 0
        while a._partial is None:  # a burst of small ones fills the buffer
            a.send(n)
            n += 1
            assert n < 100_000
        a._last_write -= 1.0  # long ago: these would be lone sends
        before = writes[0]
        for i in range(500):
            a.send({"late": i})
        assert writes[0] - before < 5
        got = [b.recv(timeout=10).data for _ in range(n + 500)]
        assert got == list(range(n)) + [{"late": i} for i in range(500)]
    finally:
        b.close()  # first: a's close would wait for a reader
        a.close()


def test_the_flusher_looks_again_counting_from_the_senders_last_write(monkeypatch: pytest.MonkeyPatch) -> None:
    # The next look is due HOLD_WINDOW after the sender's last write, not
    # after this look: a burst that ends just after a look has its tail
    # written about HOLD_WINDOW after its end, not twice that.
    import ipcbus._channel
    import ipcbus._flusher

    monkeypatch.setattr(ipcbus._flusher, "schedule", lambda channel: None)
    a, b, writes = _counting_pair()
    try:
        a._read_since_write = False
        a._last_write = 0.0
        a._quick_ok = False
        a.send(2)
        a.send(3)
        assert a._scheduled
        hold = ipcbus._channel.HOLD_WINDOW
        clock = [1000.0]  # (Windows' monotonic clock ticks in 15.6 ms steps)
        monkeypatch.setattr(ipcbus._channel, "_monotonic", lambda: clock[0])
        a._flush_wait = hold  # a long burst: looks are HOLD_WINDOW apart
        a._flush_mark = 0.0
        a._last_write = clock[0]  # the sender just wrote
        assert a._background_flush() == pytest.approx(hold)
        a._last_write = clock[0] - hold * 3 / 4  # it wrote a while ago
        assert a._background_flush() == pytest.approx(hold / 4)
        a._last_write = clock[0] - hold * 2  # long ago (yet after the last look)
        assert a._background_flush() == ipcbus._flusher.DELAY
        before = writes[0]
        assert a._background_flush() is None and writes[0] == before + 1
        assert [b.recv(timeout=5).data for _ in range(2)] == [2, 3]
    finally:
        a.close()
        b.close()


def test_the_flusher_leaves_a_burst_its_sender_is_writing(monkeypatch: pytest.MonkeyPatch) -> None:
    # Called by the flusher thread: while the sending thread has itself
    # written since the last look, the flusher holds off (returns when to
    # look again) and writes nothing; once the sender stopped, it writes.
    # (The real thread is kept out: this test plays its part.)
    import ipcbus._flusher

    monkeypatch.setattr(ipcbus._flusher, "schedule", lambda channel: None)
    a, b, writes = _counting_pair()
    try:
        a.send(1)  # a lone send: written now
        a._read_since_write = False
        a._last_write = 0.0  # long ago: what follows is a burst
        a._quick_ok = False  # (every message through the core, for the count)
        a.send(2)
        a.send(3)
        assert a._scheduled
        before = writes[0]
        a._last_write += 1.0  # as if the sender had written from its burst
        wait = a._background_flush()
        assert wait is not None and wait > 0 and writes[0] == before and a._scheduled
        assert a._background_flush() is None  # no write of its own since: the flusher writes
        assert writes[0] == before + 1 and not a._scheduled
        assert [b.recv(timeout=5).data for _ in range(3)] == [1, 2, 3]
    finally:
        a.close()
        b.close()


# -------------------------------------------- close() while another thread reads


def _blocked_reader(ch: ipcbus.Channel, how: str) -> tuple[threading.Thread, list[str]]:
    """A thread blocked reading ch (recv, recv with a timeout, or a for
    loop); what it ended with lands in the list."""
    outcome: list[str] = []

    def read() -> None:
        try:
            if how == "iterate":
                for message in ch:
                    outcome.append(f"message {message.data!r}")
                outcome.append("iteration ended")
            else:
                outcome.append(f"message {(ch.recv(timeout=60) if how == 'timeout' else ch.recv()).data!r}")
        except Exception as exc:
            outcome.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, outcome


def _wait_blocked(ch: ipcbus.Channel) -> None:
    # The reader holds the reader's lock while it waits in its read.
    deadline = time.monotonic() + 10
    while not ch._rlock.locked():
        assert time.monotonic() < deadline, "the reader never started reading"
        time.sleep(0.01)
    time.sleep(0.1)  # (and is in the system call by now)


@pytest.mark.parametrize("how", ["recv", "timeout", "iterate"])
@pytest.mark.parametrize("transport", ["pair", "unix", "tcp"])
def test_close_from_another_thread_wakes_a_blocked_reader(transport: str, how: str, tmp_path: Path) -> None:
    if transport == "unix" and sys.platform == "win32":
        pytest.skip("POSIX only (unix:// sockets); this is Windows")
    if transport == "pair":
        ch, peer = ipcbus.pair()
    else:
        url = f"unix://{tmp_path}/wake.sock" if transport == "unix" else "tcp://127.0.0.1:0"
        key = {"authkey": "wake-key"} if transport == "tcp" else {}
        with ipcbus.listen(url, **key) as listener:
            accepted: list[ipcbus.Channel] = []

            def accept() -> None:
                accepted.append(listener.accept(timeout=10))
                accepted[0].wait_handshake(10)  # (the server's side of connect's handshake)

            acceptor = threading.Thread(target=accept)
            acceptor.start()
            ch = ipcbus.connect(listener.address, **key)
            acceptor.join(10)
            peer = accepted[0]
    with peer:
        peer.send("first")
        assert ch.recv(timeout=10).data == "first"
        thread, outcome = _blocked_reader(ch, how)
        _wait_blocked(ch)
        started = time.monotonic()
        ch.close()
        thread.join(10)
        assert not thread.is_alive(), f"close() left the reader blocked ({transport}, {how})"
        assert time.monotonic() - started < 5
        assert outcome == ["ChannelClosed: recv on a closed channel (closed while it waited)"]
        # The peer sees the channel end, as after any close.
        with pytest.raises(ipcbus.ChannelClosed):
            peer.recv(timeout=10)


@pytest.mark.posix("os.fork")
def test_a_forked_copy_closing_does_not_interrupt_the_parents_reader() -> None:
    # The child inherits the channel, its socket and its reader's lock as it
    # was (held, by the parent's reading thread): its close() must only
    # drop its own copy of the fd, not end the parent's reads.
    ch, peer = ipcbus.pair()
    with peer:
        thread, outcome = _blocked_reader(ch, "recv")
        _wait_blocked(ch)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                ch.close()
                code = 0
            finally:
                os._exit(code)
        assert os.waitpid(pid, 0)[1] == 0
        time.sleep(0.1)
        assert thread.is_alive() and outcome == []
        peer.send("still here")
        thread.join(10)
        assert outcome == ["message 'still here'"]
        ch.close()
