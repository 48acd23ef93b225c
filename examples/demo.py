"""The README's demo: a supervised multi-core HTTP server, end to end.

    ./dev.sh demo            (or: python examples/demo.py [--mode shared|rr] [--workers N])

It starts ``examples/cluster/server.py`` (a master that forks worker
processes with ``ipcbus.fork`` and hands them connections over ipcbus
channels), sends HTTP requests and shows which worker pid answered each,
kills one worker with SIGKILL to show the master replacing it, sends more
requests, then shuts the cluster down with SIGTERM. The master's lifecycle
log (stderr) is shown as it happens.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, "cluster", "server.py")


def get(port: int, path: str = "/") -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {body[:100]!r}")
        return json.loads(body)
    finally:
        conn.close()


def burst(port: int, n: int, threads: int = 4) -> collections.Counter:
    """``n`` requests from a few client threads; how many each pid served."""
    seen: collections.Counter = collections.Counter()
    lock = threading.Lock()
    per = n // threads

    def client() -> None:
        for _ in range(per):
            try:
                pid = get(port)["pid"]
            except (OSError, RuntimeError):
                pid = "failed"  # e.g. a connection the killed worker held
            with lock:
                seen[pid] += 1

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return seen


def show(title: str, seen: collections.Counter) -> None:
    spread = ", ".join(
        f"pid {pid}: {count}" if pid != "failed" else f"failed: {count}"
        for pid, count in sorted(seen.items(), key=lambda kv: str(kv[0]))
    )
    print(f"  {title}: {sum(seen.values())} requests -> {spread}", flush=True)


def pump(stream, prefix: str) -> None:
    for line in stream:
        print(f"    {prefix} {line.rstrip()}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("shared", "rr"), default="rr")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=200)
    opts = parser.parse_args()

    print(f"ipcbus demo: {opts.workers} workers, mode {opts.mode}", flush=True)
    master = subprocess.Popen(
        [sys.executable, SERVER, "--workers", str(opts.workers), "--port", "0", "--mode", opts.mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = master.stdout.readline().strip()  # "listening on 127.0.0.1:PORT"
        if not first.startswith("listening on "):
            print(f"the master did not start: {first!r}", file=sys.stderr)
            return 1
        port = int(first.rsplit(":", 1)[1])
        print(f"master pid {master.pid} {first}; its log:", flush=True)
        threading.Thread(target=pump, args=(master.stderr, "|"), daemon=True).start()

        # Wait until every worker answers.
        deadline = time.monotonic() + 20
        pids: set[int] = set()
        while len(pids) < opts.workers and time.monotonic() < deadline:
            pids |= {pid for pid in burst(port, 8) if pid != "failed"}

        show("requests spread over the workers", burst(port, opts.requests))
        fib = get(port, "/fib?n=25")
        print(f"  /fib?n=25 -> {fib}", flush=True)

        victim = min(pids)
        print(f"  kill -9 worker {victim}: the master replaces it", flush=True)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            seen = burst(port, 40)
            if victim not in seen and "failed" not in seen and len(seen) >= opts.workers:
                show("after the replacement", seen)
                break
            time.sleep(0.2)

        print("  SIGTERM to the master: graceful shutdown", flush=True)
        master.send_signal(signal.SIGTERM)
        code = master.wait(timeout=30)
        time.sleep(0.1)  # let the log pump print the last lines
        print(f"master exited with status {code}", flush=True)
        return 0 if code == 0 else 1
    finally:
        if master.poll() is None:
            master.kill()
            master.wait()


if __name__ == "__main__":
    sys.exit(main())
