"""Handle passing side by side: ipcbus against raw SCM_RIGHTS loops.

Measures handles per second, ``--count`` handles (default 20 000) sent one
way from a sender process to a receiver process over an AF_UNIX socketpair.
Every contender sends the same kind of fd (the read end of one pipe, sent
again and again) and the receiver closes each fd it gets, so each row pays
for one fd crossing the kernel and one close:

* ``raw send_fds x1``: ``socket.send_fds`` with one fd per sendmsg and
  ``socket.recv_fds`` on the other side (the practical Python limit);
* ``raw send_fds x16``: the same with 16 fds per sendmsg;
* ``mp send_handle``: ``multiprocessing.reduction.send_handle`` /
  ``recv_handle`` over a ``multiprocessing.Pipe``;
* ``ipcbus blocking``: ``ch.send(i, handle=Handle(fd))`` / ``ch.recv()``,
  the handle restored (kind checked) and closed by the receiver;
* ``ipcbus blocking x16``: ``handles=[16 fds]`` per message;
* ``ipcbus blocking socket``: a listening TCP socket instead of a pipe (the
  receiver's kind check and ``socket.socket`` restore are dearer);
* ``ipcbus trio``: the trio frontend, both ends.

The contenders alternate (round-robin over ``--rounds`` rounds, each run in
fresh processes), and the table shows medians with the ratio to
``raw send_fds x1``. The target is ipcbus blocking >= 0.7x that row.

    python benchmarks/bench_handles.py             # 5 rounds of 20 000
    python benchmarks/bench_handles.py --quick     # smoke run
    python benchmarks/bench_handles.py --profile   # cProfile both ipcbus ends

Each run is ``python bench_handles.py --_run CONTENDER N``: it forks the
receiver, waits for it to say it is ready, then times from the first send
until the receiver reports how many handles it closed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

BATCH = 16
RUN_TIMEOUT = 300.0
TARGET = 0.7
BASELINE = "raw send_fds x1"


# =========================================================================
# The run side: one contender in a fresh process. ``sender(sock, fd, n,
# prof)`` runs here and returns when the receiver has reported; the receiver
# runs in a child forked from this process.
# =========================================================================


def _fork(child: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            child()
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid


def _profiled(prof: str | None, fn: Callable[[], Any]) -> Any:
    if not prof:
        return fn()
    import cProfile

    pr = cProfile.Profile()
    pr.enable()
    try:
        return fn()
    finally:
        pr.disable()
        pr.dump_stats(prof)


def run_raw(n: int, per_msg: int, prof: str | None) -> float:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    fds = [r] * per_msg

    def receiver() -> None:
        a.close()
        b.sendall(b"R")
        got = 0
        while got < n:
            _msg, fds_in, _flags, _addr = socket.recv_fds(b, 16, per_msg)
            for fd in fds_in:
                os.close(fd)
            got += len(fds_in)
        b.sendall(got.to_bytes(8, "big"))

    pid = _fork(receiver)
    b.close()
    assert a.recv(1) == b"R"

    def send() -> float:
        t0 = time.perf_counter()
        for _ in range(n // per_msg):
            socket.send_fds(a, [b"h"], fds)
        got = int.from_bytes(a.recv(8), "big")
        elapsed = time.perf_counter() - t0
        assert got == n, got
        return elapsed

    try:
        return _profiled(prof, send)
    finally:
        a.close()
        os.close(r)
        os.close(w)
        os.waitpid(pid, 0)


def run_mp(n: int, prof: str | None) -> float:
    import multiprocessing
    from multiprocessing import reduction

    ours, theirs = multiprocessing.Pipe()
    r, w = os.pipe()

    def receiver() -> None:
        ours.close()
        theirs.send_bytes(b"R")
        for _ in range(n):
            os.close(reduction.recv_handle(theirs))
        theirs.send_bytes(n.to_bytes(8, "big"))

    pid = _fork(receiver)
    theirs.close()
    assert ours.recv_bytes() == b"R"

    def send() -> float:
        t0 = time.perf_counter()
        me = pid
        for _ in range(n):
            reduction.send_handle(ours, r, me)
        got = int.from_bytes(ours.recv_bytes(), "big")
        elapsed = time.perf_counter() - t0
        assert got == n, got
        return elapsed

    try:
        return _profiled(prof, send)
    finally:
        ours.close()
        os.close(r)
        os.close(w)
        os.waitpid(pid, 0)


def _ipcbus_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def _blocking_channel(sock: socket.socket) -> Any:
    from ipcbus._channel import Channel
    from ipcbus.transports._sockets import SocketStream

    return Channel._open(SocketStream(sock, name="socketpair", trusted=True), "peer", codec="msgpack")


def run_ipcbus_blocking(n: int, per_msg: int, kind: str, prof: str | None) -> float:
    import ipcbus

    a, b = _ipcbus_pair()
    if kind == "socket":
        obj: Any = socket.create_server(("127.0.0.1", 0))
        closers: list[Any] = [obj]
    else:
        r, w = os.pipe()
        obj = ipcbus.Handle(r)
        closers = [obj, ipcbus.Handle(w)]

    def receiver() -> None:
        a.close()
        for c in closers:
            c.close()
        ch = _blocking_channel(b)
        ch.send("ready")

        def loop() -> int:
            got = 0
            while got < n:
                msg = ch.recv()
                for h in msg.handles:
                    h.close()
                    got += 1
            return got

        got = _profiled(prof + ".recv" if prof else None, loop)
        ch.send(got)
        ch.close()

    pid = _fork(receiver)
    b.close()
    ch = _blocking_channel(a)
    assert ch.recv(timeout=30).data == "ready"

    def send() -> float:
        t0 = time.perf_counter()
        send_ = ch.send
        if per_msg == 1:
            for i in range(n):
                send_(i, handle=obj)
        else:
            many = [obj] * per_msg
            for i in range(n // per_msg):
                send_(i, handles=many)
        got = ch.recv(timeout=RUN_TIMEOUT).data
        elapsed = time.perf_counter() - t0
        assert got == n, got
        return elapsed

    try:
        return _profiled(prof, send)
    finally:
        ch.close()
        for c in closers:
            c.close()
        os.waitpid(pid, 0)


def run_ipcbus_trio(n: int, prof: str | None) -> float:
    import trio

    import ipcbus
    from ipcbus._trio_channel import AsyncChannel
    from ipcbus.transports._sockets import AsyncSocketStream

    def channel(sock: socket.socket) -> Any:
        return AsyncChannel._open(AsyncSocketStream(sock, name="socketpair", trusted=True), "peer", codec="msgpack")

    a, b = _ipcbus_pair()
    r, w = os.pipe()
    h = ipcbus.Handle(r)

    def receiver() -> None:
        a.close()
        h.close()
        os.close(w)

        async def main() -> None:
            ch = channel(b)
            async with ch:
                await ch.send("ready")
                got = 0
                while got < n:
                    msg = await ch.recv()
                    for x in msg.handles:
                        x.close()
                        got += 1
                await ch.send(got)

        trio.run(main)

    pid = _fork(receiver)
    b.close()
    result: list[float] = []

    async def main() -> None:
        ch = channel(a)
        async with ch:
            assert (await ch.recv()).data == "ready"
            t0 = time.perf_counter()
            for i in range(n):
                await ch.send(i, handle=h)
            got = (await ch.recv()).data
            result.append(time.perf_counter() - t0)
            assert got == n, got

    try:
        _profiled(prof, lambda: trio.run(main))
        return result[0]
    finally:
        h.close()
        os.close(w)
        os.waitpid(pid, 0)


CONTENDERS: dict[str, Callable[[int, str | None], float]] = {
    "raw send_fds x1": lambda n, p: run_raw(n, 1, p),
    "raw send_fds x16": lambda n, p: run_raw(n, BATCH, p),
    "mp send_handle": run_mp,
    "ipcbus blocking": lambda n, p: run_ipcbus_blocking(n, 1, "pipe", p),
    "ipcbus blocking x16": lambda n, p: run_ipcbus_blocking(n, BATCH, "pipe", p),
    "ipcbus blocking socket": lambda n, p: run_ipcbus_blocking(n, 1, "socket", p),
    "ipcbus trio": run_ipcbus_trio,
}


def _run_one(name: str, n: int, prof: str | None) -> None:
    elapsed = CONTENDERS[name](n, prof)
    print(json.dumps({"name": name, "n": n, "seconds": elapsed}))


# =========================================================================
# The coordinating side.
# =========================================================================


def _trio_available() -> bool:
    try:
        import ipcbus._trio_channel  # noqa: F401
    except ImportError:
        return False
    return True


def measure(name: str, n: int, prof: str | None = None) -> float:
    """Handles per second for one run of ``name`` in a fresh process."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_run", name, str(n)]
    if prof:
        cmd += ["--_prof", prof]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed ({out.returncode}):\n{out.stderr}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return n / result["seconds"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=20_000, help="handles per run (default 20000)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of every contender (default 5)")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 2000 handles")
    ap.add_argument("--only", action="append", help="run only this contender (repeatable)")
    ap.add_argument("--profile", action="store_true", help="cProfile ipcbus blocking, sender and receiver")
    ap.add_argument("--_run", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_prof", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._run:
        _run_one(args._run[0], int(args._run[1]), args._prof)
        return 0
    if args.profile:
        import pstats

        prof = os.path.join(os.getcwd(), "bench_handles.prof")
        rate = measure("ipcbus blocking", args.count, prof)
        print(f"ipcbus blocking: {rate:,.0f} handles/s (under cProfile)")
        for path, side in ((prof, "sender"), (prof + ".recv", "receiver")):
            print(f"\n=== {side} ({path}) ===")
            pstats.Stats(path).sort_stats("tottime").print_stats(18)
        return 0

    n, rounds = (2000, 2) if args.quick else (args.count, args.rounds)
    names = [k for k in CONTENDERS if k != "ipcbus trio" or _trio_available()]
    if args.only:
        names = [k for k in names if k in args.only or k == BASELINE]
    n -= n % BATCH  # the x16 rows send whole batches
    results: dict[str, list[float]] = {k: [] for k in names}
    for rnd in range(rounds):
        # Rotate the order each round so that no contender always runs
        # first (or last) while the machine warms up or gets busy.
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in order:
            results[name].append(measure(name, n))
        print(f"round {rnd + 1}/{rounds} done", file=sys.stderr)

    base = statistics.median(results[BASELINE])
    print(f"\nhandles per second, {n} handles one way, median of {rounds} rounds (higher is better)\n")
    print(f"{'contender':<26}{'handles/s':>12}{'min':>12}{'max':>12}{'vs raw x1':>11}")
    for name in names:
        med = statistics.median(results[name])
        print(
            f"{name:<26}{med:>12,.0f}{min(results[name]):>12,.0f}{max(results[name]):>12,.0f}"
            f"{med / base:>10.2f}x"
        )
    if "ipcbus blocking" in results:
        ratio = statistics.median(results["ipcbus blocking"]) / base
        verdict = "PASS" if ratio >= TARGET else "FAIL"
        print(f"\ntarget ipcbus blocking >= {TARGET}x raw send_fds x1: {ratio:.2f}x {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
