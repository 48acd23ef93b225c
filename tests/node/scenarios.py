"""Interop scenarios run against the Node peer in tests/node/peer_lib.js.

Each takes a blocking ipcbus channel speaking Node's protocol and raises
AssertionError on a mismatch. The same functions run with Python as the
parent of a Node child (tests/test_node_interop.py) and as the child of a
Node parent (py_driver.py, started by fork_python.js), so both directions of
parenthood are checked by one body of code.
"""

from __future__ import annotations

import socket
from typing import Any

import ipcbus

TIMEOUT = 10.0


def recv(ch: ipcbus.Channel) -> ipcbus.Message:
    return ch.recv(timeout=TIMEOUT)


def expect(ch: ipcbus.Channel, **fields: Any) -> dict[str, Any]:
    """The next message; it must be a dict containing ``fields``."""
    msg = recv(ch)
    assert msg.handle is None, msg
    assert isinstance(msg.data, dict), msg.data
    for key, value in fields.items():
        assert msg.data.get(key) == value, (key, value, msg.data)
    return msg.data


VALUES: list[Any] = [
    {"hello": "world"},
    "unicode: é ß 中文 😀 \u0000 \t",
    "line separators \u2028 and \u2029 stay raw",
    {"nested": {"list": [1, 2.5, None, True, {"deep": ["a", {"b": []}]}]}, "empty": {}},
    [],
    "",
    0,
    -12345678901234,
    None,
    "a\nb\r\nc",
    {"lone": "\ud800"},
]


def messages(ch: ipcbus.Channel) -> None:
    for value in VALUES:
        ch.send({"op": "echo", "data": value})
        assert expect(ch)["echo"] == value


# Scalars a flat message (string keys, scalar values) carries; ints stay
# within what a JavaScript number holds exactly.
FLAT_VALUES: list[Any] = [
    "plain",
    'quote " backslash \\ newline \n tab \t nul \u0000 del \x7f',
    "é ß 中文 😀 \u2028\u2029",
    "%s %d %%",
    "lone \ud800",
    "",
    0,
    -(2**53) + 1,
    2.5,
    1e300,
    True,
    False,
    None,
]


def flat_messages(ch: ipcbus.Channel) -> None:
    """Messages of one flat shape: the codec writes all but the first by
    its flat path. Node must read each as the value that was sent."""
    for value in FLAT_VALUES:
        message = {"op": "echo-all", "value": value, 'key "%s" \n\u2028': value}
        ch.send(message)
        assert expect(ch)["echo"] == message


def stream_from_node(ch: ipcbus.Channel, n: int = 10_000) -> None:
    ch.send({"op": "stream", "n": n})
    for i in range(n):
        msg = recv(ch)
        assert msg.data == {"i": i, "s": "x\u2028y"}, (i, msg.data)
    expect(ch, done=n)


def stream_to_node(ch: ipcbus.Channel, n: int = 10_000) -> None:
    ch.send({"op": "expect"})
    expect(ch, ready=True)
    for i in range(n):
        ch.send({"i": i})
    ch.send({"op": "expect-end"})
    assert expect(ch) == {"received": n, "bad": None}


def internal(ch: ipcbus.Channel) -> None:
    ch.send({"op": "internal"})
    # The NODE_ messages before it never reach recv(); exactly "NODE_" does.
    assert expect(ch) == {"cmd": "NODE_"}
    expect(ch, after="internal")


def server_from_node(ch: ipcbus.Channel) -> None:
    ch.send({"op": "send-server"})
    msg = recv(ch)
    # The handle message comes first: Node's sender queues what follows it,
    # and we must deliver in order.
    assert msg.data["kind"] == "net.Server", msg.data
    server = msg.handle
    with server:
        assert isinstance(server, socket.socket)
        assert server.family == socket.AF_INET and server.type == socket.SOCK_STREAM
        assert server.getsockname()[1] == msg.data["port"]
        expect(ch, after="net.Server")
        # Node's copy listens too: close it, so that the connection is ours.
        ch.send({"op": "close-kept", "which": "server"})
        expect(ch, closed="server")
        server.settimeout(TIMEOUT)  # stays O_NONBLOCK underneath (Node's way)
        with socket.create_connection(("127.0.0.1", msg.data["port"]), timeout=TIMEOUT) as client:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                conn.sendall(b"python answers\n")
            assert _read_all(client) == b"python answers\n"


