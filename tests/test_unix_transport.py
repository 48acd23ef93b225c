"""Security and robustness of the unix:// transport: file mode and umask, the
stale-file probe, path limits, removal on close, backlog, peer uid checks."""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import socket
import stat
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ipcbus
from ipcbus.transports import _unix

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs AF_UNIX sockets")

NOBODY = 65534


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_socket_file_is_0600(tmp_path: Path) -> None:
    path = tmp_path / "bus.sock"
    with ipcbus.listen(f"unix://{path}"):
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert _mode(path) == 0o600


def test_socket_is_bound_under_a_restrictive_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real_bind = socket.socket.bind

    def spy_bind(self: socket.socket, address: Any) -> None:
        if self.family == socket.AF_UNIX:
            current = os.umask(0o077)
            os.umask(current)
            seen.append(current)
        real_bind(self, address)

    monkeypatch.setattr(socket.socket, "bind", spy_bind)
    old = os.umask(0)  # the most permissive process umask
    try:
        with ipcbus.listen(f"unix://{tmp_path}/bus.sock"):
            assert os.umask(0) == 0  # restored after the bind
            assert _mode(tmp_path / "bus.sock") == 0o600
    finally:
        os.umask(old)
    assert seen and all(mask & 0o177 == 0o177 for mask in seen), [oct(m) for m in seen]


def test_explicit_mode(tmp_path: Path) -> None:
    with ipcbus.listen(f"unix://{tmp_path}/bus.sock", mode=0o660):
        assert _mode(tmp_path / "bus.sock") == 0o660


# ------------------------------------------------------------ existing files


def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "bus.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: stale
    assert path.exists()
    with ipcbus.listen(f"unix://{path}") as listener, _client(listener.address) as got, \
            listener.accept(timeout=10) as ch:
        ch.send("live")
        assert ch.recv(timeout=10).data == "hello"
    assert got == ["live"]


def test_live_server_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bus.sock"
    with ipcbus.listen(f"unix://{path}") as first:
        ino = os.stat(path).st_ino
        with pytest.raises(ipcbus.TransportError, match="address in use"):
            ipcbus.listen(f"unix://{path}")
        assert os.stat(path).st_ino == ino  # untouched
        # The refused listen() probed with a connect: the live server sees a
        # peer that left before its hello, an error on that channel only.
        with first.accept(timeout=10) as probe, pytest.raises((ipcbus.ChannelClosed, ipcbus.HandshakeError)):
            probe.recv(timeout=10)
        with _client(first.address) as got, first.accept(timeout=10) as ch:  # the first still works
            ch.send("still here")
            ch.recv(timeout=10)
        assert got == ["still here"]


def test_regular_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bus.sock"
    path.write_text("precious")
    with pytest.raises(ipcbus.TransportError, match="not a socket"):
        ipcbus.listen(f"unix://{path}")
    assert path.read_text() == "precious"


def test_path_too_long_names_the_limit(tmp_path: Path) -> None:
    limit = _unix.SUN_PATH_MAX - 1
    path = tmp_path / ("x" * (_unix.SUN_PATH_MAX + 10))
    for call in (ipcbus.listen, ipcbus.connect):
        with pytest.raises(ipcbus.TransportError, match=f"limit on this platform is {limit}"):
            call(f"unix://{path}")
    if sys.platform.startswith("linux"):
        with pytest.raises(ipcbus.TransportError, match=f"limit on this platform is {limit}"):
            ipcbus.listen("unix-abstract://" + "y" * _unix.SUN_PATH_MAX)


def test_connect_to_nothing_is_a_transport_error(tmp_path: Path) -> None:
    with pytest.raises(ipcbus.TransportError, match="cannot connect"):
        ipcbus.connect(f"unix://{tmp_path}/nobody.sock")


def test_listener_removes_its_file_on_close(tmp_path: Path) -> None:
    path = tmp_path / "bus.sock"
    listener = ipcbus.listen(f"unix://{path}")
    assert path.exists()
    listener.close()
    assert not path.exists()
    listener.close()  # idempotent


def test_listener_leaves_a_replacement_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "bus.sock"
    first = ipcbus.listen(f"unix://{path}")
    os.unlink(path)  # someone removed it and another server took the path
    second = ipcbus.listen(f"unix://{path}")
    ino = os.stat(path).st_ino
    first.close()
    assert path.exists() and os.stat(path).st_ino == ino
    second.close()
    assert not path.exists()


# ------------------------------------------------------------------- backlog


def test_default_backlog_is_at_least_128() -> None:
    assert _unix.DEFAULT_BACKLOG >= 128
    default = inspect.signature(_unix.UnixTransport.listen).parameters["backlog"].default
    assert default >= 128


