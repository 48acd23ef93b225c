"""Handle passing: one listening TCP socket, served by two child processes.

The parent binds a port, sends the listening socket to two children started
with ``ipcbus.fork()`` and closes its own copy: from then on only the
children hold the port, and both accept connections on it. Every HTTP
request is answered "handled by child, pid is N" by one of them.

    python examples/handles/parent.py                  # makes 10 requests itself, then stops
    python examples/handles/parent.py --serve          # waits for you: curl http://127.0.0.1:PORT/
    python examples/handles/parent.py --serve --port 8000 --requests 50

It stops after ``--requests`` requests were handled (children report each
one), or on Ctrl-C / SIGTERM, and always stops and reaps its children.
"""

from __future__ import annotations

import argparse
import http.client
import os
import queue
import signal
import socket
import sys
import threading
from typing import Any

import ipcbus

HERE = os.path.dirname(os.path.abspath(__file__))


def relay(child: ipcbus.ChildProcess, events: queue.Queue[Any]) -> None:
    """Forward a child's reports to the main loop (one thread per child)."""
    try:
        for msg in child.channel:
            events.put(msg.data)
    except ipcbus.IPCError:
        pass
    events.put({"gone": child.pid})


def client(url_host: str, port: int, count: int) -> None:
    """The built-in client: ``count`` requests, one connection each."""
    for i in range(count):
        conn = http.client.HTTPConnection(url_host, port, timeout=10)
        try:
            conn.request("GET", f"/{i}")
            body = conn.getresponse().read().decode().strip()
            print(f"request {i + 1}: {body}", flush=True)
        except OSError as exc:
            print(f"request {i + 1} failed: {exc}", flush=True)
        finally:
            conn.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: any free port (default)")
    ap.add_argument("--requests", type=int, default=10, help="stop after this many requests (default 10)")
    ap.add_argument("--serve", action="store_true", help="do not make requests; wait for other clients")
    args = ap.parse_args(argv)

    stopping = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    server = socket.create_server((args.host, args.port))
    port = server.getsockname()[1]
    children = [ipcbus.fork(os.path.join(HERE, "child.py")) for _ in range(2)]
    events: queue.Queue[Any] = queue.Queue()
    handled: dict[int, int] = {c.pid: 0 for c in children}
    try:
        for child in children:
            child.channel.send({"cmd": "serve"}, handle=server)
        # The children hold the port now; the parent needs no copy.
        server.close()
        for child in children:
            threading.Thread(target=relay, args=(child, events), daemon=True).start()
        ready = 0
        while ready < len(children) and not stopping.is_set():
            try:
                ev = events.get(timeout=10)
            except queue.Empty:
                print("parent: the children did not start", file=sys.stderr)
                return 1
            if "gone" in ev:
                print(f"parent: child {ev['gone']} failed to start", file=sys.stderr)
                return 1
            ready += "ready" in ev
        pids = [c.pid for c in children]
        print(f"parent {os.getpid()}: children {pids} serve http://{args.host}:{port}/", flush=True)
        print(f"parent: stopping after {args.requests} requests, or on Ctrl-C / SIGTERM", flush=True)
        requester = None
        if not args.serve:
            requester = threading.Thread(target=client, args=(args.host, port, args.requests), daemon=True)
            requester.start()

        total = 0
        alive = len(children)
        while not stopping.is_set() and total < args.requests and alive:
            try:
                ev = events.get(timeout=0.2)
            except queue.Empty:
                continue
            if "handled" in ev:
                handled[ev["handled"]] = handled.get(ev["handled"], 0) + 1
                total += 1
            elif "gone" in ev:
                alive -= 1
                print(f"parent: child {ev['gone']} went away", flush=True)
        if requester is not None:
            requester.join(timeout=10)  # its last answer is printed before the summary
    finally:
        server.close()
        for child in children:
            try:
                child.channel.send({"cmd": "stop"})
            except ipcbus.IPCError:
                pass
        for child in children:
            child.close(grace=3)  # waits; SIGTERM, then SIGKILL if it must
        summary = ", ".join(f"child {pid}: {n}" for pid, n in handled.items())
        print(f"parent: {sum(handled.values())} requests handled ({summary}); children exited "
              f"{[c.returncode for c in children]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
