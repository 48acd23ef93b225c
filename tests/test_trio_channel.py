"""The trio frontend (ipcbus.trio) over real sockets and real processes."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import textwrap
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

import ipcbus
import ipcbus.trio
from ipcbus import ChannelClosed, HandshakeError, HandshakeTimeout, ProtocolError
from ipcbus._frontend import make_core
from ipcbus._protocol import FRAME
from ipcbus._trio_channel import HIGH_WATER, AsyncChannel
from ipcbus.transports import AsyncSocketStream

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs AF_UNIX socketpairs and fork")

TIMEOUT = 30  # seconds; a hung test fails instead of waiting for pytest-timeout


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        with trio.fail_after(TIMEOUT):
            return await fn()

    return trio.run(main)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"))


def writer_tasks() -> list[str]:
    """Names of the ipcbus writer tasks alive in this run."""
    names: list[str] = []

    def walk(task: trio.lowlevel.Task) -> None:
        if task.name.startswith("ipcbus-writer"):
            names.append(task.name)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    walk(trio.lowlevel.current_root_task())
    return names


# ----------------------------------------------------------------- basics


def test_AsyncChannel_pair_exchanges_both_ways() -> None:
    async def main() -> None:
        a, b = ipcbus.trio.pair()
        async with a, b:
            await a.send({"n": 1, "s": "x"})
            assert await b.recv() == ({"n": 1, "s": "x"}, None)
            await b.send([1, 2, 3])
            data, handle = await a.recv()
            assert data == [1, 2, 3] and handle is None
            assert a.peer_pid == os.getpid() == b.peer_pid
            assert a.codec.name == "msgpack"
            assert a.transport == "socketpair"
            assert a.can_send_handles
            assert not a.authenticated
            assert isinstance(a.stream, AsyncSocketStream)
            assert not a.closed
        assert a.closed and b.closed
        with pytest.raises(ChannelClosed):
            await a.send(1)
        with pytest.raises(ChannelClosed):
            a.send_nowait(1)
        with pytest.raises(ChannelClosed):
            await a.recv()
        with pytest.raises(ChannelClosed):
            a.recv_nowait()

    run(main)


def test_AsyncChannel_async_for_ends_at_peer_eof() -> None:
    async def main() -> None:
        a, b = ipcbus.trio.pair(codec="json")
        for i in range(5):
            await a.send(i)
        await a.aclose()
        got = [msg.data async for msg in b]
        assert got == [0, 1, 2, 3, 4]
        with pytest.raises(ChannelClosed):
            await b.recv()  # EOF stays EOF
        await b.aclose()

    run(main)


def test_AsyncChannel_recv_nowait_and_send_nowait() -> None:
    async def main() -> None:
        a, b = ipcbus.trio.pair()
        async with a, b:
            with pytest.raises(trio.WouldBlock):
                b.recv_nowait()
            for i in range(100):
                a.send_nowait(i)
            assert (await b.recv()).data == 0
            got = [0]
            while len(got) < 100:
                try:
                    got.append(b.recv_nowait().data)
                except trio.WouldBlock:
                    got.append((await b.recv()).data)
            assert got == list(range(100))

    run(main)


def test_AsyncChannel_checkpoints() -> None:
    async def main() -> None:
        a, b = ipcbus.trio.pair()
        with trio.testing.assert_checkpoints():
            await a.wait_handshake()
        with trio.testing.assert_checkpoints():
            await a.send(1)
        with trio.testing.assert_checkpoints():
            await a.send(2)
        with trio.testing.assert_checkpoints():
            await a.flush()
        with trio.testing.assert_checkpoints():
            assert (await b.recv()).data == 1
        with trio.testing.assert_checkpoints():
            assert (await b.recv()).data == 2  # may be parsed already: still a checkpoint
        with trio.testing.assert_checkpoints():
            await b.wait_handshake()
        with trio.testing.assert_checkpoints():
            await a.aclose()
        with trio.testing.assert_checkpoints():
            await a.aclose()  # already closed
        with trio.testing.assert_checkpoints(), pytest.raises(ChannelClosed):
            await b.recv()  # the peer's EOF
        with trio.testing.assert_checkpoints(), pytest.raises(ChannelClosed):
            await a.send(3)
        with trio.testing.assert_checkpoints():
            await b.aclose()

    run(main)


def test_AsyncChannel_cancelled_recv_loses_nothing() -> None:
    async def main() -> None:
        a, b = ipcbus.trio.pair()
        async with a, b:
            with trio.move_on_after(0.05) as cs:
                await b.recv()
            assert cs.cancelled_caught
            await a.send("after")
            assert (await b.recv()).data == "after"
            # A recv cancelled before it starts takes nothing from the queue.
            await a.send("x")
            await a.send("y")
            assert (await b.recv()).data == "x"
            with trio.CancelScope() as scope:
                scope.cancel()
                await b.recv()
            assert (await b.recv()).data == "y"

    run(main)


def test_AsyncChannel_aclose_wakes_blocked_recv_and_send() -> None:
    async def main() -> None:
        a, b = ipcbus.trio.pair()
        errors: list[BaseException] = []

        async def blocked_recv() -> None:
            try:
                await a.recv()
            except BaseException as exc:
                errors.append(exc)

        async def blocked_send() -> None:
            try:
                while True:
                    await a.send(b"q" * 65536)
            except BaseException as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked_recv)
            nursery.start_soon(blocked_send)
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(0.05):  # cannot flush: b does not read
                await a.aclose()
        assert len(errors) == 2
        assert all(type(exc) is ChannelClosed for exc in errors), errors
        await b.aclose()

    run(main)


def test_AsyncChannel_garbage_collected_unclosed_ends_its_writer() -> None:
    async def main() -> None:
        a, b = ipcbus.trio.pair()
        await a.send("x")
        await trio.testing.wait_all_tasks_blocked()
        assert len(writer_tasks()) == 2
        ref = weakref.ref(a)
        del a, b
        gc.collect()
        assert ref() is None
        await trio.testing.wait_all_tasks_blocked()
        assert writer_tasks() == []

    run(main)  # returns: nothing keeps the run alive; the fd check sees both ends closed


def test_AsyncChannel_concurrent_send_and_recv_tasks() -> None:
    n = 3000

    async def main() -> None:
        a, b = ipcbus.trio.pair()
        got: dict[str, list[int]] = {"a": [], "b": []}

        async def pump(ch: AsyncChannel) -> None:
            for i in range(n):
                await ch.send(i)

        async def drain(ch: AsyncChannel, key: str) -> None:
            while len(got[key]) < n:
                got[key].append((await ch.recv()).data)

        async def reader(ch: AsyncChannel, out: list[int]) -> None:
            async for msg in ch:
                out.append(msg.data)

        async with a, b:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, a)
                nursery.start_soon(pump, b)
                nursery.start_soon(drain, a, "a")
                nursery.start_soon(drain, b, "b")
            assert got["a"] == list(range(n)) == got["b"]
            # Two tasks receiving from one channel: each message goes to one.
            one: list[int] = []
            two: list[int] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader, b, one)
                nursery.start_soon(reader, b, two)
                await pump(a)
                await a.aclose()
            assert sorted(one + two) == list(range(n))
            assert one == sorted(one) and two == sorted(two)

    run(main)


def test_AsyncChannel_handshake_timeout() -> None:
    async def main() -> None:
        mine, silent = socket.socketpair()
        with silent:
            ch = AsyncChannel._open(
                AsyncSocketStream(mine, name="socketpair", trusted=True), "peer", handshake_timeout=0.2
            )
            with pytest.raises(HandshakeTimeout):
                await ch.recv()
            assert ch.closed
            await ch.aclose()

    run(main)


# ----------------------------------------------------------- backpressure


def test_AsyncChannel_send_waits_while_peer_does_not_read() -> None:
    payload = b"x" * 1024
    total = 10_000  # 10 MiB: far more than socket buffers plus HIGH_WATER

    async def main() -> None:
        a, b = ipcbus.trio.pair()
        sent = 0

        async def sender() -> None:
            nonlocal sent
            while sent < total:
                await a.send(payload)
                sent += 1

        async with a, b, trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await trio.testing.wait_all_tasks_blocked()
            blocked_at = sent
            assert 0 < blocked_at < total
            # Bounded: the kernel's buffers plus our high-water mark.
            assert blocked_at * len(payload) < HIGH_WATER + 8 * 1024 * 1024
            # A send that cannot get room is cancelled whole.
            with trio.move_on_after(0.05) as cs:
                await a.send("not delivered")
            assert cs.cancelled_caught
            # The peer reads: the sender resumes and everything arrives in order.
            for _ in range(total):
                data, _ = await b.recv()
                assert data == payload
            assert sent == total
            await a.send("end")
            assert (await b.recv()).data == "end"

    run(main)


def test_AsyncChannel_aclose_is_bounded_by_cancellation() -> None:
    async def main() -> None:
        a, b = ipcbus.trio.pair()
        payload = b"z" * 4096

        async def fill() -> None:
            while True:
                await a.send(payload)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fill)
            await trio.testing.wait_all_tasks_blocked()  # the buffers are full
            nursery.cancel_scope.cancel()
        with trio.move_on_after(0.1) as cs:
            await a.aclose()  # cannot flush: the peer does not read
        assert cs.cancelled_caught
        assert a.closed
        with pytest.raises(ChannelClosed):
            await a.send(1)
        n = 0
        try:
            async for msg in b:  # what was written arrives, then EOF
                assert msg.data == payload
                n += 1
        except ProtocolError as exc:
            # The forced close may cut a segment that was being written.
            assert "truncated frame" in str(exc)
        assert n > 0
        await b.aclose()

    run(main)


def test_AsyncChannel_send_nowait_raises_WouldBlock_when_full() -> None:
    payload = b"y" * 1000

    async def main() -> None:
        a, b = ipcbus.trio.pair()
        async with a, b:
            queued = 0
            with pytest.raises(trio.WouldBlock):
                # No checkpoint in this loop: the writer cannot run, so the
                # buffer fills up to its high-water mark.
                for _ in range(10 * HIGH_WATER // len(payload)):
                    a.send_nowait(payload)
                    queued += 1
            assert HIGH_WATER // len(payload) - 2 <= queued <= HIGH_WATER // len(payload) + 2
            for _ in range(queued):
                assert (await b.recv()).data == payload
            a.send_nowait("room again")
            assert (await b.recv()).data == "room again"

    run(main)


def test_AsyncChannel_burst_goes_out_in_few_writes() -> None:
    writes = 0

    class CountingStream(AsyncSocketStream):
        async def send(self, data: Any, fds: Any = ()) -> int:
            nonlocal writes
            writes += 1
            return await super().send(data, fds)

    async def main() -> None:
        s1, s2 = socket.socketpair()
        a = AsyncChannel._open(CountingStream(s1, name="socketpair", trusted=True), "peer")
        b = AsyncChannel._open(AsyncSocketStream(s2, name="socketpair", trusted=True), "peer")
        async with a, b:
            await a.send("lone")
            assert (await b.recv()).data == "lone"  # a lone send is written at once
            before = writes
            for i in range(1000):
                await a.send(i)
            await a.flush()
            assert writes - before < 500  # consecutive sends share writes
            for i in range(1000):
                assert (await b.recv()).data == i
            before = writes
            for i in range(1000):
                a.send_nowait(i)
            await a.flush()
            assert writes - before <= 2

    run(main)


def test_AsyncChannel_reply_is_written_at_once_by_the_sending_task() -> None:
    # The first send after a read is a reply (or the next request): written
    # by send itself with one non-blocking write, not by the writer task a
    # scheduling round later; a burst still goes to the writer.
    writer_writes = direct_writes = 0

    class CountingStream(AsyncSocketStream):
        async def send(self, data: Any, fds: Any = ()) -> int:
            nonlocal writer_writes
            writer_writes += 1
            return await super().send(data, fds)

        def send_nowait(self, data: Any) -> int:
            nonlocal direct_writes
            direct_writes += 1
            return super().send_nowait(data)

    async def main() -> None:
        s1, s2 = socket.socketpair()
        a = AsyncChannel._open(AsyncSocketStream(s1, name="socketpair", trusted=True), "peer")
        b = AsyncChannel._open(CountingStream(s2, name="socketpair", trusted=True), "peer")
        async with a, b:
            for i in range(20):
                await a.send({"ask": i})
                assert (await b.recv()).data == {"ask": i}
                before = writer_writes
                if i % 2:
                    await b.send({"answer": i})
                else:
                    b.send_nowait({"answer": i})
                assert writer_writes == before  # not the writer task's write
                assert (await a.recv()).data == {"answer": i}
            assert direct_writes == 20
            for i in range(100):  # a burst after the replies: the writer's
                b.send_nowait(i)
            await b.flush()
            assert direct_writes == 20 and writer_writes >= 1
            for i in range(100):
                assert (await a.recv()).data == i

    run(main)


# ------------------------------------------------------ internal messages


def test_AsyncChannel_internal_prefix_routing() -> None:
    async def main() -> None:
        a, b = ipcbus.trio.pair()
        seen: list[Any] = []
        b.on_internal("APP_", lambda msg: seen.append(msg.data))
        with pytest.raises(ValueError):
            b.on_internal("IPCBUS_", seen.append)
        async with a, b:
            await a.send({"cmd": "APP_START", "n": 1})
            await a.send({"cmd": "IPCBUS_UNKNOWN"})  # the library's own: dropped
            await a.send({"cmd": "user", "n": 2})
            a.send_nowait({"cmd": "APP_STOP"})
            a.send_nowait("plain")
            msg = await b.recv()
            assert msg.data == {"cmd": "user", "n": 2}
            assert seen == [{"cmd": "APP_START", "n": 1}]
            assert (await b.recv()).data == "plain"
            assert seen[-1] == {"cmd": "APP_STOP"}

    run(main)


# ------------------------------------------------------------ unix sockets


def test_AsyncListener_unix_two_clients(tmp_path: Any) -> None:
    async def main() -> None:
        url = f"unix://{tmp_path}/bus.sock"
        async with await ipcbus.trio.listen(url) as listener:
            assert listener.address == url

            async def serve(ch: AsyncChannel) -> None:
                async with ch:
                    async for msg in ch:
                        await ch.send({"echo": msg.data, "peer": ch.peer_pid})

            async def client(name: str) -> None:
                ch = await ipcbus.trio.connect(url)
                async with ch:
                    assert ch.transport == "unix"
                    for i in range(20):
                        await ch.send(f"{name}{i}")
                        assert (await ch.recv()).data == {"echo": f"{name}{i}", "peer": os.getpid()}

            async with trio.open_nursery() as server, trio.open_nursery() as clients:
                clients.start_soon(client, "a")
                clients.start_soon(client, "b")
                for _ in range(2):
                    server.start_soon(serve, await listener.accept())
        assert not os.path.exists(f"{tmp_path}/bus.sock")

    run(main)


def test_connect_codec_mismatch_is_HandshakeError(tmp_path: Any) -> None:
    async def main() -> None:
        url = f"unix://{tmp_path}/bus.sock"
        async with await ipcbus.trio.listen(url, codec="json") as listener, trio.open_nursery() as nursery:

            async def server() -> None:
                ch = await listener.accept()
                with pytest.raises(HandshakeError, match="codec"):
                    await ch.recv()
                assert ch.closed
                await ch.aclose()

            nursery.start_soon(server)
            with pytest.raises(HandshakeError, match="codec"):
                await ipcbus.trio.connect(url, codec="msgpack")

    run(main)


def test_AsyncChannel_bad_peer_bytes_fail_only_that_channel(tmp_path: Any) -> None:
    path = f"{tmp_path}/bus.sock"

    async def main() -> None:
        async with await ipcbus.trio.listen(f"unix://{path}") as listener:
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.connect(path)
            bad = await listener.accept()
            # A valid hello, then a frame whose reserved field is not zero.
            core = make_core(codec="msgpack", trusted=False, can_carry_handles=True, role="client")
            hello = core.take_output()
            assert hello is not None
            raw.sendall(bytes(hello[0]) + FRAME.pack(1, 0, 0, 7) + b"\xc0")

            async with trio.open_nursery() as nursery:
                good_server: list[AsyncChannel] = []

                async def accept_good() -> None:
                    good_server.append(await listener.accept())

                nursery.start_soon(accept_good)
                good = await ipcbus.trio.connect(f"unix://{path}")
            srv = good_server[0]

            with pytest.raises(ProtocolError, match="reserved") as first:
                await bad.recv()
            assert not isinstance(first.value, HandshakeError)
            assert bad.closed
            with pytest.raises(ProtocolError, match="reserved"):
                await bad.recv()  # sticky
            with pytest.raises(ChannelClosed):
                await bad.send("x")
            raw.close()

            async with good, srv:
                await good.send("still here")
                assert (await srv.recv()).data == "still here"
                await srv.send("and back")
                assert (await good.recv()).data == "and back"

    run(main)


# ----------------------------------------------------------------- handles


def test_AsyncChannel_passes_a_listening_tcp_socket() -> None:
    async def main() -> None:
        a, b = ipcbus.trio.pair()
        async with a, b:
            srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            srv.bind(("127.0.0.1", 0))
            srv.listen(4)
            await a.send({"cmd": "serve"}, handle=srv)
            srv.close()  # the message was written: closing our copy is safe
            msg = await b.recv()
            assert msg.data == {"cmd": "serve"}
            with msg.handle as got:
                assert isinstance(got, socket.socket)
                assert got.type == socket.SOCK_STREAM
                port = got.getsockname()[1]
                with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                    conn, _ = got.accept()
                    with conn:
                        c.sendall(b"ping")
                        assert conn.recv(4) == b"ping"

    run(main)


def test_AsyncChannel_aclose_closes_unread_handles() -> None:
    async def main() -> None:
        before = fd_count()
        a, b = ipcbus.trio.pair()
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
        try:
            await a.send("plain")
            await a.send({"n": 0}, handle=socks[0])
            await a.send({"n": 1}, handles=socks[1:])
            assert (await b.recv()).data == "plain"
            # Some handle messages are parsed (fds in this process), some are
            # still in the socket buffer; none were taken by recv.
            await b.aclose()
            await a.aclose()
        finally:
            for s in socks:
                s.close()
        gc.collect()
        assert fd_count() == before

    run(main)


def test_AsyncChannel_handle_burst_caller_closes_at_once() -> None:
    # On POSIX the channel queues its own duplicates: the caller closes its
    # pipe ends right after send/send_nowait, the messages are batched, and
    # the peer still reads from every fd it got. No fd is left afterwards.
    async def main() -> None:
        before = fd_count()
        a, b = ipcbus.trio.pair()
        async with a, b:
            for i in range(40):
                r, w = os.pipe()
                os.write(w, b"%d" % i)
                os.close(w)
                with ipcbus.Handle(r) as h:
                    if i % 2:
                        a.send_nowait(i, handle=h)
                    else:
                        await a.send(i, handle=h)
            for i in range(40):
                msg = await b.recv()
                assert msg.data == i
                with msg.handle as h:
                    assert os.read(h.fileno(), 10) == b"%d" % i
        gc.collect()
        assert fd_count() == before

    run(main)


@pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX fds (duplicated handles)")
def test_AsyncChannel_aclose_closes_queued_duplicates() -> None:
    # Handle messages still queued when the channel goes (the peer never
    # read, the flush was cut short): their duplicated fds are closed.
    async def main() -> None:
        before = fd_count()
        a, b = ipcbus.trio.pair()
        r, w = os.pipe()
        h = ipcbus.Handle(r)
        try:
            with trio.move_on_after(0.5):
                while True:  # until the socket buffer and HIGH_WATER are full
                    await a.send(b"x" * 60_000, handle=h)
            assert a._core.queued_fds > 0  # duplicates are waiting
            with trio.move_on_after(0.5):
                await a.aclose()
            await b.aclose()
        finally:
            h.close()
            os.close(w)
        gc.collect()
        assert fd_count() == before

    run(main)


def test_AsyncChannel_keep_open_false_closes_after_ack() -> None:
    async def main() -> None:
        a, b = ipcbus.trio.pair()
        async with a, b:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            await a.send("h", handle=s, keep_open=False)
            msg = await b.recv()
            msg.handle.close()
            await b.send("done")  # b has sent its ack with this
            assert (await a.recv()).data == "done"  # a read the ack first
            assert s.fileno() == -1

    run(main)


# ------------------------------------------------------- real processes

CHILD = textwrap.dedent(
    """
    import sys
    import trio
    import ipcbus.trio

    async def main():
        n = int(sys.argv[2])
        ch = await ipcbus.trio.connect("fd://" + sys.argv[1])
        async with ch:
            for i in range(n):
                try:
                    ch.send_nowait({"i": i})
                except trio.WouldBlock:
                    await ch.send({"i": i})
            msg = await ch.recv()
            await ch.send({"echo": msg.data})

    trio.run(main)
    """
)


def test_AsyncChannel_100k_messages_between_processes() -> None:
    n = 100_000
    parent_sock, child_sock = socket.socketpair()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(child_sock.fileno()), str(n)],
            pass_fds=[child_sock.fileno()],
        )
    finally:
        child_sock.close()

    async def main() -> None:
        ch = AsyncChannel._open(AsyncSocketStream(parent_sock, name="socketpair", trusted=True), "peer")
        async with ch:
            expected = 0
            while expected < n // 2:  # the bulk path
                try:
                    msg = ch.recv_nowait()
                except trio.WouldBlock:
                    msg = await ch.recv()
                assert msg.data == {"i": expected}
                expected += 1
            while expected < n:  # one await per message
                assert (await ch.recv()).data == {"i": expected}
                expected += 1
            assert ch.peer_pid == proc.pid
            await ch.send("done?")
            assert (await ch.recv()).data == {"echo": "done?"}
            rest = [msg async for msg in ch]  # ends at the child's close
            assert rest == []

    try:
        run(main)
    finally:
        try:
            assert proc.wait(timeout=TIMEOUT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
