"""Child processes, trio API (ipcbus.trio.fork/spawn/exec/exec_file/parent/wait_*).

Real interpreters, real socketpairs, real signals; each test runs its own
``trio.run`` under a deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

import ipcbus
import ipcbus.trio
from ipcbus._process import CHANNEL_CODEC_ENV, CHANNEL_FD_ENV

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX fd inheritance (pass_fds)")

T = 30  # seconds: the bound of every test's trio.run, so nothing can hang

TRIO_ECHO = """
import os, sys, trio, ipcbus.trio

async def main():
    ch = ipcbus.trio.parent()
    assert ipcbus.trio.parent() is ch
    env = sorted(k for k in os.environ if k.startswith("IPCBUS_CHANNEL"))
    await ch.send({"hello": os.getpid(), "env": env})
    async for msg in ch:
        if msg.data == "exit":
            return int(os.environ.get("EXIT_CODE", "0"))
        await ch.send({"echo": msg.data})
    return 0

sys.exit(trio.run(main))
"""

BLOCKING_ECHO = """
import os, ipcbus
ch = ipcbus.parent()
ch.send({"hello": os.getpid(), "env": sorted(k for k in os.environ if k.startswith("IPCBUS_CHANNEL"))})
for msg in ch:
    if msg.data == "exit":
        raise SystemExit(0)
    ch.send({"echo": msg.data})
"""


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        with trio.fail_after(T):
            return await fn()

    return trio.run(main)


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
    except (FileNotFoundError, ProcessLookupError):
        return True
    return False


# ------------------------------------------------------------------ messages


@pytest.mark.parametrize("child_api", ["trio", "blocking"])
def test_fork_messages_both_ways(tmp_path: Path, child_api: str) -> None:
    script = write(tmp_path, "echo.py", TRIO_ECHO if child_api == "trio" else BLOCKING_ECHO)

    async def main() -> None:
        async with ipcbus.trio.fork(script) as child:
            hello = await child.channel.recv()
            assert hello.data == {"hello": child.pid, "env": []}
            payloads = [1, "two", {"three": [3]}, b"four", None]
            for p in payloads:
                await child.channel.send(p)
            got = [(await child.channel.recv()).data for _ in payloads]
            assert got == [{"echo": p} for p in payloads]
            await child.channel.send("exit")
            assert await child.wait() == 0
            with pytest.raises(ipcbus.ChannelClosed):
                await child.channel.recv()
        assert (child.returncode, child.exit_code, child.signal) == (0, 0, None)

    run(main)


def test_blocking_parent_and_trio_child(tmp_path: Path) -> None:
    script = write(tmp_path, "echo.py", TRIO_ECHO)
    with ipcbus.fork(script) as child:
        assert child.channel.recv(timeout=T).data["hello"] == child.pid
        child.channel.send({"x": 1})
        assert child.channel.recv(timeout=T).data == {"echo": {"x": 1}}
        child.disconnect()
        assert child.wait(T) == 0


def test_awaited_fork_and_spawn(tmp_path: Path) -> None:
    script = write(tmp_path, "echo.py", TRIO_ECHO)

    async def main() -> None:
        child = await ipcbus.trio.fork(script, codec="json")
        async with child:
            assert child.channel.codec.name == "json"
            assert (await child.channel.recv()).data["hello"] == child.pid
        assert child.returncode == 0  # left on EOF within the grace period
        other = await ipcbus.trio.spawn([sys.executable, script], ipc=True)
        await other.channel.recv()
        await other.disconnect()
        assert not other.connected
        assert await other.wait() == 0
        await other.aclose()

    run(main)


# --------------------------------------------------------------- environment


def test_env_is_removed_and_grandchild_has_no_channel(tmp_path: Path) -> None:
    grandchild = write(
        tmp_path,
        "grandchild.py",
        """
        import json, os, trio, ipcbus.trio
        async def main():
            print(json.dumps([ipcbus.trio.parent() is None,
                              sorted(k for k in os.environ if k.startswith("IPCBUS_CHANNEL"))]))
        trio.run(main)
        """,
    )
    middle = write(
        tmp_path,
        "middle.py",
        f"""
        import json, os, sys, trio, ipcbus, ipcbus.trio
        async def main():
            before = sorted(k for k in os.environ if k.startswith("IPCBUS_CHANNEL"))
            ch = ipcbus.trio.parent()
            after = sorted(k for k in os.environ if k.startswith("IPCBUS_CHANNEL"))
            result = await ipcbus.trio.exec_file(sys.executable, [{str(grandchild)!r}], timeout=20)
            try:
                ipcbus.parent()
            except RuntimeError:
                blocking = "RuntimeError"
            await ch.send({{"before": before, "after": after, "grandchild": json.loads(result.stdout),
                           "blocking": blocking}})
            await ch.recv()
        trio.run(main)
        """,
    )

    async def main() -> dict[str, Any]:
        async with ipcbus.trio.fork(middle) as child:
            report = (await child.channel.recv()).data
            await child.channel.send("done")
            assert await child.wait() == 0
        return report

    report = run(main)
    assert report["before"] == sorted([CHANNEL_CODEC_ENV, CHANNEL_FD_ENV])
    assert report["after"] == []
    assert report["grandchild"] == [True, []]
    assert report["blocking"] == "RuntimeError"


# ----------------------------------------------------------------- lifecycle


def test_exit_code_and_signal_are_reported(tmp_path: Path) -> None:
    script = write(tmp_path, "echo.py", TRIO_ECHO)

    async def main() -> None:
        async with ipcbus.trio.fork(script, env=dict(os.environ, EXIT_CODE="9")) as child:
            await child.channel.recv()
            await child.channel.send("exit")
            assert await child.wait() == 9
            assert (child.exit_code, child.signal) == (9, None)
        async with ipcbus.trio.fork(script) as child:
            await child.channel.recv()
            child.kill()
            assert await child.wait() == -signal.SIGKILL
            assert child.signal is signal.SIGKILL and child.exit_code is None
        async with ipcbus.trio.fork(script) as child:
            await child.channel.recv()
            child.terminate()
            assert await child.wait() == -signal.SIGTERM
            assert child.signal is signal.SIGTERM

    run(main)


STAY = """
import signal, sys, time, ipcbus
if "ignore-term" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
ch = ipcbus.parent()
ch.send("ready")
for msg in ch:
    pass
