"""Windows: named pipes (pipe://), fork() over an inherited pipe, handle
passing with socket.share / DuplicateHandle, typed errors for bad input.

Runs on Windows only; on Linux, scripts/test-windows.sh runs it (and the
rest of the portable suite) in the official Windows CPython under Wine.
Real processes, real pipes, real sockets.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import ipcbus
from ipcbus._protocol import FRAME, HELLO, MAGIC, VERSION

pytestmark = pytest.mark.skipif(sys.platform != "win32", reason="needs Windows (named pipes, _winapi)")

T = 20  # seconds: the bound of every wait, so nothing can hang
N = 10_000


def write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


# ----------------------------------------------------------- pipe transport


def _pump(sender: ipcbus.Channel, receiver: ipcbus.Channel) -> None:
    errors: list[BaseException] = []

    def rx() -> None:
        try:
            for i in range(N):
                msg = receiver.recv(timeout=T)
                assert msg.data == {"i": i, "pad": "x" * (i % 64)}
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    th = threading.Thread(target=rx)
    th.start()
    for i in range(N):
        sender.send({"i": i, "pad": "x" * (i % 64)})
    sender.flush(timeout=T)
    th.join(T)
    assert not th.is_alive()
    assert not errors, errors


def test_pair_is_a_pipe_and_keeps_order_over_10k_messages() -> None:
    a, b = ipcbus.pair()
    with a, b:
        assert a.transport == "pipepair"
        assert a.can_send_handles
        _pump(a, b)
        _pump(b, a)


def test_listen_connect_10k_messages_both_ways() -> None:
    with ipcbus.listen("pipe://") as listener:
        assert listener.address.startswith("pipe://ipcbus-")
        result: list[ipcbus.Channel] = []
        th = threading.Thread(target=lambda: result.append(listener.accept(timeout=T)))
        th.start()
        client = ipcbus.connect(listener.address)
        th.join(T)
        server = result[0]
        with client, server:
            assert client.peer_pid == os.getpid()
            _pump(client, server)
            _pump(server, client)
            big = b"B" * (3 * 1024 * 1024)  # many pipe buffers' worth in one message
            sender = threading.Thread(target=client.send, args=(big,))
            sender.start()
            assert server.recv(timeout=T).data == big
            sender.join(T)


def test_trio_pair_and_listen_10k_messages() -> None:
    trio = pytest.importorskip("trio")
    import ipcbus.trio

    async def pump(a, b) -> None:
        async with trio.open_nursery() as nursery:
            async def tx() -> None:
                for i in range(N):
                    await a.send([i, "y" * (i % 50)])
            nursery.start_soon(tx)
            for i in range(N):
                with trio.fail_after(T):
                    assert (await b.recv()).data == [i, "y" * (i % 50)]

    async def main() -> None:
        a, b = ipcbus.trio.pair()
        async with a, b:
            await pump(a, b)
            await pump(b, a)
        listener = await ipcbus.trio.listen("pipe://")
        async with listener:
            async with trio.open_nursery() as nursery:
                got = []

                async def acc() -> None:
                    got.append(await listener.accept())

                nursery.start_soon(acc)
                client = await ipcbus.trio.connect(listener.address)
            server = got[0]
            async with client, server:
                await pump(client, server)
                await pump(server, client)
                # a handle over the trio pipe
                ls = socket.socket()
                ls.bind(("127.0.0.1", 0))
                ls.listen(1)
                await client.send("sock", handle=ls, keep_open=False)
                with trio.fail_after(T):
                    msg = await server.recv()
                with msg.handle as got_sock:
                    assert got_sock.getsockname() == ls.getsockname()

    trio.run(main)


def test_listener_owns_its_name_and_bounds_instances() -> None:
    with ipcbus.listen("pipe://", max_instances=1) as listener:
        # FILE_FLAG_FIRST_PIPE_INSTANCE: nobody else can serve this name.
        with pytest.raises(ipcbus.TransportError, match="exists already"):
            ipcbus.listen(listener.address)
        result: list[ipcbus.Channel] = []
        th = threading.Thread(target=lambda: result.append(listener.accept(timeout=T)))
        th.start()
        first = ipcbus.connect(listener.address)
        th.join(T)
        # The one instance is taken: a second client waits, then gives up.
        with first, result[0], pytest.raises(ipcbus.TransportError, match="busy"):
            ipcbus.connect(listener.address, timeout=0.5)


def test_connect_to_nobody_is_a_transport_error() -> None:
    with pytest.raises(ipcbus.TransportError, match="nobody listens"):
        ipcbus.connect(f"pipe://ipcbus-test-nobody-{os.getpid()}")


def test_accept_timeout_leaves_the_listener_usable() -> None:
    with ipcbus.listen("pipe://") as listener:
        with pytest.raises(TimeoutError):
            listener.accept(timeout=0.2)
        result: list[ipcbus.Channel] = []
        th = threading.Thread(target=lambda: result.append(listener.accept(timeout=T)))
        th.start()
        with ipcbus.connect(listener.address) as client:
            th.join(T)
            with result[0] as server:
                client.send("after timeout")
                assert server.recv(timeout=T).data == "after timeout"


# ------------------------------------------------------------- handles


def test_handles_in_a_pair_socket_file_and_handle(tmp_path: Path) -> None:
    a, b = ipcbus.pair()
    with a, b:
        ls = socket.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        a.send("listener", handle=ls)
        msg = b.recv(timeout=T)
        with msg.handle as got, ls:
            assert got.family == socket.AF_INET and got.type == socket.SOCK_STREAM
            assert got.getsockname() == ls.getsockname()
            with socket.create_connection(ls.getsockname(), timeout=T) as c:
                conn, _ = got.accept()
                with conn:
                    c.sendall(b"ping")
                    assert conn.recv(10) == b"ping"
        path = tmp_path / "f.txt"
        with open(path, "w+b") as f:
            f.write(b"hello file")
            a.send("file", handle=f)
            with b.recv(timeout=T).handle as g:
                g.seek(0)
                assert g.read() == b"hello file"
        r, w = os.pipe()
        with ipcbus.Handle(w) as hw:
            a.send("pipe end", handle=hw)
            with b.recv(timeout=T).handle as got_w:
                os.write(got_w.fileno(), b"through a duplicated handle")
        try:
            assert os.read(r, 100) == b"through a duplicated handle"
        finally:
            os.close(r)


def test_keep_open_false_closes_the_senders_copy_after_the_ack() -> None:
    a, b = ipcbus.pair()
    with a, b:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        a.send("take it", handle=s, keep_open=False)
        msg = b.recv(timeout=T)
        b.send("done")
        assert a.recv(timeout=T).data == "done"  # reads the ack too
        assert s.fileno() == -1, "keep_open=False: closed once the peer acknowledged"
        with msg.handle as got:
            assert got.getsockname()[1] > 0
        s2 = socket.socket()
        a.send("keep", handle=s2)  # keep_open=True: ours stays open
        with b.recv(timeout=T).handle:
            pass
        b.send("done")
        assert a.recv(timeout=T).data == "done"
        assert s2.fileno() != -1
        s2.close()


CHILD = """
import os, socket, ipcbus
ch = ipcbus.parent()
ch.send({"hello": os.getpid()})
for msg in ch:
    if msg.data == "serve":
        ls = msg.handle
        for _ in range(3):
            conn, _ = ls.accept()
            with conn:
                conn.sendall(b"child:" + conn.recv(100))
        ls.close()
        ch.send("served")
    elif msg.data == "socket please":
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        ch.send({"port": s.getsockname()[1]}, handle=s, keep_open=False)
        ch.recv()
    elif msg.data == "exit":
        break
    else:
        ch.send({"echo": msg.data})
