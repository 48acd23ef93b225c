"""Messages side by side: ipcbus against the peers it has to beat.

Prints one table, measured in one run, with the contenders alternating
(round-robin, ``--rounds`` rounds, each run in fresh processes). Workloads:

* ``stream``: 200 000 small dicts (~41 bytes of msgpack) one way, child to
  parent, timed from "go" until the parent holds the last message;
* ``pingpong`` (pinned and unpinned): 20 000 round trips of the same dict;
  pinned means both processes on one CPU (``os.sched_setaffinity``);
* ``bulk``: 500 one-MiB ``bytes`` payloads one way, child to parent.

Targets (ratios between rows of the same run) are printed with PASS/FAIL.

    python benchmarks/bench_messages.py              # full run, 5 rounds
    python benchmarks/bench_messages.py --quick      # smoke run
    python benchmarks/bench_messages.py --profile    # cProfile ipcbus streaming

The coordinating process only starts runs and collects their results: each
run is ``python bench_messages.py --_run CONTENDER WORKLOAD N`` (or
``node node/parent.js``) in its own session, which forks the peer process,
measures with ``time.perf_counter`` and prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
NODE_DIR = os.path.join(HERE, "node")

SMALL_N = 200_000
PINGPONG_N = 20_000
BULK_N = 500
BULK_SIZE = 1024 * 1024
RAW_BATCH = 256  # messages per sendall in the hand-written loop
# recv size of the hand-written loop: 64 KiB for small messages (a larger
# buffer costs an allocation of that size on every recv, which shows in
# ping-pong), 256 KiB for 1 MiB payloads.
RAW_RECV_SMALL = 64 * 1024
RAW_RECV_BULK = 256 * 1024
RUN_TIMEOUT = 300.0  # seconds for one run, whatever the scale


def small(i: int) -> dict[str, Any]:
    """The small message of the issue: about 40 bytes of msgpack."""
    return {"op": "put", "key": "k12345", "value": 123456, "ok": True, "n": i}


# =========================================================================
# The run side: one contender, one workload, in a fresh process.
#
# Each contender is a pair of functions run in two processes: ``parent(ctx)``
# in the run process (it measures) and ``child(ctx)`` in a process forked
# from it. The child says "ready" over the contender's own channel; the parent
# then starts the clock and writes "go" on a side pipe (streaming workloads),
# so that start-up and connection time are never measured.
# =========================================================================


@dataclass
class Ctx:
    workload: str
    n: int
    go_r: int
    go_w: int
    state: dict[str, Any] = field(default_factory=dict)

    def wait_go(self) -> None:
        # The go pipe is coordination, not part of what is measured.
        if os.read(self.go_r, 1) != b"g":
            raise RuntimeError("the parent went away before go")

    def go(self) -> float:
        t0 = time.perf_counter()
        os.write(self.go_w, b"g")
        return t0


def warmup_count(n: int) -> int:
    return max(10, n // 100)


def pingpong_loop(n: int, rtt: Callable[[Any], Any]) -> dict[str, Any]:
    """Time ``n`` round trips (after a short warm-up) one by one."""
    for i in range(warmup_count(n)):
        rtt(small(-i))
    perf = time.perf_counter
    lat = [0.0] * n
    start = perf()
    for i in range(n):
        t = perf()
        rtt(small(i))
        lat[i] = perf() - t
    return {"seconds": perf() - start, "n": n, "latencies": lat}


def stream_result(seconds: float, n: int, nbytes: int = 0) -> dict[str, Any]:
    return {"seconds": seconds, "n": n, "bytes": nbytes}


# ---------------------------------------------------------------- ipcbus blocking


def ipcbus_setup(ctx: Ctx) -> None:
    import ipcbus

    a, b = ipcbus.pair()
    ctx.state["ends"] = (a, b)


def ipcbus_parent(ctx: Ctx) -> dict[str, Any]:
    a, b = ctx.state["ends"]
    b.close()
    ch = a
    try:
        send, recv = ch.send, ch.recv
        if ctx.workload == "pingpong":

            def rtt(msg: Any) -> Any:
                send(msg)
                return recv()

            return pingpong_loop(ctx.n, rtt)
        ch.recv(timeout=30)  # ready
        nbytes = 0
        t0 = ctx.go()
        if ctx.workload == "bulk":
            for _ in range(ctx.n):
                nbytes += len(recv()[0])
        else:
            for _ in range(ctx.n):
                recv()
        return stream_result(time.perf_counter() - t0, ctx.n, nbytes)
    finally:
        ch.close()


def ipcbus_child(ctx: Ctx) -> None:
    a, b = ctx.state["ends"]
    a.close()
    ch = b
    try:
        if ctx.workload == "pingpong":
            for msg in ch:
                ch.send(msg.data)
            return
        ch.send("ready")
        ch.flush()
        ctx.wait_go()
        send = ch.send
        if ctx.workload == "bulk":
            payload = b"a" * BULK_SIZE
            for _ in range(ctx.n):
                send(payload)
        else:
            for i in range(ctx.n):
                send(small(i))
        ch.flush()
        # Stay until the parent has read everything (it closes first).
        with contextlib.suppress(Exception):
            ch.recv(timeout=RUN_TIMEOUT)
    finally:
        ch.close()


def ipcbus_many_parent(ctx: Ctx) -> dict[str, Any]:
    a, b = ctx.state["ends"]
    b.close()
    with a:
        a.recv(timeout=30)  # ready
        recv_many = a.recv_many
        t0 = ctx.go()
        got = 0
        while got < ctx.n:
            got += len(recv_many())
        return stream_result(time.perf_counter() - t0, ctx.n)


def ipcbus_many_child(ctx: Ctx) -> None:
    a, b = ctx.state["ends"]
    a.close()
    with b:
        b.send("ready")
        b.flush()
        ctx.wait_go()
        n = ctx.n
        send_many = b.send_many
        for start in range(0, n, RAW_BATCH):  # as many per call as the raw loop per write
            send_many([small(i) for i in range(start, min(n, start + RAW_BATCH))])
        b.flush()
        with contextlib.suppress(Exception):
            b.recv(timeout=RUN_TIMEOUT)


# ---------------------------------------------------------------- ipcbus trio


def trio_missing() -> str | None:
    """Why the trio rows cannot run (None when they can)."""
    try:
        import ipcbus.trio  # noqa: F401
        from ipcbus._trio_channel import AsyncChannel
    except ImportError as exc:
        return f"ipcbus.trio is not importable ({exc})"
    for name in ("send", "send_nowait", "recv", "recv_nowait", "_open"):
        if not hasattr(AsyncChannel, name):
            return f"ipcbus.trio.AsyncChannel has no {name}()"
    return None


def trio_setup(ctx: Ctx) -> None:
    # The socketpair is made before the fork; each process builds its own
    # channel inside its own trio.run.
    ctx.state["socks"] = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def trio_open(sock: socket.socket) -> Any:
    """An AsyncChannel over an inherited socketpair end (what
    ``ipcbus.trio.pair`` builds for each end; called inside trio.run)."""
    from ipcbus._trio_channel import AsyncChannel
    from ipcbus.transports._sockets import AsyncSocketStream

    return AsyncChannel._open(AsyncSocketStream(sock, name="socketpair", trusted=True), "peer", codec="msgpack")


def trio_funcs(style: str) -> tuple[Callable[[Ctx], Any], Callable[[Ctx], None]]:
    """style: "await" (send/recv), "nowait" (send_nowait/recv_nowait, waiting
    only on trio.WouldBlock) or "many" (send_many/recv_many, streaming only)."""

    def make_io(ch: Any) -> tuple[Callable[[Any], Any], Callable[[], Any]]:
        import trio

        if style != "nowait":
            return ch.send, ch.recv

        async def send(msg: Any) -> None:
            try:
                ch.send_nowait(msg)
            except trio.WouldBlock:
                await ch.send(msg)

        async def recv() -> Any:
            try:
                return ch.recv_nowait()
            except trio.WouldBlock:
                return await ch.recv()

        return send, recv

    def parent(ctx: Ctx) -> dict[str, Any]:
        import trio

        a, b = ctx.state["socks"]
        b.close()

        async def main() -> dict[str, Any]:
            ch = trio_open(a)
            async with ch:
                send, recv = make_io(ch)
                if ctx.workload == "pingpong":
                    n = ctx.n
                    for i in range(warmup_count(n)):
                        await send(small(-i))
                        await recv()
                    perf = time.perf_counter
                    lat = [0.0] * n
                    start = perf()
                    for i in range(n):
                        t = perf()
                        await send(small(i))
                        await recv()
                        lat[i] = perf() - t
                    return {"seconds": perf() - start, "n": n, "latencies": lat}
                await ch.recv()  # ready
                nbytes = 0
                t0 = ctx.go()
                if ctx.workload == "bulk":
                    for _ in range(ctx.n):
                        nbytes += len((await recv())[0])
                elif style == "nowait":
                    # The bulk idiom, inline (a wrapper coroutine per message
                    # would cost as much as the call it wraps).
                    recv_nowait, recv_wait = ch.recv_nowait, ch.recv
                    for _ in range(ctx.n):
                        try:
                            recv_nowait()
                        except trio.WouldBlock:
                            await recv_wait()
                elif style == "many":
                    got = 0
                    while got < ctx.n:
                        got += len(await ch.recv_many())
                else:
                    for _ in range(ctx.n):
                        await recv()
                return stream_result(time.perf_counter() - t0, ctx.n, nbytes)

        return trio.run(main)

    def child(ctx: Ctx) -> None:
        import trio

        a, b = ctx.state["socks"]
        a.close()

        async def main() -> None:
            ch = trio_open(b)
            async with ch:
                send, recv = make_io(ch)
                if ctx.workload == "pingpong":
                    while True:
                        try:
                            msg = await recv()
                        except Exception:
                            return
                        await send(msg[0])
                await ch.send("ready")
                await trio.to_thread.run_sync(ctx.wait_go)
                if ctx.workload == "bulk":
                    payload = b"a" * BULK_SIZE
                    for _ in range(ctx.n):
                        await send(payload)
                elif style == "nowait":
                    send_nowait, send_wait = ch.send_nowait, ch.send
                    for i in range(ctx.n):
                        msg = small(i)
                        try:
                            send_nowait(msg)
                        except trio.WouldBlock:
                            await send_wait(msg)
                elif style == "many":
                    n = ctx.n
                    for start in range(0, n, RAW_BATCH):
                        await ch.send_many([small(i) for i in range(start, min(n, start + RAW_BATCH))])
                else:
                    for i in range(ctx.n):
                        await send(small(i))
                with contextlib.suppress(Exception):
                    await ch.recv()

        trio.run(main)

    return parent, child


# ---------------------------------------------------------------- raw socketpair + msgpack


def raw_setup(ctx: Ctx) -> None:
    ctx.state["socks"] = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def raw_messages(sock: socket.socket, recv_size: int) -> Iterator[Any]:
    """Every value the peer sends, until EOF."""
    import msgpack

    unpacker = msgpack.Unpacker(max_buffer_size=64 * 1024 * 1024)
    recv = sock.recv
    while True:
        yield from unpacker
        data = recv(recv_size)
        if not data:
            return
        unpacker.feed(data)


def raw_parent(ctx: Ctx) -> dict[str, Any]:
    import msgpack

    a, b = ctx.state["socks"]
    b.close()
    with a:
        messages = raw_messages(a, RAW_RECV_BULK if ctx.workload == "bulk" else RAW_RECV_SMALL)
        if ctx.workload == "pingpong":
            packb = msgpack.packb
            sendall = a.sendall

            def rtt(msg: Any) -> Any:
                sendall(packb(msg))
                return next(messages)

            return pingpong_loop(ctx.n, rtt)
        next(messages)  # ready
        nbytes = 0
        t0 = ctx.go()
        if ctx.workload == "bulk":
            for _ in range(ctx.n):
                nbytes += len(next(messages))
        else:
            for _ in range(ctx.n):
                next(messages)
        return stream_result(time.perf_counter() - t0, ctx.n, nbytes)


def raw_child_funcs(reuse_packer: bool) -> Callable[[Ctx], None]:
    def child(ctx: Ctx) -> None:
        import msgpack

        a, b = ctx.state["socks"]
        a.close()
        with b:
            sendall = b.sendall
            if ctx.workload == "pingpong":
                packb = msgpack.packb
                packer = msgpack.Packer()
                pack = packer.pack if reuse_packer else packb
                for msg in raw_messages(b, RAW_RECV_SMALL):
                    sendall(pack(msg))
                return
            sendall(msgpack.packb("ready"))
            ctx.wait_go()
            n = ctx.n
            if ctx.workload == "bulk":
                payload = b"a" * BULK_SIZE
                pack = msgpack.Packer().pack if reuse_packer else msgpack.packb
                for _ in range(n):
                    sendall(pack(payload))
            elif reuse_packer:
                packer = msgpack.Packer(autoreset=False)
                pack = packer.pack
                for start in range(0, n, RAW_BATCH):
                    for i in range(start, min(n, start + RAW_BATCH)):
                        pack(small(i))
                    sendall(packer.getbuffer())
                    packer.reset()
            else:
                packb = msgpack.packb
                for start in range(0, n, RAW_BATCH):
                    sendall(b"".join([packb(small(i)) for i in range(start, min(n, start + RAW_BATCH))]))
            b.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                b.recv(1)  # until the parent has read everything and closed

    return child


# ---------------------------------------------------------------- multiprocessing.Pipe


def mp_setup(ctx: Ctx) -> None:
    import multiprocessing

    ctx.state["ends"] = multiprocessing.Pipe()


def mp_parent(ctx: Ctx) -> dict[str, Any]:
    a, b = ctx.state["ends"]
    b.close()
    with a:
        if ctx.workload == "pingpong":

            def rtt(msg: Any) -> Any:
                a.send(msg)
                return a.recv()

            return pingpong_loop(ctx.n, rtt)
        a.recv()  # ready
        nbytes = 0
        t0 = ctx.go()
        if ctx.workload == "bulk":
            recv_bytes = a.recv_bytes
            for _ in range(ctx.n):
                nbytes += len(recv_bytes())
        else:
            recv = a.recv
            for _ in range(ctx.n):
                recv()
        return stream_result(time.perf_counter() - t0, ctx.n, nbytes)


def mp_child(ctx: Ctx) -> None:
    a, b = ctx.state["ends"]
    a.close()
    with b:
        if ctx.workload == "pingpong":
            while True:
                try:
                    msg = b.recv()
                except EOFError:
                    return
                b.send(msg)
        b.send("ready")
        ctx.wait_go()
        if ctx.workload == "bulk":
            payload = b"a" * BULK_SIZE
            for _ in range(ctx.n):
                b.send_bytes(payload)
        else:
            send = b.send
            for i in range(ctx.n):
                send(small(i))
        with contextlib.suppress(EOFError, OSError):
            b.recv()


# ---------------------------------------------------------------- pyzmq


def zmq_missing() -> str | None:
    try:
        import zmq  # noqa: F401
    except ImportError as exc:
        return f"pyzmq is not importable ({exc})"
    return None


def zmq_setup(ctx: Ctx) -> None:
    # Sockets and contexts are made after the fork, in each process.
    tmp = tempfile.mkdtemp(prefix="ipcbus-bench-")
    ctx.state["tmp"] = tmp
    ctx.state["addr"] = f"ipc://{tmp}/zmq.sock"


def zmq_parent(ctx: Ctx) -> dict[str, Any]:
    import msgpack
    import zmq

    zctx = zmq.Context()
    try:
        if ctx.workload == "pingpong":
            sock = zctx.socket(zmq.REQ)
            sock.bind(ctx.state["addr"])
            packb, unpackb = msgpack.packb, msgpack.unpackb

            def rtt(msg: Any) -> Any:
                sock.send(packb(msg))
                return unpackb(sock.recv())

            try:
                return pingpong_loop(ctx.n, rtt)
            finally:
                sock.send(b"")  # tells the child to stop
                sock.recv()
                sock.close()
        sock = zctx.socket(zmq.PULL)
        sock.bind(ctx.state["addr"])
        try:
            sock.recv()  # ready
            recv = sock.recv
            nbytes = 0
            t0 = ctx.go()
            if ctx.workload == "bulk":
                for _ in range(ctx.n):
                    nbytes += len(recv())
            else:
                unpackb = msgpack.unpackb
                for _ in range(ctx.n):
                    unpackb(recv())
            return stream_result(time.perf_counter() - t0, ctx.n, nbytes)
        finally:
            sock.close(linger=0)
    finally:
        zctx.term()
        shutil.rmtree(ctx.state["tmp"], ignore_errors=True)


def zmq_child(ctx: Ctx) -> None:
    import msgpack
    import zmq

    zctx = zmq.Context()
    try:
        if ctx.workload == "pingpong":
            sock = zctx.socket(zmq.REP)
            sock.connect(ctx.state["addr"])
            unpackb, packb = msgpack.unpackb, msgpack.packb
            while True:
                data = sock.recv()
                if not data:
                    sock.send(b"")
                    break
                sock.send(packb(unpackb(data)))
            sock.close()
            return
        sock = zctx.socket(zmq.PUSH)
        sock.connect(ctx.state["addr"])
        sock.send(msgpack.packb("ready"))
        ctx.wait_go()
        send = sock.send
        if ctx.workload == "bulk":
            payload = b"a" * BULK_SIZE
            for _ in range(ctx.n):
                send(payload)
        else:
            packb = msgpack.packb
            for i in range(ctx.n):
                send(packb(small(i)))
        # Stay connected until the parent has read everything (it closes the
        # go pipe then): libzmq may drop what the PULL end still holds when
        # the PUSH end disconnects first (measured: ~1000 of 200 000 lost in
        # about one run in five, and the parent waited out RUN_TIMEOUT).
        os.close(ctx.go_w)
        os.read(ctx.go_r, 1)
        sock.close(linger=int(RUN_TIMEOUT * 1000))
    finally:
        zctx.term()


# ---------------------------------------------------------------- contenders


@dataclass
class Contender:
    key: str
    label: str
    setup: Callable[[Ctx], None] | None = None
    parent: Callable[[Ctx], dict[str, Any]] | None = None
    child: Callable[[Ctx], None] | None = None
    missing: Callable[[], str | None] = lambda: None
    node: bool = False
    env: dict[str, str] = field(default_factory=dict)  # for its run process
    kinds: tuple[str, ...] | None = None  # the workload kinds it runs (None: all)
    runs_as: str | None = None  # the contender its run process runs (None: key)


_trio_nowait = trio_funcs("nowait")
_trio_await = trio_funcs("await")
_trio_many = trio_funcs("many")

CONTENDERS = [
    Contender("ipcbus", "ipcbus blocking", ipcbus_setup, ipcbus_parent, ipcbus_child),
    Contender(
        "ipcbus-py",
        "ipcbus, pure Python",
        ipcbus_setup,
        ipcbus_parent,
        ipcbus_child,
        env={"IPCBUS_NO_SPEEDUPS": "1"},
    ),
    Contender(
        "ipcbus-many",
        "ipcbus send_many/recv_many",
        ipcbus_setup,
        ipcbus_many_parent,
        ipcbus_many_child,
        kinds=("stream",),
    ),
    Contender(
        "ipcbus-trio", "ipcbus trio (nowait)", trio_setup, _trio_nowait[0], _trio_nowait[1], missing=trio_missing
    ),
    Contender(
        "ipcbus-trio-await", "ipcbus trio (await)", trio_setup, _trio_await[0], _trio_await[1], missing=trio_missing
    ),
    Contender(
        "ipcbus-trio-many",
        "ipcbus trio *_many",
        trio_setup,
        _trio_many[0],
        _trio_many[1],
        missing=trio_missing,
        kinds=("stream",),
    ),
    Contender("raw-packb", "raw socketpair+packb", raw_setup, raw_parent, raw_child_funcs(False)),
    Contender("raw-packer", "raw socketpair+Packer", raw_setup, raw_parent, raw_child_funcs(True)),
    Contender("mp-pipe", "multiprocessing.Pipe", mp_setup, mp_parent, mp_child),
    Contender("zmq", "pyzmq ipc://", zmq_setup, zmq_parent, zmq_child, missing=zmq_missing),
    Contender(
        "node",
        "node child_process IPC",
        node=True,
        missing=lambda: None if shutil.which("node") else "no `node` on PATH",
    ),
]
BY_KEY = {c.key: c for c in CONTENDERS}


def reap(pid: int, timeout: float) -> int:
    """Wait for ``pid``; kill it if it has not exited within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]
        time.sleep(0.005)


