"""Python lines executed per call on ipcbus's hot paths: a deterministic
cost measure for comparing two versions of the code.

Wall-clock and CPU-time figures on a shared VM swing by tens of percent
between runs (and CPU time there is sampled at clock ticks); the number of
Python lines a call executes does not move unless the code does. It is not a
speed: a line can be one cheap bytecode or a system call. Use it beside the
side-by-side benchmarks, not instead of them.

    python benchmarks/hotpath.py            # table of lines per call
    python benchmarks/hotpath.py --detail   # and where they are, per function
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from msgpack import packb

import ipcbus
import ipcbus._channel as channel_module
from ipcbus._protocol import FRAME

MSG = {"op": "put", "key": "k12345", "value": 123456, "ok": True, "n": 1}
CALLS = 64


def count_lines(fn: Callable[[], Any]) -> collections.Counter[str]:
    """Lines executed by ``CALLS`` calls of ``fn``, per function name."""
    counts: collections.Counter[str] = collections.Counter()

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            counts[frame.f_code.co_name] += 1
        return tracer

    sys.settrace(tracer)
    try:
        for _ in range(CALLS):
            fn()
    finally:
        sys.settrace(None)
    return counts


def scenarios() -> tuple[list[tuple[str, Callable[[], Any], Callable[[], Any]]], Callable[[], Any]]:
    """(name, the call, what to do after the CALLS calls) and a cleanup."""
    a, b = ipcbus.pair()
    for _ in range(10):  # past the handshake
        a.send(MSG)
        b.recv()
        b.send(MSG)
        a.recv()
    r, w = os.pipe()
    handle = ipcbus.Handle(r)
    peer = b.stream.socket  # type: ignore[attr-defined]
    frame = FRAME.pack(len(packb(MSG)), 0, 0, 0) + packb(MSG)

    def nothing() -> None:
        pass

    def lone_send() -> None:  # a reply: written at once
        a._read_since_write = True
        a.send(MSG)
        peer.recv(4096)

    def burst_send() -> None:  # a burst: joins the list
        a.send(MSG)

    def drain_burst() -> None:
        a.flush()
        for _ in range(CALLS):
            b.recv(timeout=5)

    def recv_one() -> None:  # a round trip's read: one frame, one read
        peer.send(frame)
        a.recv()

    def handle_send() -> None:  # a burst of handle= messages
        a.send(1, handle=handle)

    def handle_recv() -> None:
        msg = b.recv()
        for h in msg.handles:
            h.close()

    def cleanup() -> None:
        a.close()
        b.close()
        handle.close()
        os.close(w)

    return [
        ("send, lone (a reply)", lone_send, nothing),
        ("send, in a burst", burst_send, drain_burst),
        ("recv, round trip", recv_one, nothing),
        ("send, handle= in a burst", handle_send, a.flush),
        ("recv, handle=", handle_recv, nothing),
    ], cleanup


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detail", action="store_true", help="lines per function too")
    args = ap.parse_args(argv)
    # Tracing slows every call past the lone-send gap: hold bursts as bursts.
    channel_module.LONE_SEND_GAP = 10.0
    runs, cleanup = scenarios()
    print(f"{'hot path':28s} {'lines per call':>14s}")
    for name, fn, after in runs:
        counts = count_lines(fn)
        after()
        print(f"{name:28s} {sum(counts.values()) / CALLS:14.1f}")
        if args.detail:
            for func, n in counts.most_common(8):
                print(f"    {n / CALLS:6.1f}  {func}")
    cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
