"""One listening TCP socket, served by a Node.js worker and a Python worker
at once.

The master binds the port and hands the listening socket to both workers:
to the Node worker over Node's own IPC channel (``protocol="node"``: the
worker uses ``process.on('message', (msg, server) => ...)``), and to the
Python worker over an ipcbus channel. Both accept on it; each answers with
its runtime name and pid::

    python examples/node/master.py --port 8000
    curl http://127.0.0.1:8000/      # node 1234   or   python 5678

The master stops after ``--requests N`` requests (0: never), or on
SIGINT/SIGTERM, and then stops both workers and waits for them.
"""

from __future__ import annotations

import argparse
import queue
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import ipcbus

HERE = Path(__file__).resolve().parent


def reader(name: str, channel: ipcbus.Channel, events: queue.SimpleQueue[tuple[str, Any]]) -> None:
    try:
        for msg in channel:
            events.put((name, msg.data))
    except ipcbus.IPCError:
        pass
    events.put((name, None))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--requests", type=int, default=0, help="stop after this many (0: never)")
    args = parser.parse_args(argv)

    # SimpleQueue: on_signal puts from a signal handler, which may run while
    # this thread is inside the queue's own methods; Queue.put there would
    # wait for the lock its own thread holds, SimpleQueue.put is reentrant.
    # (Only get() with no timeout: see examples/cluster/server.py.)
    events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        events.put(("signal", signum))

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    with socket.create_server((args.host, args.port)) as server:
        # Own sessions: Ctrl-C in a terminal reaches the master alone, which
        # then stops the workers in order.
        workers = {
            "node": ipcbus.spawn(
                ["node", str(HERE / "worker.js")], ipc=True, protocol="node", start_new_session=True
            ),
            "python": ipcbus.fork(HERE / "worker.py", start_new_session=True),
        }
        try:
            for name, child in workers.items():
                threading.Thread(target=reader, args=(name, child.channel, events), daemon=True).start()
                child.channel.send({"op": "serve"}, server)
            host, port = server.getsockname()[:2]
            served = {"node": 0, "python": 0}
            ready = set()
            running = set(workers)
            while running and not stopping:
                source, data = events.get()
                if source == "signal":
                    print(f"master: signal {signal.Signals(data).name}, stopping", flush=True)
                    stopping = True
                elif data is None:
                    print(f"master: {source} worker left", flush=True)
                    running.discard(source)
                    stopping = True
                elif "ready" in data:
                    ready.add(source)
                    print(f"master: {source} worker pid {data['pid']} ready", flush=True)
                    if ready == set(workers):
                        print(f"master: serving on http://{host}:{port}/", flush=True)
                elif "served" in data:
                    served[source] += 1
                    total = sum(served.values())
                    if args.requests and total >= args.requests:
                        print(f"master: {total} requests served, stopping", flush=True)
                        stopping = True
        finally:
            for child in workers.values():
                try:
                    child.channel.send({"op": "stop"})
                except ipcbus.IPCError:
                    pass
            codes = {name: child.close(grace=5) for name, child in workers.items()}
        print(f"master: served {served}; workers exited {codes}", flush=True)
    return 0 if all(code == 0 for code in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