def run_one(contender: Contender, workload: str, n: int) -> dict[str, Any]:
    """One measured run: fork the child, run the parent half, reap."""
    assert contender.setup and contender.parent and contender.child
    go_r, go_w = os.pipe()
    ctx = Ctx(workload, n, go_r, go_w)
    contender.setup(ctx)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            contender.child(ctx)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    try:
        os.close(go_r)
        result = contender.parent(ctx)
    except BaseException:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        raise
    finally:
        os.close(go_w)
        status = reap(pid, 10.0)
    if status != 0:
        raise RuntimeError(f"the child exited with status {status:#x}")
    return result


def profile_ipcbus_stream(n: int, top: int) -> None:
    """cProfile ipcbus blocking streaming: sender (child) and receiver."""
    import cProfile
    import io
    import pstats

    import ipcbus

    a, b = ipcbus.pair()
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()

    def report(prof: cProfile.Profile, title: str) -> str:
        buf = io.StringIO()
        print(f"---- {title} ----", file=buf)
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
        return buf.getvalue()

    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            a.close()
            os.close(out_r)
            b.send("ready")
            b.flush()
            os.read(go_r, 1)
            prof = cProfile.Profile()
            prof.enable()
            for i in range(n):
                b.send(small(i))
            b.flush()
            prof.disable()
            os.write(out_w, report(prof, f"sender (child): {n} x ch.send(small dict) + flush").encode())
            os.close(out_w)
            with contextlib.suppress(Exception):
                b.recv(timeout=60)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    b.close()
    os.close(out_w)
    try:
        a.recv(timeout=30)
        prof = cProfile.Profile()
        os.write(go_w, b"g")
        prof.enable()
        for _ in range(n):
            a.recv()
        prof.disable()
        a.close()
        child_report = b""
        while chunk := os.read(out_r, 65536):
            child_report += chunk
        print(child_report.decode())
        print(report(prof, f"receiver (parent): {n} x ch.recv()"))
    finally:
        a.close()
        for fd in (go_r, go_w, out_r):
            os.close(fd)
        reap(pid, 10.0)


