"""Handle passing (issue 3), with real processes, real sockets and real fds.

Every kind of handle goes parent -> child and child -> parent and is then
used for real (a connection accepted and answered, a datagram received,
bytes read from a pipe, a file read). The protocol's fd rules are attacked
with frames crafted by hand and written with ``socket.sendmsg``. This file is
also the child's program: ``python test_handles.py --child``.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

import pytest

import ipcbus
from ipcbus._protocol import FRAME, FRAME_DATA, HELLO, HELLO_FLAG_HANDLES, MAGIC, VERSION

pytestmark = pytest.mark.skipif(
    sys.platform == "win32" or not hasattr(socket, "AF_UNIX"), reason="needs POSIX SCM_RIGHTS"
)

T = 20.0  # seconds any single wait in these tests may take
ECHO = b"echo:"

# kind -> what the receiver must see (see _describe_obj)
EXPECTED = {
    "tcp4_listen": "socket/AF_INET/SOCK_STREAM/listening",
    "tcp6_listen": "socket/AF_INET6/SOCK_STREAM/listening",
    "tcp_accepted": "socket/AF_INET/SOCK_STREAM/-",
    "tcp_connected": "socket/AF_INET/SOCK_STREAM/-",
    "udp": "socket/AF_INET/SOCK_DGRAM/-",
    "unix_listen": "socket/AF_UNIX/SOCK_STREAM/listening",
    "unix_conn": "socket/AF_UNIX/SOCK_STREAM/-",
    "unix_dgram": "socket/AF_UNIX/SOCK_DGRAM/-",
    "pipe_handle": "Handle",
    "pipe_file": "BufferedReader/rb",
    "file": "BufferedReader/rb",
    "file_handle": "Handle",
}
KINDS = list(EXPECTED)
FILE_CONTENT = b"file-content-0123456789"


def has_ipv6() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"))


# ---------------------------------------------------------------- the kinds
# make(): the handle and what its maker keeps to exercise it; drive(): the
# maker's half (connect and write, write to the pipe); use(): the receiver's
# half (accept, read, answer); finish(): the maker checks the answer.


def make(kind: str, tmpdir: str) -> tuple[Any, Any]:
    if kind in ("tcp4_listen", "tcp6_listen"):
        host = "::1" if kind == "tcp6_listen" else "127.0.0.1"
        fam = socket.AF_INET6 if kind == "tcp6_listen" else socket.AF_INET
        srv = socket.create_server((host, 0), family=fam)
        return srv, ("tcp", srv.getsockname()[:2], fam)
    if kind in ("tcp_accepted", "tcp_connected"):
        with socket.create_server(("127.0.0.1", 0)) as lst:
            cli = socket.create_connection(lst.getsockname(), timeout=T)
            acc, _ = lst.accept()
        return (acc, cli) if kind == "tcp_accepted" else (cli, acc)
    if kind == "udp":
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", 0))
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.bind(("127.0.0.1", 0))
        return u, (c, u.getsockname())
    if kind == "unix_listen":
        path = os.path.join(tmpdir, "l.sock")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen()
        return srv, ("unix", path, socket.AF_UNIX)
    if kind == "unix_conn":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return a, b
    if kind == "unix_dgram":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        return a, b
    if kind in ("pipe_handle", "pipe_file"):
        r, w = os.pipe()
        obj = ipcbus.Handle(r) if kind == "pipe_handle" else os.fdopen(r, "rb")
        return obj, w
    if kind in ("file", "file_handle"):
        path = os.path.join(tmpdir, "data.bin")
        with open(path, "wb") as f:
            f.write(FILE_CONTENT)
        obj = open(path, "rb") if kind == "file" else ipcbus.Handle(os.open(path, os.O_RDONLY))  # noqa: SIM115
        return obj, None
    raise AssertionError(kind)


def drive(kind: str, peer: Any) -> Any:
    if kind.endswith("_listen"):
        _, addr, fam = peer
        c = socket.socket(fam, socket.SOCK_STREAM)
        c.settimeout(T)
        c.connect(addr)
        c.sendall(b"ping")
        return c
    if kind in ("tcp_accepted", "tcp_connected", "unix_conn", "unix_dgram"):
        peer.settimeout(T)
        peer.send(b"ping")
        return peer
    if kind == "udp":
        c, addr = peer
        c.settimeout(T)
        c.sendto(b"ping", addr)
        return c
    if kind.startswith("pipe"):
        os.write(peer, b"ping")
        os.close(peer)
        return None
    return None


def finish(kind: str, conn: Any) -> None:
    if conn is None:
        return
    with conn:
        assert conn.recv(100) == ECHO + b"ping"


def use(kind: str, obj: Any) -> bytes:
    """Exercise a received handle for real; returns what it read."""
    with contextlib.closing(obj):
        if kind.endswith("_listen"):
            obj.settimeout(T)
            conn, _ = obj.accept()
            with conn:
                conn.settimeout(T)
                data = conn.recv(100)
                conn.sendall(ECHO + data)
            return data
        if kind in ("tcp_accepted", "tcp_connected", "unix_conn", "unix_dgram"):
            obj.settimeout(T)
            data = obj.recv(100)
            obj.send(ECHO + data)
            return data
        if kind == "udp":
            obj.settimeout(T)
            data, addr = obj.recvfrom(100)
            obj.sendto(ECHO + data, addr)
            return data
        if kind in ("pipe_handle", "file_handle"):
            return os.read(obj.fileno(), 100)
        return obj.read(100)


def expected_data(kind: str) -> bytes:
    return FILE_CONTENT if kind.startswith("file") else b"ping"


def describe_obj(obj: Any) -> str:
    if isinstance(obj, socket.socket):
        listening = "-"
        if obj.type == socket.SOCK_STREAM and obj.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            listening = "listening"
        return f"socket/{obj.family.name}/{obj.type.name}/{listening}"
    if isinstance(obj, ipcbus.Handle):
        return "Handle"
    return f"{type(obj).__name__}/{getattr(obj, 'mode', '?')}"


def close_all(objs: Any) -> None:
    for o in objs if isinstance(objs, (list, tuple)) else [objs]:
        if o is not None:
            if isinstance(o, int):
                with contextlib.suppress(OSError):
                    os.close(o)
            else:
                o.close()


def close_peer(kind: str, peer: Any) -> None:
    if isinstance(peer, tuple) and peer and isinstance(peer[0], socket.socket):
        peer[0].close()
    elif isinstance(peer, (socket.socket, int)):
        close_all(peer)


# ---------------------------------------------------------------- the child


def child_main() -> None:
    ch = ipcbus.parent()
    assert ch is not None
    tmpdir = tempfile.mkdtemp()
    try:
        for msg in ch:
            cmd = msg.data["cmd"]
            if cmd == "use":
                kind = msg.data["kind"]
                desc = describe_obj(msg.handle)
                data = use(kind, msg.handle)
                ch.send({"type": desc, "data": data})
            elif cmd == "use_many":
                descs = [describe_obj(h) for h in msg.handle]
                datas = [use(k, h) for k, h in zip(msg.data["kinds"], msg.handle, strict=True)]
                ch.send({"types": descs, "datas": datas})
            elif cmd == "make":
                kind = msg.data["kind"]
                obj, peer = make(kind, tmpdir)
                ch.send({"kind": kind}, handle=obj)
                obj.close()  # the parent has its own copy now
                conn = drive(kind, peer)
                finish(kind, conn)
                close_peer(kind, peer)
                ch.send({"ok": True})
            elif cmd == "sink":
                before = fd_count()
                ch.send("sinking")  # the parent sends nothing more before this
                got = 0
                while got < msg.data["n"]:
                    m = ch.recv(timeout=T)
                    for h in m.handles:
                        h.close()
                        got += 1
                ch.send({"got": got, "before": before, "after": fd_count()})
            elif cmd == "order":
                seen = []
                while True:
                    m = ch.recv(timeout=T)
                    if m.data == "end":
                        break
                    marks = []
                    for h in m.handles:
                        with h:
                            marks.append(int(os.read(h.fileno(), 32)))
                    seen.append([m.data["seq"], marks, len(m.data["pad"])])
                ch.send({"seen": seen})
            elif cmd == "hold":
                # Receive nothing until the parent writes a line on stdin.
                ch.send("holding")
                sys.stdin.readline()
            elif cmd == "recv_then_hold":
                print("waiting", flush=True)
                m = ch.recv(timeout=T)
                data = os.read(m.handle.fileno(), 100)
                print(f"got {data.decode()}", flush=True)
                sys.stdin.readline()  # only receives: never sends, never reads again
                m.handle.close()
            elif cmd == "exit":
                break
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        ch.close()


if __name__ == "__main__" and sys.argv[1:] == ["--child"]:
    child_main()
    sys.exit(0)


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def child():
    c = ipcbus.fork(__file__, ["--child"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        yield c
        with contextlib.suppress(ipcbus.IPCError):
            c.channel.send({"cmd": "exit"})
    finally:
        c.close(grace=5)
        if c.stdout is not None:
            c.stdout.close()
    assert c.returncode == 0


def _skip_missing(kind: str) -> None:
    if kind == "tcp6_listen" and not has_ipv6():
        pytest.skip("IPv6 loopback ::1 is not available on this machine")


# ---------------------------------------------------------------- each kind, both ways


@pytest.mark.parametrize("kind", KINDS)
def test_handle_parent_to_child(kind: str, child, tmp_path) -> None:
    _skip_missing(kind)
    ch = child.channel
    obj, peer = make(kind, str(tmp_path))
    try:
        ch.send({"cmd": "use", "kind": kind}, handle=obj)
        obj.close()  # the child has its own copy: it must work without ours
        conn = drive(kind, peer)
        reply = ch.recv(timeout=T).data
        assert reply == {"type": EXPECTED[kind], "data": expected_data(kind)}
        finish(kind, conn)
    finally:
        obj.close()
        close_peer(kind, peer)


@pytest.mark.parametrize("kind", KINDS)
def test_handle_child_to_parent(kind: str, child) -> None:
    _skip_missing(kind)
    ch = child.channel
    ch.send({"cmd": "make", "kind": kind})
    msg = ch.recv(timeout=T)
    assert msg.data == {"kind": kind}
    assert describe_obj(msg.handle) == EXPECTED[kind]
    assert use(kind, msg.handle) == expected_data(kind)
    assert ch.recv(timeout=T).data == {"ok": True}


def test_several_handles_in_one_message(child, tmp_path) -> None:
    kinds = ["tcp4_listen", "udp", "unix_conn", "pipe_handle", "pipe_file", "file"] * 2 + ["unix_dgram"] * 4
    assert len(kinds) == 16  # the default limit, reached exactly
    made = [make(k, str(tmp_path / str(i))) for i, k in enumerate(kinds) if not (tmp_path / str(i)).mkdir()]
    ch = child.channel
    try:
        ch.send({"cmd": "use_many", "kinds": kinds}, handles=[o for o, _ in made])
        conns = [drive(k, p) for k, (_, p) in zip(kinds, made, strict=True)]
        reply = ch.recv(timeout=T).data
        assert reply["types"] == [EXPECTED[k] for k in kinds]
        assert reply["datas"] == [expected_data(k) for k in kinds]
        for k, c in zip(kinds, conns, strict=True):
            finish(k, c)
    finally:
        for (o, p), k in zip(made, kinds, strict=True):
            o.close()
            close_peer(k, p)


def test_handle_limit_per_message() -> None:
    a, b = ipcbus.pair()
    with a, b:
        r, w = os.pipe()
        try:
            hs = [ipcbus.Handle(os.dup(r)) for _ in range(17)]
            with pytest.raises(ipcbus.HandleError, match=r"17 handles.*limit is 16"):
                a.send("x", handles=hs)
            for h in hs:
                h.close()
            a.send("still fine")
            assert b.recv(timeout=T).data == "still fine"
        finally:
            os.close(r)
            os.close(w)
    with pytest.raises(ValueError, match="SCM_MAX_FD"):
        ipcbus.pair(max_handles=254)


def test_single_handle_arrives_bare_and_list_arrives_as_tuple() -> None:
    a, b = ipcbus.pair()
    r, w = os.pipe()
    with a, b, ipcbus.Handle(r) as h, ipcbus.Handle(w):
        a.send(1, handle=h)
        a.send(2, handles=[h])
        m1, m2 = b.recv(timeout=T), b.recv(timeout=T)
        assert isinstance(m1.handle, ipcbus.Handle)
        assert isinstance(m2.handle, tuple) and len(m2.handle) == 1
        for m in (m1, m2):
            for x in m.handles:
                x.close()


# ---------------------------------------------------------------- volume and fd accounting


def test_10000_handles_leave_fd_counts_unchanged(child) -> None:
    n = 10_000
    ch = child.channel
    r, w = os.pipe()
    before = fd_count()
    released = []
    try:
        with ipcbus.Handle(r) as keep:
            ch.send({"cmd": "sink", "n": n})
            assert ch.recv(timeout=T).data == "sinking"
            for i in range(n):
                if i % 2:
                    ch.send(i, handle=keep)  # keep_open=True: the same fd again and again
                else:
                    h = ipcbus.Handle(os.dup(keep.fileno()))
                    released.append(h)
                    ch.send(i, handle=h, keep_open=False)
            reply = ch.recv(timeout=60).data
        assert reply["got"] == n
        assert reply["after"] == reply["before"], "the child kept fds"
        # Every acknowledgement came before the reply: each copy is closed.
        assert all(h.closed for h in released)
    finally:
        os.close(w)
        for h in released:
            h.close()
    assert fd_count() == before - 2  # r and w are closed


# ---------------------------------------------------------------- hostile peers


def _raw_hello(handles: bool = True) -> bytes:
    name = b"msgpack"
    body = bytes([len(name)]) + name + struct.pack(">I", 1 << 20) + bytes([0])
    return HELLO.pack(MAGIC, VERSION, HELLO_FLAG_HANDLES if handles else 0, len(body), os.getpid()) + body


def _handle_frame(payload: Any, descs: list[bytes], multi: bool = False) -> bytes:
    import msgpack

    body = bytes([1 if multi else 0]) + b"".join(descs) + msgpack.packb(payload)
    return FRAME.pack(len(body), FRAME_DATA, len(descs), 0) + body


def _plain_frame(payload: Any) -> bytes:
    import msgpack

    body = msgpack.packb(payload)
    return FRAME.pack(len(body), FRAME_DATA, 0, 0) + body


def _fds(fds: list[int]) -> list[tuple[int, int, bytes]]:
    import array

    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


@contextlib.contextmanager
def hostile_peer():
    """(raw socket we write crafted bytes to, ipcbus channel reading them),
    plus an unrelated healthy channel pair that must keep working."""
    raw, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.sendall(_raw_hello())
    ch = ipcbus.connect(f"fd://{theirs.detach()}")
    a, b = ipcbus.pair()
    try:
        yield raw, ch
        a.send({"still": "working"})
        assert b.recv(timeout=T).data == {"still": "working"}
    finally:
        raw.close()
        ch.close()
        a.close()
        b.close()


SOCKET_TCP_LISTEN = bytes([1, 2, 1, 1])
BARE_FD = bytes([3, 0, 0, 0])


def test_frame_claiming_more_fds_than_attached() -> None:
    r, w = os.pipe()
    try:
        with hostile_peer() as (raw, ch):
            before = fd_count()
            raw.sendmsg([_handle_frame("two", [BARE_FD, BARE_FD])], _fds([r]))
            with pytest.raises(ipcbus.HandleError, match="declares 2 handle"):
                ch.recv(timeout=T)
            assert ch.closed
            assert fd_count() == before - 1  # the one fd that came was closed (and our channel)
    finally:
        os.close(r)
        os.close(w)


def test_fds_with_no_frame_claiming_them() -> None:
    r, w = os.pipe()
    try:
        with hostile_peer() as (raw, ch):
            before = fd_count()
            # A plain frame (0 handles) with two fds riding on it, then more.
            raw.sendmsg([_plain_frame("plain")], _fds([r, w]))
            raw.sendall(_plain_frame("after"))
            assert ch.recv(timeout=T).data == "plain"
            with pytest.raises(ipcbus.HandleError, match="no frame claiming them"):
                ch.recv(timeout=T)
            assert fd_count() == before - 1
    finally:
        os.close(r)
        os.close(w)


def test_stray_fds_then_eof() -> None:
    r, w = os.pipe()
    try:
        with hostile_peer() as (raw, ch):
            before = fd_count()
            raw.sendmsg([_plain_frame("last")], _fds([r]))
            raw.shutdown(socket.SHUT_WR)
            assert ch.recv(timeout=T).data == "last"
            with pytest.raises(ipcbus.HandleError, match="no frame claiming them"):
                ch.recv(timeout=T)
            assert fd_count() == before - 1
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize(
    ("desc", "make_fd", "match"),
    [
        (SOCKET_TCP_LISTEN, "pipe", "declared a socket, but the fd is a pipe"),
        (SOCKET_TCP_LISTEN, "udp", "declared AF_INET/SOCK_STREAM, got AF_INET/SOCK_DGRAM"),
        (SOCKET_TCP_LISTEN, "tcp", "declared listening"),
        (bytes([1, 1, 1, 0]), "tcp_listen", "declared AF_UNIX/SOCK_STREAM, got AF_INET"),
        (bytes([2, 1, 0, 0]), "tcp", "declared a file, but the fd is a socket"),
        (bytes([9, 0, 0, 0]), "pipe", "unknown handle kind 9"),
    ],
)
def test_declared_kind_must_match_the_fd(desc: bytes, make_fd: str, match: str) -> None:
    objs: list[Any] = []
    if make_fd == "pipe":
        r, w = os.pipe()
        objs = [r, w]
        fd = r
    elif make_fd == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        objs = [s]
        fd = s.fileno()
    elif make_fd == "tcp":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        objs = [s]
        fd = s.fileno()
    else:
        s = socket.create_server(("127.0.0.1", 0))
        objs = [s]
        fd = s.fileno()
    try:
        with hostile_peer() as (raw, ch):
            # A good handle message first: it is delivered, the bad one fails.
            raw.sendmsg([_handle_frame("good", [BARE_FD])], _fds([fd]))
            raw.sendmsg([_handle_frame("bad", [desc])], _fds([fd]))
            good = ch.recv(timeout=T)
            good.handle.close()
            before = fd_count()
            with pytest.raises(ipcbus.HandleError, match=match):
                ch.recv(timeout=T)
            assert fd_count() == before - 1  # the bad fd is closed, and so is the channel
            assert ch.closed
    finally:
        close_all(objs)


def test_truncated_control_data_is_a_handle_error(tmp_path) -> None:
    # The receiver cannot install every fd (RLIMIT_NOFILE): the kernel sets
    # MSG_CTRUNC and delivers fewer. ipcbus must close what came and fail.
    script = tmp_path / "ctrunc_child.py"
    script.write_text(
        "import os, resource, sys, ipcbus\n"
        "ch = ipcbus.parent()\n"
        "ch.send('ready')\n"
        "top = max(int(x) for x in os.listdir('/proc/self/fd'))\n"
        "fillers = []\n"  # no free fd number below top: only top+1 is left
        "while (fd := os.open(os.devnull, os.O_RDONLY)) < top:\n"
        "    fillers.append(fd)\n"
        "os.close(fd)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (top + 2, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "n0 = len(os.listdir('/proc/self/fd'))\n"
        "try:\n"
        "    ch.recv(timeout=20)\n"
        "    print('NO ERROR')\n"
        "except ipcbus.HandleError as exc:\n"
        "    print('HandleError:', exc)\n"
        "print('fds', n0, len(os.listdir('/proc/self/fd')))\n"
    )
    with ipcbus.fork(script, stdout=subprocess.PIPE) as c:
        assert c.channel.recv(timeout=T).data == "ready"
        r, w = os.pipe()
        try:
            c.channel.send("many", handles=[ipcbus.Handle(os.dup(r)) for _ in range(6)], keep_open=False)
            out = c.stdout.read().decode()
        finally:
            os.close(r)
            os.close(w)
        c.stdout.close()
        assert c.wait(timeout=T) == 0
    assert "HandleError:" in out and "MSG_CTRUNC" in out, out
    fds_line = out.strip().splitlines()[-1].split()
    # The channel's own fd is gone (failed channel); no received fd remains.
    assert int(fds_line[2]) <= int(fds_line[1]), out


# ---------------------------------------------------------------- ordering


def test_ordering_with_a_random_mix_of_plain_and_handle_messages(child) -> None:
    seed = 20240603
    rng = random.Random(seed)
    ch = child.channel
    ch.send({"cmd": "order"})
    sent = []
    for seq in range(600):
        pad = b"x" * rng.choice([0, 10, 3000, 40_000])
        nh = rng.choice([0, 0, 0, 1, 1, 3])
        pipes = [os.pipe() for _ in range(nh)]
        for _, w in pipes:
            os.write(w, str(seq).encode())
            os.close(w)
        hs = [ipcbus.Handle(r) for r, _ in pipes]
        if nh == 1 and rng.random() < 0.5:
            ch.send({"seq": seq, "pad": pad}, handle=hs[0], keep_open=False)
        elif nh:
            ch.send({"seq": seq, "pad": pad}, handles=hs, keep_open=False)
        else:
            ch.send({"seq": seq, "pad": pad})
        sent.append([seq, [seq] * nh, len(pad)])
    ch.send("end")
    reply = ch.recv(timeout=60).data
    assert reply["seen"] == sent, f"seed {seed}"


# ---------------------------------------------------------------- ownership on the sender


def test_keep_open_false_closes_only_after_the_ack(child) -> None:
    ch = child.channel
    ch.send({"cmd": "hold"})
    assert ch.recv(timeout=T).data == "holding"  # the child now receives nothing
    r, w = os.pipe()
    os.write(w, b"data")
    os.close(w)
    h = ipcbus.Handle(r)
    try:
        ch.send({"cmd": "use", "kind": "pipe_handle"}, handle=h, keep_open=False)
        # Written, but not received: no acknowledgement, so ours stays open,
        # however much this side reads.
        for _ in range(3):
            with pytest.raises(TimeoutError):
                ch.recv(timeout=0.2)
            assert not h.closed
            os.fstat(h.fileno())
        child.stdin.write(b"go\n")
        child.stdin.flush()
        reply = ch.recv(timeout=T).data
        assert reply == {"type": "Handle", "data": b"data"}
        assert h.closed  # the ack came before the reply
    finally:
        h.close()


def test_keep_open_true_leaves_the_senders_copy_open(child) -> None:
    ch = child.channel
    r, w = os.pipe()
    with ipcbus.Handle(r) as h:
        try:
            ch.send({"cmd": "use", "kind": "pipe_handle"}, handle=h)
            os.write(w, b"ping")
            assert ch.recv(timeout=T).data == {"type": "Handle", "data": b"ping"}
            assert not h.closed
            os.write(w, b"again")
            assert os.read(h.fileno(), 10) == b"again"  # ours still works
        finally:
            os.close(w)


def test_ack_flows_when_the_receiver_only_receives(child) -> None:
    ch = child.channel
    ch.send({"cmd": "recv_then_hold"})
    # The handshake is over and the child is idle in recv(): the handle
    # arrives alone, and its acknowledgement has no reply to ride with.
    assert child.stdout.readline() == b"waiting\n"
    r, w = os.pipe()
    os.write(w, b"hello")
    os.close(w)
    h = ipcbus.Handle(r)
    try:
        time.sleep(0.05)
        ch.send("handle", handle=h, keep_open=False)
        assert child.stdout.readline() == b"got hello\n"
        # The child now neither sends nor calls recv again: its ack must
        # still arrive. recv() here reads it (and times out: no message).
        deadline = time.monotonic() + T
        while not h.closed and time.monotonic() < deadline:
            with pytest.raises(TimeoutError):
                ch.recv(timeout=0.05)
        assert h.closed
    finally:
        h.close()
        child.stdin.write(b"done\n")
        child.stdin.flush()


def test_a_sender_that_only_sends_still_releases(child) -> None:
    ch = child.channel
    ch.send({"cmd": "sink", "n": 200})
    assert ch.recv(timeout=T).data == "sinking"
    r, w = os.pipe()
    hs = []
    try:
        # No recv() on this side until the end: acknowledgements are read
        # while sending, so the copies close as we go.
        for i in range(200):
            h = ipcbus.Handle(os.dup(r))
            hs.append(h)
            ch.send(i, handle=h, keep_open=False)
            if i % 20 == 19:
                time.sleep(0.01)
        assert sum(h.closed for h in hs[:150]) > 0
        assert ch.recv(timeout=T).data["got"] == 200
        assert all(h.closed for h in hs)
    finally:
        os.close(r)
        os.close(w)
        for h in hs:
            h.close()


def test_unacknowledged_handles_close_with_the_channel() -> None:
    a, b = ipcbus.pair()
    r, w = os.pipe()
    h = ipcbus.Handle(r)
    try:
        before = fd_count()
        a.send("x", handle=h, keep_open=False)
        b.close()  # never received: b closes the fd it got
        a.close()  # never acknowledged: a closes ours
        assert h.closed
        assert fd_count() == before - 3  # h, and both channel ends
    finally:
        h.close()
        os.close(w)


# ---------------------------------------------------------------- transports without handles


def _connect_both(lst: Any, url: str, **options: Any) -> tuple[Any, Any]:
    # connect() completes the handshake, so the accepting side must run too.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(ipcbus.connect, url, **options)
        s = lst.accept(timeout=T)
        s.wait_handshake(timeout=T)
        return fut.result(timeout=T), s


@pytest.mark.skipif(sys.platform == "win32", reason="the channel duplicates fds only on POSIX")
def test_a_burst_of_handles_whose_senders_copies_close_at_once() -> None:
    # A burst of handle messages may wait in the buffer (to share one
    # sendmsg): what is queued is the channel's own duplicate, so the caller
    # may close its copy as soon as send returns, and the duplicates are
    # closed once written.
    a, b = ipcbus.pair()
    r, w = os.pipe()
    try:
        before = fd_count()
        n = 200
        for i in range(n):
            mine = ipcbus.Handle(os.dup(r))
            a.send(i, handle=mine)
            mine.close()  # before the message was necessarily written
        a.flush(timeout=T)
        assert fd_count() == before  # the channel's duplicates are closed
        os.write(w, b"x" * n)
        for i in range(n):
            msg = b.recv(timeout=T)
            assert msg.data == i
            with msg.handle as h:
                assert os.read(h.fileno(), 1) == b"x"  # a working copy of the pipe
    finally:
        a.close()
        b.close()
        os.close(r)
        os.close(w)


@pytest.mark.skipif(sys.platform == "win32", reason="the channel duplicates fds only on POSIX")
def test_unwritten_handle_messages_close_their_fds_with_the_channel() -> None:
    a, b = ipcbus.pair()
    r, w = os.pipe()
    try:
        before = fd_count()
        h = ipcbus.Handle(r)
        for i in range(20):
            a.send(i, handle=h)
        h.detach()
        b.close()
        a.close()  # nothing more can be written: the duplicates are closed
        assert fd_count() == before - 2
    finally:
        a.close()
        b.close()
        os.close(r)
        os.close(w)


@pytest.mark.skipif(sys.platform == "win32", reason="the channel duplicates fds only on POSIX")
def test_a_burst_then_a_message_with_many_handles_closes_only_the_duplicates() -> None:
    # A message with many handles is written at once with the caller's own
    # fds, together with the burst queued before it: the channel closes its
    # duplicates and nothing of the caller's.
    a, b = ipcbus.pair()
    r, w = os.pipe()
    h = ipcbus.Handle(r)
    try:
        before = fd_count()
        for i in range(10):
            a.send(i, handle=h)
        a.send("many", handles=[h] * 8)
        a.flush(timeout=T)
        assert fd_count() == before
        os.fstat(r)  # still ours, still open
        got = []
        for _ in range(11):
            msg = b.recv(timeout=T)
            got.append(msg.data)
            for x in msg.handles:
                x.close()
        assert got == [*range(10), "many"]
    finally:
        h.close()
        os.close(w)
        a.close()
        b.close()


@pytest.mark.parametrize("burst", [False, True])
def test_sending_a_closed_fd_is_a_handle_error_and_the_channel_lives_on(burst: bool) -> None:
    a, b = ipcbus.pair()
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    bad = ipcbus.Handle(r)
    try:
        if burst:
            a.send("first")  # the next send may be queued behind it
        with pytest.raises(ipcbus.HandleError):
            a.send("bad", handle=bad)
        with pytest.raises(ipcbus.HandleError):
            a.send("bad", handles=[bad] * 6)
        a.send("fine")
        if burst:
            assert b.recv(timeout=T).data == "first"
        assert b.recv(timeout=T).data == "fine"
    finally:
        bad.detach()
        a.close()
        b.close()


def test_memory_transport_refuses_handles() -> None:
    with ipcbus.listen("memory://handles-test") as lst:
        c, s = _connect_both(lst, "memory://handles-test")
        with c, s:
            assert not c.can_send_handles
            r, w = os.pipe()
            with ipcbus.Handle(r) as h, ipcbus.Handle(w):
                with pytest.raises(ipcbus.HandleError, match="memory"):
                    c.send("x", handle=h)
                c.send("plain is fine")
                assert s.recv(timeout=T).data == "plain is fine"


def test_tcp_transport_refuses_handles() -> None:
    key = b"k" * 32
    lst = ipcbus.listen("tcp://127.0.0.1:0", authkey=key)
    with lst:
        c, s = _connect_both(lst, lst.address, authkey=key)
        with c, s:
            assert not c.can_send_handles
            sock = socket.socket()
            try:
                with pytest.raises(ipcbus.HandleError, match="tcp"):
                    c.send("x", handle=sock)
            finally:
                sock.close()


def test_not_a_handle() -> None:
    a, b = ipcbus.pair()
    with a, b:
        with pytest.raises(ipcbus.HandleError, match="bare int"):
            a.send("x", handle=3)
        with pytest.raises(ipcbus.HandleError, match="not a handle"):
            a.send("x", handle=object())
        with pytest.raises(TypeError):
            a.send("x", handle=io.BytesIO(), handles=[])


# ---------------------------------------------------------------- trio frontend


def test_trio_parent_to_child_and_back(tmp_path) -> None:
    trio = pytest.importorskip("trio")
    import ipcbus.trio as itrio

    kinds = ["tcp4_listen", "udp", "unix_conn", "pipe_file"]

    async def main() -> None:
        async with itrio.fork(__file__, ["--child"]) as c:
            ch = c.channel
            for kind in kinds:
                obj, peer = make(kind, str(tmp_path / kind) if not (tmp_path / kind).mkdir() else "")
                try:
                    await ch.send({"cmd": "use", "kind": kind}, handle=obj)
                    obj.close()
                    conn = await trio.to_thread.run_sync(drive, kind, peer)
                    with trio.fail_after(T):
                        reply = (await ch.recv()).data
                    assert reply == {"type": EXPECTED[kind], "data": expected_data(kind)}
                    await trio.to_thread.run_sync(finish, kind, conn)
                finally:
                    obj.close()
                    close_peer(kind, peer)
                await ch.send({"cmd": "make", "kind": kind})
                with trio.fail_after(T):
                    msg = await ch.recv()
                assert describe_obj(msg.handle) == EXPECTED[kind]
                assert await trio.to_thread.run_sync(use, kind, msg.handle) == expected_data(kind)
                with trio.fail_after(T):
                    assert (await ch.recv()).data == {"ok": True}
            await ch.send({"cmd": "exit"})

    trio.run(main)


def test_trio_keep_open_false_and_bad_kind() -> None:
    trio = pytest.importorskip("trio")
    import ipcbus.trio as itrio

    async def main() -> None:
        a, b = itrio.pair()
        r, w = os.pipe()
        h = ipcbus.Handle(r)
        try:
            async with a, b:
                await a.send("x", handle=h, keep_open=False)
                assert not h.closed
                with trio.fail_after(T):
                    m = await b.recv()
                m.handle.close()
                await b.send("reply")  # carries the ack before it
                with trio.fail_after(T):
                    assert (await a.recv()).data == "reply"
                assert h.closed
        finally:
            h.close()
            os.close(w)

        raw, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.sendall(_raw_hello())
        r, w = os.pipe()
        try:
            ch = await itrio.connect(f"fd://{theirs.detach()}")
            async with ch:
                raw.sendmsg([_handle_frame("bad", [SOCKET_TCP_LISTEN])], _fds([r]))
                before = fd_count()
                with trio.fail_after(T), pytest.raises(ipcbus.HandleError, match="declared a socket"):
                    await ch.recv()
                assert fd_count() <= before - 1
        finally:
            raw.close()
            os.close(r)
            os.close(w)

    trio.run(main)


# ---------------------------------------------------------------- the benchmark runs


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bench_handles.py uses os.fork")
def test_bench_handles_smoke() -> None:
    # Figures from so small a run mean nothing; it must run and print its table.
    bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "bench_handles.py")
    out = subprocess.run(
        [sys.executable, bench, "--count", "320", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=110,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for row in ("raw send_fds x1", "raw send_fds x16", "mp send_handle", "ipcbus blocking", "ipcbus trio"):
        assert row in out.stdout, out.stdout
    assert "target ipcbus blocking >= 0.7x" in out.stdout


def test_a_failed_keep_open_false_send_leaves_the_handle_with_the_caller() -> None:
    # The peer is gone, so send raises: the handle was not handed over and
    # stays the caller's (it may offer it to another peer, as the cluster's
    # round-robin acceptor does). Closing the channel must not close it.
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        a, b = ipcbus.pair()
        b.close()
        time.sleep(0.05)  # a lone send: written (and refused) before send returns
        with pytest.raises(ipcbus.ChannelClosed):
            a.send("x", handle=sock, keep_open=False)
        a.close()
        assert sock.fileno() >= 0
        sock.sendto(b"still mine", sock.getsockname())
        assert sock.recv(100) == b"still mine"
    finally:
        sock.close()