"""


def test_fork_channel_both_ways_and_a_listening_socket_served_by_the_child(tmp_path: Path) -> None:
    script = write(tmp_path, "child.py", CHILD)
    with ipcbus.fork(script) as child:
        ch = child.channel
        hello = ch.recv(timeout=T).data
        assert hello == {"hello": child.pid}
        assert ch.peer_pid == child.pid
        for i in range(100):
            ch.send([i, "x" * i])
            assert ch.recv(timeout=T).data == {"echo": [i, "x" * i]}
        ls = socket.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen(8)
        port = ls.getsockname()[1]
        ch.send("serve", handle=ls, keep_open=False)
        for i in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=T) as c:
                c.sendall(b"hi%d" % i)
                assert c.recv(100) == b"child:hi%d" % i
        assert ch.recv(timeout=T).data == "served"
        # and the other way: a socket made by the child
        ch.send("socket please")
        msg = ch.recv(timeout=T)
        with msg.handle as s:
            assert s.getsockname()[1] == msg.data["port"]
        ch.send("ok")
        ch.send("exit")
        assert child.wait(T) == 0


def test_node_protocol_fails_clearly_on_windows() -> None:
    with pytest.raises(ipcbus.TransportError, match=r"node-ipc\.md"):
        ipcbus.spawn([sys.executable, "-c", "pass"], ipc=True, protocol="node")


# ----------------------------------------------------- bad input, typed errors


def _raw_client(address: str) -> int:
    import _winapi

    from ipcbus.transports._pipe import pipe_path

    return _winapi.CreateFile(
        pipe_path(address.removeprefix("pipe://")),
        _winapi.GENERIC_READ | _winapi.GENERIC_WRITE, 0, _winapi.NULL, _winapi.OPEN_EXISTING, 0, _winapi.NULL,
    )


def _record(data: bytes) -> bytes:
    return struct.pack(">BI", 0, len(data)) + data


def _hello(codec: bytes = b"msgpack") -> bytes:
    body = bytes([len(codec)]) + codec + struct.pack(">I", 64 * 1024 * 1024) + b"\x00"
    return HELLO.pack(MAGIC, VERSION, 1, len(body), os.getpid()) + body


@pytest.mark.parametrize(
    ("raw", "error", "match"),
    [
        (_record(b"GET / HTTP/1.1\r\n\r\n"), ipcbus.HandshakeError, "bad magic"),
        (_record(_hello(b"json")), ipcbus.HandshakeError, "codec"),
        (_record(_hello() + FRAME.pack(2**31, 0, 0, 0)), ipcbus.ProtocolError, "exceeds max_message_size"),
        (_record(_hello() + FRAME.pack(2, 0, 0, 0) + b"\xc1\xc1"), ipcbus.CodecError, None),
        (_record(_hello() + FRAME.pack(4, 9, 0, 0) + b"abcd"), ipcbus.ProtocolError, "unknown frame type"),
        (_record(_hello()) + b"\x07garbage", ipcbus.ProtocolError, "record tag"),
        (_record(_hello()) + struct.pack(">BI", 1, 3) + b"\x01\x09\x00", ipcbus.HandleError, "handle record"),
    ],
    ids=["not-ipcbus", "codec-mismatch", "oversized-frame", "bad-msgpack", "frame-type", "record-tag", "handle-record"],
)
def test_bad_input_gives_typed_errors(raw: bytes, error: type[Exception], match: str | None) -> None:
    import _winapi

    with ipcbus.listen("pipe://") as listener:
        h: list[int] = []
        th = threading.Thread(target=lambda: h.append(_raw_client(listener.address)))
        th.start()
        server = listener.accept(timeout=T)
        th.join(T)
        try:
            _winapi.WriteFile(h[0], raw)
            with server, pytest.raises(error, match=match):
                server.recv(timeout=T)
            assert server.closed
        finally:
            _winapi.CloseHandle(h[0])


def test_truncated_stream_is_a_protocol_error() -> None:
    import _winapi

    with ipcbus.listen("pipe://") as listener:
        h: list[int] = []
        th = threading.Thread(target=lambda: h.append(_raw_client(listener.address)))
        th.start()
        server = listener.accept(timeout=T)
        th.join(T)
        _winapi.WriteFile(h[0], _record(_hello()) + struct.pack(">BI", 0, 100) + b"short")
        _winapi.CloseHandle(h[0])
        with server, pytest.raises(ipcbus.ProtocolError, match="EOF inside a record"):
            server.recv(timeout=T)