def run_main(argv: list[str]) -> int:
    """``--_run CONTENDER WORKLOAD N``: print one JSON line with the result."""
    key, workload, n = argv[0], argv[1], int(argv[2])
    contender = BY_KEY[key]
    result = run_one(contender, workload, n)
    print(json.dumps(result))
    return 0


# =========================================================================
# The coordinating side.
# =========================================================================


@dataclass
class Workload:
    key: str  # the run-side workload
    title: str
    n: int
    pin: bool = False
    kind: str = "stream"  # stream | pingpong | bulk


def workloads(scale: float) -> list[Workload]:
    small_n = max(10, int(SMALL_N * scale))
    pp_n = max(10, int(PINGPONG_N * scale))
    bulk_n = max(2, int(BULK_N * scale))
    return [
        Workload("stream", f"one-way streaming: {small_n} small dicts (~41 B msgpack), child -> parent", small_n),
        Workload(
            "pingpong", f"ping-pong: {pp_n} round trips, both processes pinned to one CPU", pp_n, True, "pingpong"
        ),
        Workload("pingpong", f"ping-pong: {pp_n} round trips, unpinned", pp_n, False, "pingpong"),
        Workload("bulk", f"bulk: {bulk_n} x 1 MiB bytes, child -> parent", bulk_n, kind="bulk"),
    ]


