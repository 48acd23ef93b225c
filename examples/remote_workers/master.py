"""A master that hands out jobs to workers connecting over TCP.

    python examples/remote_workers/master.py --workers 3 --jobs 60

The master listens on ``tcp://127.0.0.1:0`` (``--host``/``--port`` to
change it), starts ``--workers`` local worker processes (``worker.py``) that
connect back to it and, once every expected worker is in, sends each idle
worker the next job, collects the results and exits once every job is done.
The same worker runs on another machine::

    master$ IPCBUS_AUTHKEY=$(openssl rand -hex 32) python master.py --host 0.0.0.0 --port 9000 \\
                --workers 0 --external 4
    worker$ IPCBUS_AUTHKEY=<the same key> python worker.py tcp://master:9000

Every connection is authenticated with the shared key in ``IPCBUS_AUTHKEY``
(an HMAC challenge both ways; a random key is made when it is unset, and
handed to the local workers in their environment). Add TLS with
``--tls-cert``/``--tls-key`` (and ``--tls-ca`` for the local workers) here
and ``--tls-ca`` on remote workers. Both ends
run a heartbeat, so a worker that dies or hangs is noticed within
``--heartbeat`` seconds; its job goes back to the queue for another worker.

Stdout: ``listening on URL``, then one line per worker, then a summary.
"""

from __future__ import annotations

import argparse
import os
import queue
import secrets
import ssl
import subprocess
import sys
import threading
import time
from typing import Any

import ipcbus

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")


_say_lock = threading.Lock()


def say(line: str) -> None:
    # One write per line, under a lock: print() writes the text and the
    # newline separately, so lines from two worker threads could interleave.
    with _say_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class JobBoard:
    """The jobs still to do, and the results so far (thread-safe)."""

    def __init__(self, jobs: list[dict[str, Any]]) -> None:
        self.todo: queue.Queue[dict[str, Any]] = queue.Queue()
        for job in jobs:
            self.todo.put(job)
        self.total = len(jobs)
        self.results: dict[int, Any] = {}
        self.by_worker: dict[str, int] = {}
        self.lock = threading.Lock()
        self.all_done = threading.Event()
        self.start = threading.Event()  # set once every expected worker is in

    def next_job(self) -> dict[str, Any] | None:
        """A job, or None once every job has a result. A job a lost worker
        gives back reappears here, so an idle worker waits rather than quits."""
        while not self.all_done.is_set():
            try:
                return self.todo.get(timeout=0.05)
            except queue.Empty:
                continue
        return None

    def record(self, worker: str, job_id: int, value: Any) -> None:
        with self.lock:
            self.results[job_id] = value
            self.by_worker[worker] = self.by_worker.get(worker, 0) + 1
            if len(self.results) == self.total:
                self.all_done.set()


def serve(channel: ipcbus.Channel, board: JobBoard, alive: list[int], lock: threading.Lock) -> None:
    name = "?"
    try:
        with channel:
            hello = channel.recv(timeout=30).data
            name = f"{hello['name']} (pid {hello['pid']})"
            say(f"worker {name} connected")
            board.start.wait()
            while (job := board.next_job()) is not None:
                try:
                    channel.send({"type": "job", **job})
                    reply = channel.recv().data  # the heartbeat bounds the wait
                except ipcbus.IPCError as exc:
                    board.todo.put(job)
                    say(f"worker {name} lost ({type(exc).__name__}); job {job['id']} goes back to the queue")
                    return
                board.record(name, reply["id"], reply["value"])
            channel.send({"type": "stop"})
    except ipcbus.IPCError as exc:
        say(f"worker {name} failed: {exc}")
    finally:
        with lock:
            alive[0] -= 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3, help="local worker processes to start")
    parser.add_argument("--external", type=int, default=0, help="workers to wait for from elsewhere")
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--heartbeat", type=float, default=5.0)
    parser.add_argument("--tls-cert", help="serve TLS with this certificate chain (PEM)")
    parser.add_argument("--tls-key", help="the certificate's private key (PEM)")
    parser.add_argument("--tls-ca", help="the CA file the local workers trust (with --tls-cert)")
    parser.add_argument("--crash-one-at-job", type=int, default=0, help=argparse.SUPPRESS)  # for the tests
    args = parser.parse_args()

    key = os.environ.get("IPCBUS_AUTHKEY") or secrets.token_hex(32)
    options: dict[str, Any] = {}
    if args.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        options["ssl_context"] = ctx

    jobs = [{"id": i, "limit": 200_000 + 10_000 * i} for i in range(args.jobs)]
    board = JobBoard(jobs)
    expected = args.workers + args.external
    alive = [0]
    alive_lock = threading.Lock()
    procs: list[subprocess.Popen[bytes]] = []
    threads: list[threading.Thread] = []
    started = time.monotonic()

    with ipcbus.listen(
        f"tcp://{args.host}:{args.port}", authkey=key, heartbeat=args.heartbeat, **options
    ) as listener:
        say(f"listening on {listener.address}")
        env = dict(os.environ, IPCBUS_AUTHKEY=key)
        for i in range(args.workers):
            worker_env = dict(env)
            if i == 0 and args.crash_one_at_job:
                worker_env["REMOTE_WORKER_CRASH_AT"] = str(args.crash_one_at_job)
            cmd = [sys.executable, WORKER, listener.address, "--name", f"worker-{i}",
                   "--heartbeat", str(args.heartbeat)]
            if args.tls_ca:
                cmd += ["--tls-ca", args.tls_ca]
            procs.append(subprocess.Popen(cmd, env=worker_env))
        try:
            for _ in range(expected):
                channel = listener.accept(timeout=60)
                with alive_lock:
                    alive[0] += 1
                t = threading.Thread(target=serve, args=(channel, board, alive, alive_lock), daemon=True)
                t.start()
                threads.append(t)
            # Jobs go out once every worker is in, so that all get a share.
            board.start.set()
            while not board.all_done.wait(0.1):
                with alive_lock:
                    if alive[0] == 0:
                        say(f"every worker is gone with {board.total - len(board.results)} job(s) left")
                        return 1
            for t in threads:
                t.join(30)
        finally:
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    assert len(board.results) == board.total
    checksum = sum(board.results[i] for i in range(board.total))
    say(f"{len(board.results)}/{board.total} jobs done in {time.monotonic() - started:.2f} s; "
        f"sum of results = {checksum}")
    for name, count in sorted(board.by_worker.items()):
        say(f"  {name}: {count} job(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