def test_150_clients_connect_before_the_first_accept(tmp_path: Path) -> None:
    with ipcbus.listen(f"unix://{tmp_path}/bus.sock") as listener:
        path = str(tmp_path / "bus.sock")
        clients = []
        try:
            for _ in range(150):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                clients.append(s)
                s.setblocking(False)
                s.connect(path)  # BlockingIOError (EAGAIN) once the queue is full
            for _ in range(150):
                listener.accept(timeout=10).close()
        finally:
            for s in clients:
                s.close()


# ---------------------------------------------------------------- peer uid


@contextlib.contextmanager
def _client(address: str, **options: Any) -> Iterator[list[Any]]:
    """A well-behaved client thread: receives one message, answers "hello"."""
    got: list[Any] = []

    def run() -> None:
        with ipcbus.connect(address, **options) as ch:
            got.append(ch.recv(timeout=10).data)
            ch.send("hello")
            ch.flush(timeout=10)

    t = threading.Thread(target=run)
    t.start()
    try:
        yield got
    finally:
        t.join(20)


@contextlib.contextmanager
def _shared_dir() -> Iterator[Path]:
    # pytest's tmp_path is under a 0700 directory other users cannot enter.
    path = Path(tempfile.mkdtemp(prefix="ipcbus-uid-", dir="/tmp"))
    os.chmod(path, 0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _connect_as(uid: int, address: str) -> tuple[int, int]:
    """Fork a child that drops to ``uid`` and connects to ``address``; it
    reports (over a pipe) the outcome. Returns (pid, read end).

    A fork is used rather than Popen(user=): the interpreter lives under
    /root, which other users cannot reach, while a forked child already has
    ipcbus loaded.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.write(w, b"ready\n")
            try:
                with ipcbus.connect(address, handshake_timeout=20) as ch:
                    ch.send({"uid": os.getuid()})
                    ch.recv(timeout=20)
                    result = "connected"
            except ipcbus.IPCError as exc:
                result = type(exc).__name__
            os.write(w, result.encode() + b"\n")
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _read_lines(fd: int) -> list[str]:
    chunks = []
    while data := os.read(fd, 1024):
        chunks.append(data)
    return b"".join(chunks).decode().split()


@pytest.mark.skipif(not hasattr(os, "fork") or os.geteuid() != 0, reason="needs root to run a client as uid 65534")
def test_peer_with_a_foreign_uid_is_refused() -> None:
    with _shared_dir() as d, ipcbus.listen(f"unix://{d}/bus.sock", mode=0o666) as listener:
        pid, r = _connect_as(NOBODY, listener.address)
        try:
            assert os.read(r, 6) == b"ready\n"
            with pytest.raises(TimeoutError):
                listener.accept(timeout=2)
            outcome = _read_lines(r)
        finally:
            os.close(r)
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert outcome and outcome[0] in {"HandshakeError", "ChannelClosed", "TransportError"}, outcome


@pytest.mark.skipif(not hasattr(os, "fork") or os.geteuid() != 0, reason="needs root to run a client as uid 65534")
@pytest.mark.parametrize("scheme", ["unix", "unix-abstract"])
def test_allowed_uid_is_admitted(scheme: str) -> None:
    if scheme == "unix-abstract" and not sys.platform.startswith("linux"):
        pytest.skip("abstract unix sockets need Linux")
    with _shared_dir() as d:
        url = f"unix://{d}/bus.sock" if scheme == "unix" else f"unix-abstract://ipcbus-{uuid.uuid4().hex}"
        options = {"mode": 0o666} if scheme == "unix" else {}
        with ipcbus.listen(url, allowed_uids=[NOBODY], **options) as listener:
            pid, r = _connect_as(NOBODY, listener.address)
            try:
                with listener.accept(timeout=20) as ch:
                    assert ch.recv(timeout=20).data == {"uid": NOBODY}
                    creds = ch.stream.peer_credentials()
                    assert creds is not None and creds[1] == NOBODY
                    ch.send("welcome")
                    outcome = _read_lines(r)
            finally:
                os.close(r)
                _, status = os.waitpid(pid, 0)
        assert outcome == ["ready", "connected"]
        assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(os, "fork") or os.geteuid() != 0,
                    reason="needs Linux abstract sockets and root")
def test_abstract_name_refuses_a_foreign_uid() -> None:
    # No file mode guards an abstract name: the uid check is all there is.
    with ipcbus.listen(f"unix-abstract://ipcbus-{uuid.uuid4().hex}") as listener:
        pid, r = _connect_as(NOBODY, listener.address)
        try:
            assert os.read(r, 6) == b"ready\n"
            with pytest.raises(TimeoutError):
                listener.accept(timeout=2)
            outcome = _read_lines(r)
        finally:
            os.close(r)
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert outcome and outcome[0] in {"HandshakeError", "ChannelClosed", "TransportError"}, outcome