@dataclass
class Sample:
    seconds: float
    n: int
    nbytes: int = 0
    median_us: float = 0.0
    p99_us: float = 0.0


def percentile(sorted_values: list[float], q: float) -> float:
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


def to_sample(result: dict[str, Any]) -> Sample:
    s = Sample(result["seconds"], result["n"], result.get("bytes", 0))
    lat = result.get("latencies")
    if lat:
        lat = sorted(lat)
        s.median_us = statistics.median(lat) * 1e6
        s.p99_us = percentile(lat, 0.99) * 1e6
    return s


class Interrupted(Exception):
    pass


def launch(contender: Contender, wl: Workload, pin_cpu: int | None, timeout: float) -> Sample:
    """Run one contender once, in a fresh process group; always reaped."""
    if contender.node:
        cmd = ["node", os.path.join(NODE_DIR, "parent.js"), wl.key, str(wl.n)]
        if wl.key == "bulk":
            cmd.append(str(BULK_SIZE))
    else:
        key = contender.runs_as or contender.key
        cmd = [sys.executable, os.path.abspath(__file__), "--_run", key, wl.key, str(wl.n)]

    def preexec() -> None:
        # Children inherit the mask, so both processes of the run share it.
        cpus = {pin_cpu} if pin_cpu is not None else ALL_CPUS
        os.sched_setaffinity(0, cpus)

    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C reaches us only; we end the whole group
        preexec_fn=preexec,
        env={**os.environ, "PYTHONHASHSEED": "0", **contender.env},
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as exc:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise RuntimeError(f"timed out after {timeout:.0f} s") from None
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted from None
        raise
    finally:
        # Whatever the run left behind in its group (a stray child) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"exit {proc.returncode}: " + " | ".join(tail))
    lines = out.decode().strip().splitlines()
    if not lines:
        raise RuntimeError("no result printed")
    return to_sample(json.loads(lines[-1]))


