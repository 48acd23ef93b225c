"""Child processes, blocking API: fork/spawn/parent/exec/exec_file/wait_children.

Real interpreters, real socketpairs, real signals. The child programs are
written to tmp_path by each test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import ipcbus
from ipcbus._process import CHANNEL_CODEC_ENV, CHANNEL_FD_ENV, inherited_channel

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX fd inheritance (pass_fds)")

T = 20  # seconds: the upper bound of every wait, so nothing can hang

ECHO = """
import os, ipcbus
ch = ipcbus.parent()
ch.send({"hello": os.getpid()})
for msg in ch:
    if msg.data == "exit":
        raise SystemExit(int(os.environ.get("EXIT_CODE", "0")))
    ch.send({"echo": msg.data})
"""


def write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return line.split()[1] in ("Z", "X")
    except FileNotFoundError:
        return True
    except ProcessLookupError:
        return True
    return False


def our_zombies() -> list[int]:
    """Zombie children of this process, from /proc."""
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = dict(
                line.split(":", 1) for line in Path(f"/proc/{entry}/status").read_text().splitlines() if ":" in line
            )
        except OSError:
            continue
        if fields.get("PPid", "").strip() == me and fields.get("State", "").split()[:1] == ["Z"]:
            found.append(int(entry))
    return found


def wait_until(predicate, timeout: float = T, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def read_pid(path: Path, timeout: float = T) -> int:
    wait_until(lambda: path.exists() and path.read_text().strip().endswith("."), timeout, f"pid file {path}")
    return int(path.read_text().strip().rstrip("."))


# ------------------------------------------------------------------ messages


def test_fork_messages_both_ways(tmp_path: Path) -> None:
    script = write(tmp_path, "echo.py", ECHO)
    with ipcbus.fork(script) as child:
        assert child.channel.recv(timeout=T).data == {"hello": child.pid}
        payloads = [1, "two", {"three": [3]}, b"\x00four", None]
        for p in payloads:
            child.channel.send(p)
        assert [child.channel.recv(timeout=T).data for _ in payloads] == [{"echo": p} for p in payloads]
        assert child.channel.peer_pid == child.pid
        child.channel.send("exit")
        assert child.wait(T) == 0
        with pytest.raises(ipcbus.ChannelClosed):
            child.channel.recv(timeout=T)
    assert child.returncode == 0 and child.exit_code == 0 and child.signal is None


def test_fork_module_and_args_and_codec(tmp_path: Path) -> None:
    pkg = tmp_path / "hellopkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    write(
        pkg,
        "worker.py",
        """
        import sys, ipcbus
        ch = ipcbus.parent()
        ch.send({"argv": sys.argv[1:], "codec": ch.codec.name, "name": __name__})
        ch.recv()
        """,
    )
    with ipcbus.fork(module="hellopkg.worker", args=["a", "b c"], codec="json", cwd=tmp_path) as child:
        msg = child.channel.recv(timeout=T)
        assert msg.data == {"argv": ["a", "b c"], "codec": "json", "name": "__main__"}
        assert child.channel.codec.name == "json"
        child.channel.send("bye")
        assert child.wait(T) == 0


def test_fork_arguments_are_checked() -> None:
    with pytest.raises(TypeError):
        ipcbus.fork()
    with pytest.raises(TypeError):
        ipcbus.fork("x.py", module="x")
    with pytest.raises(ValueError, match="unknown channel protocol"):
        ipcbus.spawn(["true"], ipc=True, protocol="nope")
    with pytest.raises(ValueError, match="needs ipc=True"):
        ipcbus.spawn(["true"], protocol="nope")
    with pytest.raises(ipcbus.CodecError):
        ipcbus.spawn(["true"], ipc=True, codec="no-such-codec")
    with pytest.raises(TypeError):
        ipcbus.spawn("true")


# --------------------------------------------------------------- environment


def test_channel_env_is_removed_and_grandchild_has_no_channel(tmp_path: Path) -> None:
    grandchild = write(
        tmp_path,
        "grandchild.py",
        """
        import json, os, ipcbus
        print(json.dumps({
            "parent_is_none": ipcbus.parent() is None,
            "env": sorted(k for k in os.environ if k.startswith("IPCBUS_CHANNEL")),
        }))
        """,
    )
    middle = write(
        tmp_path,
        "middle.py",
        f"""
        import json, os, subprocess, sys, ipcbus
        before = sorted(k for k in os.environ if k.startswith("IPCBUS_CHANNEL"))
        ch = ipcbus.parent()
        after = sorted(k for k in os.environ if k.startswith("IPCBUS_CHANNEL"))
        plain = subprocess.run([sys.executable, {str(grandchild)!r}], capture_output=True, check=True)
        ch.send({{
            "before": before,
            "after": after,
            "same": ipcbus.parent() is ch,
            "grandchild": json.loads(plain.stdout),
        }})
        ch.recv()
        """,
    )
    with ipcbus.fork(middle) as child:
        report = child.channel.recv(timeout=T).data
        child.channel.send("done")
        assert child.wait(T) == 0
    assert report["before"] == sorted([CHANNEL_CODEC_ENV, CHANNEL_FD_ENV])
    assert report["after"] == []
    assert report["same"] is True
    assert report["grandchild"] == {"parent_is_none": True, "env": []}


def test_spawn_scrubs_inherited_channel_env(tmp_path: Path) -> None:
    # A middle process that never takes its channel still must not pass it
    # on: ipcbus removes the variables from every child's environment.
    probe = write(
        tmp_path,
        "probe.py",
        """
        import json, os, ipcbus
        print(json.dumps([ipcbus.parent() is None, sorted(k for k in os.environ if k.startswith("IPCBUS_"))]))
        """,
    )
    # Start from an environment without IPCBUS_ variables (CI sets some).
    base = {k: v for k, v in os.environ.items() if not k.startswith("IPCBUS_")}
    env = dict(base, **{CHANNEL_FD_ENV: "987", CHANNEL_CODEC_ENV: "json", "IPCBUS_KEEP": "1"})
    result = ipcbus.exec_file(sys.executable, [probe], env=env, timeout=T, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '[true, ["IPCBUS_KEEP"]]'
    with ipcbus.spawn([sys.executable, probe], env=env, stdout=subprocess.PIPE) as child:
        assert child.wait(T) == 0
        assert child.stdout.read().strip() == b'[true, ["IPCBUS_KEEP"]]'


def test_parent_without_channel_is_none_and_stable(tmp_path: Path) -> None:
    script = write(
        tmp_path,
        "alone.py",
        """
        import ipcbus
        assert ipcbus.parent() is None
        assert ipcbus.parent() is None
        print("ok")
        """,
    )
    result = ipcbus.exec_file(sys.executable, [script], timeout=T)
    assert (result.returncode, result.stdout) == (0, b"ok\n"), result.stderr


def test_inherited_channel_reads_the_environment() -> None:
    assert inherited_channel({}) is None
    found = inherited_channel({CHANNEL_FD_ENV: "7", CHANNEL_CODEC_ENV: "json"})
    assert found == (7, "native", "json")
    with pytest.raises(ipcbus.TransportError):
        inherited_channel({CHANNEL_FD_ENV: "seven"})


def test_parent_with_a_bad_fd_is_a_transport_error(tmp_path: Path) -> None:
    script = write(
        tmp_path,
        "badfd.py",
        """
        import ipcbus
        try:
            ipcbus.parent()
        except ipcbus.TransportError as exc:
            print("TransportError", exc)
        """,
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    # Set after ipcbus scrubbed the environment: a raw Popen, as a foreign
    # launcher would do it.
    env[CHANNEL_FD_ENV] = "999"
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, timeout=T)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"TransportError fd 999 is not open")


# ----------------------------------------------------------------- lifecycle


def test_exit_code_and_signal_are_reported(tmp_path: Path) -> None:
    script = write(tmp_path, "echo.py", ECHO)
    env = dict(os.environ, EXIT_CODE="7")
    with ipcbus.fork(script, env=env) as child:
        child.channel.recv(timeout=T)
        child.channel.send("exit")
        assert child.wait(T) == 7
        assert (child.exit_code, child.signal) == (7, None)

    with ipcbus.fork(script) as child:
        child.channel.recv(timeout=T)
        child.kill()
        assert child.wait(T) == -signal.SIGKILL
        assert child.exit_code is None
        assert child.signal is signal.SIGKILL
        with pytest.raises(ipcbus.ChannelClosed):
            child.channel.recv(timeout=T)

    with ipcbus.fork(script) as child:
        child.channel.recv(timeout=T)
        child.send_signal(signal.SIGUSR1)
        assert child.wait(T) == -signal.SIGUSR1
        assert child.signal is signal.SIGUSR1


def test_disconnect_is_seen_by_the_child_before_it_exits(tmp_path: Path) -> None:
    script = write(
        tmp_path,
        "stay.py",
        """
        import sys, time, ipcbus
        ch = ipcbus.parent()
        for msg in ch:
            pass
        print("eof", flush=True)
        sys.stdin.read()  # keeps running after the channel closed
        """,
    )
    with ipcbus.fork(script, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as child:
        child.disconnect()
        assert not child.connected
        assert child.stdout.readline() == b"eof\n"
        # The channel is closed; the process is not: the two are told apart.
        assert child.poll() is None
        with pytest.raises(TimeoutError):
            child.wait(0.1)
        child.stdin.close()
        assert child.wait(T) == 0


def test_context_exit_terminates_then_kills_a_stubborn_child(tmp_path: Path) -> None:
    script = write(
        tmp_path,
        "stubborn.py",
        """
        import signal, time, ipcbus
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ch = ipcbus.parent()
        ch.send("ready")
        while True:
            time.sleep(1)
        """,
    )
    child = ipcbus.fork(script)
    with child:
        assert child.channel.recv(timeout=T).data == "ready"
        pid = child.pid
        child.close(grace=0.2)
    assert child.returncode == -signal.SIGKILL
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def test_context_exit_reaps_a_child_that_leaves_on_eof(tmp_path: Path) -> None:
    script = write(tmp_path, "echo.py", ECHO)
    with ipcbus.fork(script) as child:
        child.channel.recv(timeout=T)
    assert child.returncode == 0  # it left on EOF: no signal was needed


def test_fork_of_a_script_that_fails_at_import(tmp_path: Path) -> None:
    script = write(tmp_path, "broken.py", "import ipcbus\nraise RuntimeError('broken at import')\n")
    with ipcbus.fork(script, stderr=subprocess.PIPE) as child:
        with pytest.raises(ipcbus.ChannelClosed):
            child.channel.recv(timeout=T)
        assert child.wait(T) == 1
        assert b"RuntimeError: broken at import" in child.stderr.read()


def test_fork_of_a_missing_script(tmp_path: Path) -> None:
    with ipcbus.fork(tmp_path / "missing.py", stderr=subprocess.DEVNULL) as child:
        with pytest.raises(ipcbus.ChannelClosed):
            child.channel.recv(timeout=T)
        assert child.wait(T) == 2


def test_spawn_of_a_program_that_exits_at_once_with_ipc() -> None:
    with ipcbus.spawn(["true"], ipc=True) as child:
        with pytest.raises(ipcbus.ChannelClosed):
            child.channel.recv(timeout=T)
        assert child.wait(T) == 0


def test_spawn_missing_executable_raises_and_leaks_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ipcbus.spawn([tmp_path / "no-such-program"], ipc=True)


def test_parent_sigkill_makes_the_child_see_eof(tmp_path: Path) -> None:
    # Two workers, and the second stays alive after its EOF: had the
    # master's end of the first channel leaked into the second worker, the
    # first would not see EOF when the master dies.
    pidfile = tmp_path / "workers.pid"
    worker = write(
        tmp_path,
        "worker.py",
        f"""
        import sys, time, ipcbus
        ch = ipcbus.parent()
        ch.send("up")
        for msg in ch:
            pass
        with open({str(tmp_path)!r} + "/eof." + sys.argv[1], "w") as f:
            f.write("eof")
        if sys.argv[1] == "1":
            time.sleep(60)
        """,
    )
    master = write(
        tmp_path,
        "master.py",
        f"""
        import time, ipcbus
        children = [ipcbus.fork({str(worker)!r}, [str(i)]) for i in range(2)]
        for child in children:
            assert child.channel.recv(timeout=20).data == "up"
        with open({str(pidfile)!r}, "w") as f:
            f.write(" ".join(str(c.pid) for c in children) + ".")
        time.sleep(60)
        """,
    )
    with ipcbus.spawn([sys.executable, master]) as middle:
        wait_until(lambda: pidfile.exists() and pidfile.read_text().endswith("."), what="the workers' pids")
        worker_pids = [int(p) for p in pidfile.read_text().rstrip(".").split()]
        assert not any(gone(pid) for pid in worker_pids)
        middle.kill()
        assert middle.wait(T) == -signal.SIGKILL
    try:
        wait_until(lambda: gone(worker_pids[0]), what=f"orphaned worker {worker_pids[0]} to exit")
        wait_until(lambda: (tmp_path / "eof.1").exists(), what="the second worker to see EOF")
        assert (tmp_path / "eof.0").read_text() == "eof"
    finally:
        try:
            os.kill(worker_pids[1], signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_until(lambda: gone(worker_pids[1]), what=f"worker {worker_pids[1]} to die")


# ------------------------------------------------------------------- waiting


def test_wait_children_returns_the_ones_that_exited(tmp_path: Path) -> None:
    script = write(tmp_path, "echo.py", ECHO)
    children = [ipcbus.fork(script) for _ in range(3)]
    try:
        for c in children:
            c.channel.recv(timeout=T)
        assert ipcbus.wait_children(children, timeout=0.05) == []
        children[1].channel.send("exit")
        assert ipcbus.wait_children(children, timeout=T) == [children[1]]
        assert children[1].returncode == 0
        for c in (children[2], children[0]):
            c.channel.send("exit")
        order = list(ipcbus.wait_any([children[0], children[2]], timeout=T))
        assert sorted(c.pid for c in order) == sorted([children[0].pid, children[2].pid])
        assert ipcbus.wait_children([]) == []
    finally:
        for c in children:
            c.close(grace=1)


def test_wait_any_times_out(tmp_path: Path) -> None:
    with ipcbus.spawn(["sleep", "30"]) as child:
        with pytest.raises(TimeoutError):
            list(ipcbus.wait_any([child], timeout=0.05))
        child.kill()
        assert [c.pid for c in ipcbus.wait_any([child], timeout=T)] == [child.pid]


def test_wait_does_not_reap_other_children() -> None:
    # Only the children named are waited for: a plain subprocess.Popen
    # child of this process keeps its own exit status.
    other = subprocess.Popen(["true"])
    try:
        with ipcbus.spawn(["sleep", "0.2"]) as child:
            assert ipcbus.wait_children([child], timeout=T) == [child]
        assert other.wait(T) == 0
    finally:
        other.wait()


def test_fifty_children_leave_no_zombies_and_no_fds(tmp_path: Path) -> None:
    # A light child (no site, no ipcbus import) so that fifty of them start
    # quickly on a small machine: it reads its inherited channel to EOF.
    script = write(
        tmp_path,
        "reader.py",
        """
        import os
        fd = int(os.environ["IPCBUS_CHANNEL_FD"])
        while os.read(fd, 65536):
            pass
        """,
    )
    fd_dir = "/proc/self/fd"
    before = len(os.listdir(fd_dir))
    children: list[ipcbus.ChildProcess] = []
    try:
        for _ in range(50):
            children.append(ipcbus.fork(script, python_args=["-S"]))
        assert len({c.pid for c in children}) == 50
        assert ipcbus.wait_children(children, timeout=0) == []
        for c in children:
            c.disconnect()  # each child sees EOF and exits 0
        assert len(list(ipcbus.wait_any(children, timeout=60))) == 50
    finally:
        for c in children:
            c.close(grace=1)
    assert [c.returncode for c in children] == [0] * 50
    for c in children:
        with pytest.raises(ChildProcessError):
            os.waitpid(c.pid, os.WNOHANG)
    assert our_zombies() == []
    assert len(os.listdir(fd_dir)) == before


# ---------------------------------------------------------------- exec / file


def test_exec_captures_output_and_status() -> None:
    result = ipcbus.exec("echo out; echo err >&2; exit 3", timeout=T)
    assert (result.returncode, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    assert result.exit_code == 3 and not result.ok and result.signal is None
    text = ipcbus.exec("cat; printf 'é'", input="in-", text=True, timeout=T)
    assert text.stdout == "in-é" and text.ok
    killed = ipcbus.exec("kill -TERM $$", timeout=T)
    assert killed.returncode == -signal.SIGTERM and killed.signal is signal.SIGTERM


def test_exec_file_runs_without_a_shell(tmp_path: Path) -> None:
    result = ipcbus.exec_file("echo", ["$HOME", "a b"], timeout=T)
    assert result.stdout == b"$HOME a b\n"
    assert result.args == ["echo", "$HOME", "a b"]
    big = ipcbus.exec_file(sys.executable, ["-c", "import sys; sys.stdout.write(sys.stdin.read())"],
                           input=b"x" * 1_000_000, timeout=T)
    assert big.stdout == b"x" * 1_000_000
    with pytest.raises(TypeError):
        ipcbus.exec(["echo"])  # type: ignore[arg-type]


def test_exec_timeout_kills_the_shell_and_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "sleeper.pid"
    command = f"sleep 60 & echo \"$!.\" > {pidfile}; echo partial; echo warn >&2; wait"
    with pytest.raises(ipcbus.ExecTimeout) as info:
        ipcbus.exec(command, timeout=1.0)
    err = info.value
    assert isinstance(err, TimeoutError) and isinstance(err, ipcbus.IPCError)
    assert err.stdout == b"partial\n" and err.stderr == b"warn\n"
    assert err.returncode == -signal.SIGKILL and err.timeout == 1.0 and err.cmd == command
    sleeper = read_pid(pidfile)
    wait_until(lambda: gone(sleeper), what=f"the shell's child {sleeper} to die")


def test_exec_file_timeout_text_partial_output() -> None:
    code = "import sys, time; print('started', flush=True); time.sleep(60)"
    with pytest.raises(ipcbus.ExecTimeout) as info:
        ipcbus.exec_file(sys.executable, ["-c", code], timeout=1.0, text=True)
    assert info.value.stdout == "started\n"
    assert info.value.returncode == -signal.SIGKILL