def server_to_node(ch: ipcbus.Channel, family: str = "tcp", path: str | None = None) -> None:
    if family == "tcp":
        server = socket.create_server(("127.0.0.1", 0))
        address: Any = server.getsockname()
    else:
        assert path is not None
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen()
        address = path
    with server:
        ch.send({"tag": family}, server)
        expect(ch, got="net.Server", tag=family, listening=True)
        with socket.socket(server.family, socket.SOCK_STREAM) as client:
            client.settimeout(TIMEOUT)
            client.connect(address)
            data = _read_all(client)
        assert data.startswith(b"node ") and data.endswith(f" {family}\n".encode()), data
        expect(ch, served=family)


def socket_from_node(ch: ipcbus.Channel) -> None:
    ch.send({"op": "send-socket"})
    msg = recv(ch)
    assert msg.data == {"kind": "net.Socket"}, msg.data
    conn = msg.handle
    with conn:
        assert conn.type == socket.SOCK_STREAM and conn.gettimeout() is None  # ours alone
        expect(ch, after="net.Socket")
        conn.settimeout(TIMEOUT)
        assert _read_line(conn) == b"ping\n"
        # Node counts the sockets it handed out by asking us.
        ch.send({"op": "count"})
        expect(ch, count=1, err=None)
        conn.sendall(b"pong\n")
    expect(ch, client_got="pong\n")
    # close() on Node's server waits for our NODE_SOCKET_ALL_CLOSED.
    ch.send({"op": "close-kept", "which": "socketServer"})
    expect(ch, closed="socketServer")


def socket_to_node(ch: ipcbus.Channel) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname(), timeout=TIMEOUT)
        conn, _ = server.accept()
    with client:
        ch.send({"tag": "sock"}, conn, keep_open=False)  # closed once Node ACKed
        expect(ch, got="net.Socket", tag="sock")
        assert _read_line(client).startswith(b"hello from node ")
        client.sendall(b"from python\n")
        assert _read_all(client) == b"echo:from python\n"
    expect(ch, socket_closed="from python\n")
    # Whatever the frontend does with a keep_open=False handle, it must
    # have been closed by now (the ACK came before Node's answer).
    assert conn.fileno() == -1


def dgram_from_node(ch: ipcbus.Channel) -> None:
    ch.send({"op": "send-dgram"})
    msg = recv(ch)
    assert msg.data["kind"] == "dgram.Socket", msg.data
    with msg.handle as sock:
        assert sock.family == socket.AF_INET and sock.type == socket.SOCK_DGRAM
        expect(ch, after="dgram.Socket")
        ch.send({"op": "close-kept", "which": "dgram"})
        expect(ch, closed="dgram")
        sock.settimeout(TIMEOUT)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(TIMEOUT)
            client.sendto(b"ping", ("127.0.0.1", msg.data["port"]))
            data, peer = sock.recvfrom(100)
            assert data == b"ping"
            sock.sendto(b"pong", peer)
            assert client.recvfrom(100)[0] == b"pong"


def dgram_to_node(ch: ipcbus.Channel) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        ch.send({"tag": "udp"}, sock)
        got = expect(ch, got="dgram.Socket", tag="udp")
        assert got["address"]["port"] == port
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(TIMEOUT)
        client.sendto(b"hi", ("127.0.0.1", port))
        assert client.recvfrom(100)[0] == b"node:hi"
    expect(ch, dgram_answered="hi")


def handles_then_messages(ch: ipcbus.Channel) -> None:
    """Python sends a handle and, at once, plain messages: Node must see the
    handle first (we hold the rest until its ACK)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        ch.send({"tag": "first"}, server)
        ch.send({"op": "echo", "data": "second"})
        expect(ch, got="net.Server", tag="first")
        assert expect(ch)["echo"] == "second"
        with socket.create_connection(server.getsockname(), timeout=TIMEOUT) as client:
            _read_all(client)
        expect(ch, served="first")


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


ALL = {
    name: globals()[name]
    for name in [
        "messages",
        "flat_messages",
        "stream_from_node",
        "stream_to_node",
        "internal",
        "server_from_node",
        "server_to_node",
        "socket_from_node",
        "socket_to_node",
        "dgram_from_node",
        "dgram_to_node",
        "handles_then_messages",
    ]
}