while True:  # outlives its channel
    time.sleep(1)
"""


def test_cancellation_terminates_the_child(tmp_path: Path) -> None:
    script = write(tmp_path, "stay.py", STAY)

    async def main() -> None:
        with trio.move_on_after(60) as scope:
            async with ipcbus.trio.fork(script) as child:
                assert (await child.channel.recv()).data == "ready"
                scope.cancel()
                await trio.sleep_forever()
        assert scope.cancelled_caught
        assert child.returncode == -signal.SIGTERM

    run(main)


def test_aclose_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    script = write(tmp_path, "stay.py", STAY)

    async def main() -> None:
        child = await ipcbus.trio.fork(script, ["ignore-term"])
        assert (await child.channel.recv()).data == "ready"
        assert await child.aclose(grace=0.2) == -signal.SIGKILL
        with pytest.raises(ChildProcessError):
            os.waitpid(child.pid, os.WNOHANG)

    run(main)


def test_fork_of_a_script_that_fails_at_import(tmp_path: Path) -> None:
    script = write(tmp_path, "broken.py", "import ipcbus.trio\nraise ValueError('broken at import')\n")

    async def main() -> None:
        async with ipcbus.trio.fork(script, stderr=subprocess.PIPE) as child:
            with pytest.raises(ipcbus.ChannelClosed):
                await child.channel.recv()
            assert await child.wait() == 1
            err = bytearray()
            while chunk := await child.stderr.receive_some(65536):
                err += chunk
            assert b"ValueError: broken at import" in err

    run(main)


def test_parent_sigkill_makes_a_trio_child_see_eof(tmp_path: Path) -> None:
    pidfile = tmp_path / "worker.pid"
    eoffile = tmp_path / "worker.eof"
    worker = write(
        tmp_path,
        "worker.py",
        f"""
        import trio, ipcbus.trio
        async def main():
            ch = ipcbus.trio.parent()
            await ch.send("up")
            async for msg in ch:
                pass
            with open({str(eoffile)!r}, "w") as f:
                f.write("eof")
        trio.run(main)
        """,
    )
    master = write(
        tmp_path,
        "master.py",
        f"""
        import trio, ipcbus.trio
        async def main():
            child = await ipcbus.trio.fork({str(worker)!r})
            assert (await child.channel.recv()).data == "up"
            with open({str(pidfile)!r}, "w") as f:
                f.write(f"{{child.pid}}.")
            await trio.sleep(60)
        trio.run(main)
        """,
    )

    async def main() -> None:
        async with ipcbus.trio.spawn([sys.executable, master]) as middle:
            while not (pidfile.exists() and pidfile.read_text().endswith(".")):
                await trio.sleep(0.02)
            worker_pid = int(pidfile.read_text().rstrip("."))
            assert not gone(worker_pid)
            middle.kill()
            assert await middle.wait() == -signal.SIGKILL
        while not gone(worker_pid):
            await trio.sleep(0.02)
        assert eoffile.read_text() == "eof"

    run(main)


# ------------------------------------------------------------------- waiting


def test_wait_children_and_wait_any(tmp_path: Path) -> None:
    script = write(tmp_path, "echo.py", TRIO_ECHO)

    async def main() -> None:
        children = [await ipcbus.trio.fork(script) for _ in range(3)]
        try:
            for c in children:
                await c.channel.recv()
            with trio.move_on_after(0.05) as scope:
                await ipcbus.trio.wait_children(children)
            assert scope.cancelled_caught
            await children[2].channel.send("exit")
            assert await ipcbus.trio.wait_children(children) == [children[2]]
            for c in children[:2]:
                await c.channel.send("exit")
            seen = [c async for c in ipcbus.trio.wait_any(children[:2])]
            assert sorted(c.pid for c in seen) == sorted(c.pid for c in children[:2])
            assert [c.returncode for c in children] == [0, 0, 0]
            assert await ipcbus.trio.wait_children([]) == []
        finally:
            for c in children:
                await c.aclose()

    run(main)


def test_many_children_leave_no_zombies(tmp_path: Path) -> None:
    # Light children (no site, no ipcbus import) that read their channel to EOF.
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

    async def main() -> list[ipcbus.trio.AsyncChildProcess]:
        children: list[ipcbus.trio.AsyncChildProcess] = []

        async def one() -> None:
            async with ipcbus.trio.fork(script, python_args=["-S"]) as child:
                children.append(child)
                await child.disconnect()
                assert await child.wait() == 0

        async with trio.open_nursery() as nursery:
            for _ in range(30):
                nursery.start_soon(one)
        return children

    children = run(main)
    assert [c.returncode for c in children] == [0] * 30
    for c in children:
        with pytest.raises(ChildProcessError):
            os.waitpid(c.pid, os.WNOHANG)


# ---------------------------------------------------------------- exec / file


def test_exec_and_exec_file() -> None:
    async def main() -> None:
        result = await ipcbus.trio.exec("echo out; echo err >&2; exit 5", timeout=T)
        assert (result.returncode, result.stdout, result.stderr) == (5, b"out\n", b"err\n")
        text = await ipcbus.trio.exec_file("cat", input="héllo", text=True)
        assert text.stdout == "héllo" and text.ok
        big = await ipcbus.trio.exec_file(
            sys.executable, ["-c", "import sys; sys.stdout.write(sys.stdin.read())"], input=b"y" * 1_000_000
        )
        assert big.stdout == b"y" * 1_000_000

    run(main)


def test_exec_timeout_kills_the_shell_and_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "sleeper.pid"
    command = f"sleep 60 & echo \"$!.\" > {pidfile}; echo partial; echo warn >&2; wait"

    async def main() -> ipcbus.ExecTimeout:
        with pytest.raises(ipcbus.ExecTimeout) as info:
            await ipcbus.trio.exec(command, timeout=1.0)
        return info.value

    err = run(main)
    assert err.stdout == b"partial\n" and err.stderr == b"warn\n"
    assert err.returncode == -signal.SIGKILL
    sleeper = int(pidfile.read_text().strip().rstrip("."))
    deadline = time.monotonic() + T
    while not gone(sleeper):
        assert time.monotonic() < deadline, f"the shell's child {sleeper} survived"
        time.sleep(0.02)


def test_exec_cancelled_kills_the_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "sleeper.pid"

    async def main() -> None:
        with trio.move_on_after(60) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ipcbus.trio.exec, f"sleep 60 & echo \"$!.\" > {pidfile}; wait")
                while not (pidfile.exists() and pidfile.read_text().endswith(".\n")):
                    await trio.sleep(0.02)
                scope.cancel()
        assert scope.cancelled_caught

    run(main)
    sleeper = int(pidfile.read_text().strip().rstrip("."))
    deadline = time.monotonic() + T
    while not gone(sleeper):
        assert time.monotonic() < deadline, f"the shell's child {sleeper} survived the cancellation"
        time.sleep(0.02)
