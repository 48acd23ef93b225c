"""Python and real Node.js processes on one channel (Node's own IPC protocol).

Both directions of parenthood run the same scenarios (tests/node/
scenarios.py) against the same Node code (tests/node/peer_lib.js): Python
parent of a Node child through ``ipcbus.spawn(..., protocol="node")``, and
Python child of a Node parent through ``child_process.fork`` and
``ipcbus.parent()``. Every Node process's stderr is checked for the marks of
a confused Node (SentHandleNotReceivedWarning, internal assertions, uncaught
exceptions), and Node must exit cleanly.
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest
import trio

import ipcbus
import ipcbus.trio
from ipcbus import ChannelClosed, HandleError, ProtocolError, TransportError

NODE_DIR = Path(__file__).parent / "node"
sys.path.insert(0, str(NODE_DIR))
import scenarios  # noqa: E402

pytestmark = pytest.mark.node

TIMEOUT = 10.0
# What a Node process prints when the protocol went wrong: a handle it gave
# up on, an internal assertion (surplus ACK), an uncaught exception (bad
# JSON, unknown handle type) or an abort (a file fd).
NODE_TROUBLE = ("SentHandleNotReceivedWarning", "Assertion", "ERR_INTERNAL_ASSERTION", "Error", "Uncaught")


def assert_node_was_happy(stderr: str) -> None:
    for mark in NODE_TROUBLE:
        assert mark not in stderr, f"node printed {mark!r}:\n{stderr}"


def read_all(f: IO[bytes]) -> str:
    """All that was written to the temporary file ``f``, as text."""
    f.seek(0)
    return f.read().decode(errors="replace")


@contextmanager
def node_child(script: str = "peer.js") -> Iterator[ipcbus.ChildProcess]:
    """A Node child speaking to us over its IPC channel; on a clean exit of
    the block it is told to disconnect and must exit 0 with a clean stderr."""
    with tempfile.TemporaryFile() as err:
        child = ipcbus.spawn(["node", str(NODE_DIR / script)], ipc=True, protocol="node", stderr=err)
        try:
            yield child
            child.channel.send({"op": "exit"})
            with pytest.raises(ChannelClosed):
                while True:
                    child.channel.recv(timeout=TIMEOUT)
            assert child.wait(TIMEOUT) == 0
        finally:
            child.close()
        assert_node_was_happy(read_all(err))


# ------------------------------------------------- Python parent, Node child


@pytest.mark.parametrize("name", sorted(scenarios.ALL))
def test_python_parent_node_child(name: str) -> None:
    with node_child() as child:
        scenarios.ALL[name](child.channel)


def test_python_parent_sends_a_unix_server_to_node(tmp_path: Path) -> None:
    with node_child() as child:
        scenarios.server_to_node(child.channel, "unix", str(tmp_path / "s.sock"))


def test_node_child_refuses_nothing_we_send(tmp_path: Path) -> None:
    """Kinds Node cannot take are refused here, before a byte is written;
    the channel and the Node child carry on (its stderr is checked)."""
    with node_child() as child:
        ch = child.channel
        r, w = os.pipe()
        with open(r, "rb") as rf, open(w, "wb") as wf, open(tmp_path / "f", "wb") as f:
            for handle in (f, rf, wf, ipcbus.Handle(os.dup(f.fileno()))):
                with pytest.raises(HandleError):
                    ch.send("bad", handle)
                if isinstance(handle, ipcbus.Handle):
                    handle.close()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        with a, b, pytest.raises(HandleError, match="Unix datagram"):
            ch.send("bad", a)
        s1, s2 = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
        with s1, s2, pytest.raises(HandleError, match="one handle"):
            ch.send("two", handles=[s1, s2])
        scenarios.messages(ch)
        scenarios.server_to_node(ch)


def test_trio_parent_node_child() -> None:
    async def main() -> None:
        async with ipcbus.trio.spawn(
            ["node", str(NODE_DIR / "peer.js")], ipc=True, protocol="node", stderr=subprocess.DEVNULL
        ) as child:
            ch = child.channel
            await ch.send({"op": "echo", "data": {"u": "\u2028😀"}})
            with trio.fail_after(TIMEOUT):
                assert (await ch.recv()).data == {"echo": {"u": "\u2028😀"}}
            with socket.create_server(("127.0.0.1", 0)) as server:
                # send() returns once Node acknowledged the handle; the echo
                # sent right after it is held until then and arrives second.
                await ch.send({"tag": "trio"}, server)
                await ch.send({"op": "echo", "data": "after"})
                with trio.fail_after(TIMEOUT):
                    assert (await ch.recv()).data["got"] == "net.Server"
                    assert (await ch.recv()).data == {"echo": "after"}
                client = trio.socket.socket()
                with client:
                    await client.connect(server.getsockname())
                    with trio.fail_after(TIMEOUT):
                        data = await client.recv(100)
                assert data.startswith(b"node ")
                with trio.fail_after(TIMEOUT):
                    assert (await ch.recv()).data == {"served": "trio"}
            await ch.send({"op": "exit"})
            with trio.fail_after(TIMEOUT), pytest.raises(ChannelClosed):
                await ch.recv()
            with trio.fail_after(TIMEOUT):
                assert await child.wait() == 0

    trio.run(main)


# ------------------------------------------------- Node parent, Python child


def run_node_parent(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, IPCBUS_TEST_PYTHON=sys.executable)
    return subprocess.run(
        ["node", str(NODE_DIR / "fork_python.js"), *args],
        cwd=NODE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("name", sorted(scenarios.ALL))
def test_node_parent_python_child(name: str) -> None:
    result = run_node_parent("py_driver.py", name)
    assert result.returncode == 0, result.stderr
    assert f"ok {name}" in result.stdout
    assert_node_was_happy(result.stderr)


def test_node_parent_in_advanced_mode_is_refused() -> None:
    code = (
        "import os, ipcbus\n"
        "try:\n"
        "    ipcbus.parent()\n"
        "except ipcbus.TransportError as exc:\n"
        "    print('refused:', exc)\n"
        "print('env:', sorted(k for k in os.environ if k.startswith('NODE_CHANNEL')))\n"
    )
    script = (
        "const {fork} = require('child_process');"
        f"const c = fork('-c', [{json.dumps(code)}], {{execPath: {json.dumps(sys.executable)}, "
        "execArgv: [], serialization: 'advanced', stdio: ['ignore', 'inherit', 'inherit', 'ipc']});"
        "c.on('exit', (code) => process.exit(code));"
    )
    result = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "advanced" in result.stdout and "not supported" in result.stdout
    assert "env: []" in result.stdout  # removed, as Node removes them


# ------------------------------------------------- a bad "Node" on the wire


@contextmanager
def fake_node() -> Iterator[tuple[socket.socket, ipcbus.Channel]]:
    """Our channel on one end of a socketpair; the test writes raw bytes as
    a broken Node would on the other."""
    ours, theirs = socket.socketpair()
    try:
        ch = ipcbus.connect(f"fd://{ours.detach()}", protocol="node")
    except BaseException:
        ours.close()
        theirs.close()
        raise
    with theirs, ch:
        yield theirs, ch


@pytest.mark.parametrize(
    ("garbage", "match"),
    [
        (b"hello\n", "not valid JSON"),
        (b"\n", "empty line"),
        (b'{"n":NaN}\n', "NaN"),
        (b'{"a":1}{"b":2}\n', "not valid JSON"),
        (b"\xc3\x28\n", "UTF-8"),
    ],
    ids=["garbage", "empty-line", "NaN", "two-values", "bad-utf8"],
)
def test_bad_bytes_from_node_are_a_ProtocolError_on_that_channel(garbage: bytes, match: str) -> None:
    with fake_node() as (raw, ch), fake_node() as (raw2, other):
        raw.sendall(b'{"fine":1}\r\n' + garbage + b'"never"\n')
        assert ch.recv(timeout=TIMEOUT).data == {"fine": 1}
        with pytest.raises(ProtocolError, match=match):
            ch.recv(timeout=TIMEOUT)
        assert ch.closed
        with pytest.raises((ProtocolError, ChannelClosed)):
            ch.send("after the error")
        # Every other channel keeps working.
        raw2.sendall(b'"still here"\n')
        assert other.recv(timeout=TIMEOUT).data == "still here"


def test_fake_node_handle_of_the_wrong_kind_is_refused_and_closed() -> None:
    with fake_node() as (raw, ch):
        r, w = os.pipe()
        try:
            envelope = b'{"cmd":"NODE_HANDLE","type":"net.Server","msg":"pipe"}\n'
            raw.sendmsg([envelope], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, r.to_bytes(4, sys.byteorder))])
        finally:
            os.close(r)
            os.close(w)
        with pytest.raises(HandleError, match="pipe"):
            ch.recv(timeout=TIMEOUT)
        assert ch.closed  # and the pipe's fd with it (the fd-leak check)


def test_fake_node_server_that_is_not_listening_is_refused() -> None:
    with fake_node() as (raw, ch), socket.socket() as tcp:
        envelope = b'{"cmd":"NODE_HANDLE","type":"net.Server","msg":"not listening"}\n'
        raw.sendmsg([envelope], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, tcp.fileno().to_bytes(4, sys.byteorder))])
        with pytest.raises(HandleError, match="listening"):
            ch.recv(timeout=TIMEOUT)


def test_fake_node_truncated_last_message_is_reported() -> None:
    with fake_node() as (raw, ch):
        raw.sendall(b'"whole"\n{"half":')
        raw.shutdown(socket.SHUT_WR)
        assert ch.recv(timeout=TIMEOUT).data == "whole"
        with pytest.raises(ProtocolError, match="EOF inside a message"):
            ch.recv(timeout=TIMEOUT)


def test_node_protocol_option_errors() -> None:
    a, b = socket.socketpair()
    with a, b:
        for bad in ({"codec": "msgpack"}, {"authkey": b"k"}, {"internal_prefix": "APP_"}, {"heartbeat": 1.0}):
            fd = os.dup(a.fileno())
            with pytest.raises(ValueError):
                ipcbus.connect(f"fd://{fd}", protocol="node", **bad)
        with pytest.raises(ValueError, match="protocol"):
            ipcbus.spawn(["true"], ipc=True, protocol="node", codec="pickle")
    with pytest.raises(TransportError):
        ipcbus.connect("fd://999999", protocol="node")


# ------------------------------------------------- examples/node


EXAMPLE = Path(__file__).parent.parent / "examples" / "node" / "master.py"


def start_example(*args: str) -> tuple[subprocess.Popen[str], str]:
    master = subprocess.Popen(
        [sys.executable, str(EXAMPLE), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert master.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    seen = []
    # Only the first lines are read here (communicate() reads the rest),
    # from a thread so that a master that never gets there cannot hang us.
    first = threading.Thread(target=lambda: [lines.put(master.stdout.readline()) for _ in range(3)], daemon=True)
    first.start()
    try:
        while True:
            line = lines.get(timeout=30)
            seen.append(line)
            if "serving on " in line:
                first.join(TIMEOUT)
                return master, line.split("serving on ")[1].strip()
            if not line:
                raise queue.Empty
    except queue.Empty:
        master.kill()
        master.communicate(timeout=30)  # its workers leave when its channels close
        raise AssertionError("the example never started serving:\n" + "".join(seen)) from None


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        return response.read().decode()


def test_node_example_serves_from_both_runtimes_until_SIGTERM() -> None:
    master, url = start_example("--requests", "0")
    try:
        seen: dict[str, set[str]] = {}
        for i in range(300):
            runtime, pid = get(f"{url}r{i}").split()
            seen.setdefault(runtime, set()).add(pid)
            if len(seen) == 2:
                break
        assert set(seen) == {"node", "python"}, seen
        master.send_signal(signal.SIGTERM)
        out, _ = master.communicate(timeout=30)
    finally:
        if master.poll() is None:
            master.kill()
            master.communicate(timeout=30)
    assert master.returncode == 0, out
    assert "signal SIGTERM" in out and "workers exited {'node': 0, 'python': 0}" in out, out


def test_node_example_stops_by_itself_after_n_requests() -> None:
    master, url = start_example("--requests", "6")
    try:
        answers = [get(f"{url}n{i}") for i in range(6)]
        out, _ = master.communicate(timeout=30)
    finally:
        if master.poll() is None:
            master.kill()
            master.communicate(timeout=30)
    assert all(a.split()[0] in ("node", "python") for a in answers), answers
    assert master.returncode == 0, out
    assert "6 requests served" in out and "workers exited {'node': 0, 'python': 0}" in out, out


@pytest.mark.parametrize("runtime", ["node", "python"])
def test_node_example_worker_outlives_a_master_that_closes_mid_request(runtime: str) -> None:
    # A stopping master closes the channels while a worker may still be
    # answering a request. The worker then cannot report it: it must still
    # answer, and exit 0, not die of the failed report (an EPIPE, or a
    # ChannelClosed) with status 1.
    script = EXAMPLE.parent / ("worker.js" if runtime == "node" else "worker.py")
    with socket.create_server(("127.0.0.1", 0)) as server, tempfile.TemporaryFile() as err:
        if runtime == "node":
            child = ipcbus.spawn(["node", str(script)], ipc=True, protocol="node", stderr=err)
        else:
            child = ipcbus.fork(script, stderr=err)
        try:
            child.channel.send({"op": "serve"}, server)
            assert child.channel.recv().data["ready"] == runtime
            with socket.create_connection(server.getsockname()[:2], timeout=TIMEOUT) as client:
                client.sendall(b"GET /late HTTP/1.1\r\nHost: x\r\n")  # the headers go on
                deadline = time.monotonic() + TIMEOUT
                while select.select([server], [], [], 0)[0]:  # until the worker accepted it
                    assert time.monotonic() < deadline, "the worker never accepted the connection"
                    time.sleep(0.01)
                child.channel.close()
                time.sleep(0.2)  # (the worker sees the channel end, or not: both must work)
                client.sendall(b"\r\n")
                answer = b""
                while chunk := client.recv(4096):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 OK"), answer
            assert f"{runtime} {child.pid}\n".encode() in answer, answer  # (Node's is chunked)
            assert child.wait(TIMEOUT) == 0, read_all(err)
        finally:
            child.close(grace=2)
        if runtime == "node":
            assert_node_was_happy(read_all(err))