ALL_CPUS: set[int] = set()


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    node = "absent"
    if shutil.which("node"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            node = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        import zmq

        zmq_v = f"pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()})"
    except ImportError:
        zmq_v = "pyzmq absent"
    try:
        import msgpack

        mp_v = "msgpack " + ".".join(map(str, msgpack.version))
    except ImportError:
        mp_v = "msgpack absent"
    from ipcbus._fastpath import ACCELERATED

    accel = "built and used" if ACCELERATED else "not in use (pure Python rows only)"
    return (
        f"machine: nproc={os.cpu_count()} (affinity {len(ALL_CPUS)}), CPU {model}\n"
        f"python {platform.python_version()} ({platform.python_implementation()}), node {node}, {mp_v}, {zmq_v}, "
        f"{platform.system()} {platform.release()}\n"
        f"ipcbus C accelerator (ipcbus._speedups): {accel}"
    )


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def fmt_ratio(x: float | None, y: float | None) -> str:
    return f"{x / y:.2f}" if x and y else "-"


@dataclass
class Row:
    contender: Contender
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: str | None = None

    def _vals(self, f: Callable[[Sample], float]) -> list[float]:
        return [f(s) for s in self.samples]

    def rate(self) -> float | None:
        return statistics.median(self._vals(lambda s: s.n / s.seconds)) if self.samples else None

    def mbps(self) -> float | None:
        return statistics.median(self._vals(lambda s: s.nbytes / s.seconds / 1e6)) if self.samples else None

    def median_us(self) -> float | None:
        return statistics.median(self._vals(lambda s: s.median_us)) if self.samples else None


def print_table(wl: Workload, rows: list[Row], ref: dict[str, Any]) -> None:
    print()
    print(f"== {wl.title} ==")
    if wl.kind == "pingpong":
        head = (
            f"{'contender':<26} {'median RTT us':>13} {'(min':>7} {'max)':>7} {'p99 us':>8} "
            f"{'RTT/s':>9} {'x raw':>6} {'runs':>5}"
        )
    elif wl.kind == "bulk":
        head = f"{'contender':<26} {'MB/s':>9} {'(min':>9} {'max)':>9} {'x raw':>6} {'runs':>5}"
    else:
        head = f"{'contender':<26} {'msg/s':>10} {'(min':>10} {'max)':>10} {'x raw':>6} {'x mp':>6} {'runs':>5}"
    print(head)
    print("-" * len(head))
    for row in rows:
        name = row.contender.label
        if row.skipped:
            print(f"{name:<26} skipped: {row.skipped}")
            continue
        if not row.samples:
            print(f"{name:<26} " + (f"FAILED: {row.errors[0]}" if row.errors else "not run (interrupted)"))
            continue
        runs = f"{len(row.samples)}" + (f"+{len(row.errors)}err" if row.errors else "")
        if wl.kind == "pingpong":
            meds = row._vals(lambda s: s.median_us)
            p99 = statistics.median(row._vals(lambda s: s.p99_us))
            rps = statistics.median(row._vals(lambda s: s.n / s.seconds))
            med = statistics.median(meds)
            print(
                f"{name:<26} {med:>13.1f} {min(meds):>7.1f} {max(meds):>7.1f} {p99:>8.1f} "
                f"{fmt_rate(rps):>9} {fmt_ratio(med, ref.get('raw')):>6} {runs:>5}"
            )
        elif wl.kind == "bulk":
            vals = row._vals(lambda s: s.nbytes / s.seconds / 1e6)
            med = statistics.median(vals)
            print(
                f"{name:<26} {med:>9.0f} {min(vals):>9.0f} {max(vals):>9.0f} "
                f"{fmt_ratio(med, ref.get('raw')):>6} {runs:>5}"
            )
        else:
            vals = row._vals(lambda s: s.n / s.seconds)
            med = statistics.median(vals)
            print(
                f"{name:<26} {fmt_rate(med):>10} {fmt_rate(min(vals)):>10} {fmt_rate(max(vals)):>10} "
                f"{fmt_ratio(med, ref.get('raw')):>6} {fmt_ratio(med, ref.get('mp')):>6} {runs:>5}"
            )
        for err in row.errors[:2]:
            print(f"{'':<26}   error in a run: {err}")


def references(wl: Workload, rows: dict[str, Row]) -> dict[str, Any]:
    """The raw loop's best figure (the practical Python limit) and mp.Pipe's."""
    raw = [rows[k] for k in ("raw-packb", "raw-packer") if k in rows and rows[k].samples]
    ref: dict[str, Any] = {}
    if wl.kind == "pingpong":
        vals = [r.median_us() for r in raw]
        ref["raw"] = min(v for v in vals if v is not None) if vals else None
    elif wl.kind == "bulk":
        vals = [r.mbps() for r in raw]
        ref["raw"] = max(v for v in vals if v is not None) if vals else None
    else:
        vals = [r.rate() for r in raw]
        ref["raw"] = max(v for v in vals if v is not None) if vals else None
        mp = rows.get("mp-pipe")
        ref["mp"] = mp.rate() if mp and mp.samples else None
    return ref


def print_targets(wls: list[Workload], table: dict[int, dict[str, Row]]) -> None:
    print()
    print("== targets (ratios of medians within this run; raw = the faster raw row) ==")

    def check(label: str, value: float | None, op: str, bound: float) -> None:
        if value is None:
            print(f"  [ n/a] {label}: a row is missing")
            return
        ok = value >= bound if op == ">=" else value <= bound
        print(f"  [{'PASS' if ok else 'FAIL'}] {label}: {value:.2f}x (target {op} {bound}x)")

    def get(idx: int, key: str, f: Callable[[Row], float | None]) -> float | None:
        row = table.get(idx, {}).get(key)
        return f(row) if row and row.samples else None

    for idx, wl in enumerate(wls):
        rows = table.get(idx, {})
        ref = references(wl, rows)
        raw = ref.get("raw")
        if wl.kind == "stream":
            ipc = get(idx, "ipcbus", Row.rate)
            check("streaming: ipcbus blocking vs raw loop", ipc / raw if ipc and raw else None, ">=", 0.9)
            mp = ref.get("mp")
            check("streaming: ipcbus blocking vs multiprocessing.Pipe", ipc / mp if ipc and mp else None, ">=", 4.0)
            tr = get(idx, "ipcbus-trio", Row.rate)
            check("streaming: ipcbus trio (nowait) vs ipcbus blocking", tr / ipc if tr and ipc else None, ">=", 0.8)
        elif wl.kind == "pingpong":
            ipc = get(idx, "ipcbus", Row.median_us)
            where = "pinned" if wl.pin else "unpinned"
            check(f"ping-pong {where}: ipcbus median RTT vs raw", ipc / raw if ipc and raw else None, "<=", 1.3)
        else:
            ipc = get(idx, "ipcbus", Row.mbps)
            check("1 MiB: ipcbus blocking vs raw loop", ipc / raw if ipc and raw else None, ">=", 0.7)


def pin_name(wl: Workload) -> str:
    return "pinned" if wl.pin else "unpinned"


def coordinate(args: argparse.Namespace) -> int:
    global ALL_CPUS
    ALL_CPUS = set(os.sched_getaffinity(0))
    pin_cpu = args.pin_cpu if args.pin_cpu is not None else min(ALL_CPUS)
    wls = workloads(args.n_scale)
    if args.workloads:
        wanted = set(args.workloads.split(","))
        wls = [w for w in wls if w.key in wanted or (w.kind == "pingpong" and pin_name(w) in wanted)]
    contenders = CONTENDERS
    if args.contenders:
        wanted = set(args.contenders.split(","))
        unknown = wanted - set(BY_KEY)
        if unknown:
            print(f"unknown contenders: {sorted(unknown)}; known: {sorted(BY_KEY)}", file=sys.stderr)
            return 2
        contenders = [c for c in CONTENDERS if c.key in wanted]
    if args.baseline:
        # The same runs over another checkout of ipcbus (PYTHONPATH comes
        # before the installed one): before/after figures in one run.
        path = os.path.abspath(args.baseline)
        if not os.path.isfile(os.path.join(path, "ipcbus", "__init__.py")):
            print(f"--baseline {args.baseline}: no ipcbus/ package there", file=sys.stderr)
            return 2
        current = BY_KEY["ipcbus"]
        at = contenders.index(current) + 1 if current in contenders else 0
        baseline = dataclasses.replace(
            current,
            key="ipcbus-baseline",
            label="ipcbus blocking, baseline",
            env={"PYTHONPATH": path},
            runs_as="ipcbus",
        )
        contenders = [*contenders[:at], baseline, *contenders[at:]]

    print("ipcbus message benchmark")
    print(machine())
    print(
        f"rounds={args.rounds}, n-scale={args.n_scale}, pinned CPU={pin_cpu}; each run in fresh processes, "
        "contenders alternate round-robin; figures are medians over rounds (min/max in brackets)"
    )
    print("note: a loaded or shared machine widens the spread; compare rows of one run, not across runs")

    skipped = {c.key: c.missing() for c in contenders}
    def skip_reason(c: Contender, wl: Workload) -> str | None:
        if c.kinds is not None and wl.kind not in c.kinds:
            return f"runs only: {', '.join(c.kinds)}"
        return skipped[c.key]

    table: dict[int, dict[str, Row]] = {
        i: {c.key: Row(c, skipped=skip_reason(c, wl)) for c in contenders} for i, wl in enumerate(wls)
    }
    interrupted = False
    try:
        for rnd in range(args.rounds):
            t_round = time.monotonic()
            for i, wl in enumerate(wls):
                active = [c for c in contenders if not table[i][c.key].skipped]
                # Rotate the order each round so no contender always goes first.
                k = rnd % len(active) if active else 0
                for c in active[k:] + active[:k]:
                    row = table[i][c.key]
                    try:
                        row.samples.append(launch(c, wl, pin_cpu if wl.pin else None, args.timeout))
                    except Interrupted:
                        raise
                    except Exception as exc:
                        row.errors.append(str(exc))
            sys.stdout.flush()
            print(f"  round {rnd + 1}/{args.rounds} done in {time.monotonic() - t_round:.1f} s", file=sys.stderr)
    except (Interrupted, KeyboardInterrupt):
        interrupted = True
        print("\ninterrupted: partial results below", file=sys.stderr)

    for i, wl in enumerate(wls):
        print_table(wl, list(table[i].values()), references(wl, table[i]))
    print_targets(wls, table)
    return 130 if interrupted else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_run":
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        return run_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=None, help="rounds over all contenders (default 5; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="a fast smoke run: 1 round, n-scale 0.1 unless given")
    p.add_argument("--n-scale", type=float, default=None, help="multiply every message count (default 1.0)")
    p.add_argument("--pin-cpu", type=int, default=None, help="CPU for the pinned ping-pong (default: lowest allowed)")
    p.add_argument("--contenders", help=f"comma-separated subset of: {','.join(BY_KEY)}")
    p.add_argument("--workloads", help="comma-separated subset of: stream,pinned,unpinned,bulk")
    p.add_argument("--timeout", type=float, default=RUN_TIMEOUT, help="seconds allowed for one run")
    p.add_argument(
        "--baseline",
        metavar="DIR",
        help="also run ipcbus blocking from this checkout (its C accelerator built in place), e.g.\n"
        "git worktree add /tmp/before HEAD~1 && (cd /tmp/before && python setup.py build_ext --inplace)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of the table: cProfile ipcbus blocking streaming (sender and receiver)",
    )
    p.add_argument("--profile-top", type=int, default=25, help="entries per profile")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    if args.n_scale is None:
        args.n_scale = 0.1 if args.quick else 1.0
    if args.profile:
        profile_ipcbus_stream(max(10, int(SMALL_N * args.n_scale)), args.profile_top)
        return 0
    return coordinate(args)


if __name__ == "__main__":
    sys.exit(main())
