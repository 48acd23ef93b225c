"""A multi-core HTTP server: one master, N supervised worker processes.

    python examples/cluster/server.py --workers 4 --port 8000 --mode shared

The master binds one TCP port and forks the workers (``worker.py``) with
``ipcbus.fork``. Connections reach the workers in one of two ways:

``shared``  the master sends the listening socket to every worker and they
            all accept on it (the kernel spreads the connections);
``rr``      the master accepts, and hands each connection to the next free
            worker (a worker is free again once it acknowledged the last
            one, as Node's SCHED_RR does).

Supervision rides on internal messages under the ``CLUSTER_`` prefix
(see worker.py): a worker that exits or crashes is replaced; more than
``--max-restarts`` restarts within ``--restart-window`` seconds ends the
master with a non-zero status instead of a restart storm; a worker silent
for ``--heartbeat-timeout`` seconds is killed and replaced. SIGTERM/SIGINT
shut down gracefully (stop accepting, let in-flight requests finish for up
to ``--shutdown-timeout`` seconds, then kill); SIGHUP restarts the workers
one by one, each replacement listening before its predecessor leaves.
SIGUSR1 writes the stack of each of the master's threads to stderr, for a
master that seems stuck.

The first line on stdout is ``listening on HOST:PORT`` (useful with
``--port 0``); lifecycle events are logged to stderr, one line each.
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import os
import queue
import signal
import socket
import sys
import threading
import time
from typing import Any

import ipcbus

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
# A worker whose channel closed gets this long to exit before it is killed.
EXIT_GRACE = 5.0


def log(msg: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()) + f".{int(time.time() * 1000) % 1000:03d}"
    # One write per line, so lines from several processes do not interleave.
    sys.stderr.write(f"{stamp} master[{os.getpid()}] {msg}\n")
    sys.stderr.flush()


class WorkerRecord:
    """The master's view of one worker process."""

    def __init__(self, slot: int, child: Any) -> None:
        self.slot = slot
        self.child = child
        self.pid: int = child.pid
        self.channel: ipcbus.Channel = child.channel
        self.state = "starting"  # -> online -> listening -> leaving -> exited
        self.last_seen = time.monotonic()
        self.inflight = False  # rr: a connection sent, not yet acknowledged
        self.retiring = False  # the master asked it to leave: no replacement
        self.replaced = False  # its replacement is already started
        self.killed = False
        self.predecessor: WorkerRecord | None = None  # rolling restart: leaves when we listen

    def __str__(self) -> str:
        return f"worker {self.slot} (pid {self.pid})"


class Master:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.mode: str = opts.mode
        # queue.Queue, not SimpleQueue: on CPython 3.10-3.12, SimpleQueue.get
        # with a timeout blocks for good once a signal handler (or the wait
        # for the GIL after it) outlasts that timeout, and the loop below
        # would then never see SIGHUP or SIGTERM.
        self.events: queue.Queue[tuple[str, WorkerRecord, Any]] = queue.Queue()
        self.workers: list[WorkerRecord] = []
        self.cond = threading.Condition()  # guards the rr dispatch state of the records
        self.rr_next = 0
        self.restarts: collections.deque[float] = collections.deque()
        self.signals: list[int] = []
        self.stopping = False
        self.stop_deadline = 0.0
        self.rolling: list[WorkerRecord] = []  # still to be replaced by the rolling restart
        self.exit_code = 0
        self.sock = socket.create_server((opts.host, opts.port), backlog=1024, reuse_port=False)
        self.acceptor: threading.Thread | None = None

    # ------------------------------------------------------------- workers

    def spawn(self, slot: int, predecessor: WorkerRecord | None = None) -> WorkerRecord:
        interval = min(1.0, self.opts.heartbeat_timeout / 4)
        child = ipcbus.fork(WORKER, args=["--heartbeat-interval", str(interval)])
        rec = WorkerRecord(slot, child)
        rec.predecessor = predecessor
        rec.channel.on_internal("CLUSTER_", lambda msg, rec=rec: self._on_control(rec, msg))
        with self.cond:
            self.workers.append(rec)
        threading.Thread(target=self._read_worker, args=(rec,), name=f"reader-{rec.pid}", daemon=True).start()
        log(f"{rec} forked")
        return rec

    def _on_control(self, rec: WorkerRecord, msg: ipcbus.Message) -> None:
        # Runs in rec's reader thread. Acks are handled here so the acceptor
        # can hand out the next connection without a trip through the loop.
        for h in msg.handles:
            h.close()  # workers never send handles
        rec.last_seen = time.monotonic()
        cmd = msg.data.get("cmd") if isinstance(msg.data, dict) else None
        if cmd == "CLUSTER_ack":
            with self.cond:
                rec.inflight = False
                self.cond.notify_all()
        elif cmd != "CLUSTER_heartbeat":
            self.events.put(("msg", rec, msg.data))

    def _read_worker(self, rec: WorkerRecord) -> None:
        try:
            while True:
                rec.channel.recv()  # internal messages go to _on_control; nothing else is expected
        except (ipcbus.IPCError, OSError):
            pass
        rec.channel.close()
        try:
            rc = rec.child.wait(timeout=EXIT_GRACE)
        except Exception:
            rec.child.kill()
            rc = rec.child.wait(timeout=EXIT_GRACE)
        self.events.put(("exit", rec, rc))

    def _handle_message(self, rec: WorkerRecord, data: dict[str, Any]) -> None:
        cmd = data.get("cmd")
        if cmd == "CLUSTER_online":
            rec.state = "online"
            log(f"{rec} online")
            if self.stopping:
                self._retire(rec)
                return
            try:
                if self.mode == "shared":
                    rec.channel.send({"cmd": "CLUSTER_start", "mode": self.mode}, handle=self.sock)
                else:
                    rec.channel.send({"cmd": "CLUSTER_start", "mode": self.mode})
            except (ipcbus.IPCError, OSError) as exc:
                log(f"{rec}: could not start it: {exc}")
        elif cmd == "CLUSTER_listening":
            with self.cond:
                rec.state = "listening"
                self.cond.notify_all()
            log(f"{rec} listening")
            old, rec.predecessor = rec.predecessor, None
            if old is not None and old.state != "exited":
                self._retire(old)
            self._continue_rolling()
        elif cmd == "CLUSTER_leaving":
            reason = data.get("reason", "?")
            error = data.get("error")
            log(f"{rec} leaving ({reason}{': ' + error if error else ''})")
            with self.cond:
                rec.state = "leaving"
            if not (rec.retiring or rec.replaced or self.stopping):
                # Not asked to go: start its replacement before it exits.
                rec.replaced = True
                self._restart(rec)
        else:
            log(f"{rec}: unknown control message {cmd!r}")

    def _handle_exit(self, rec: WorkerRecord, rc: int | None) -> None:
        with self.cond:
            rec.state = "exited"
            if rec in self.workers:
                self.workers.remove(rec)
            self.cond.notify_all()
        if rc is not None and rc < 0:
            how = f"killed by signal {-rc} ({signal.Signals(-rc).name})"
        else:
            how = f"exited with code {rc}"
        log(f"{rec} {how}")
        if rec in self.rolling:
            self.rolling.remove(rec)
        if not (rec.retiring or rec.replaced or self.stopping):
            rec.replaced = True
            self._restart(rec)

    def _restart(self, rec: WorkerRecord) -> None:
        now = time.monotonic()
        window = self.opts.restart_window
        while self.restarts and now - self.restarts[0] > window:
            self.restarts.popleft()
        self.restarts.append(now)
        if len(self.restarts) > self.opts.max_restarts:
            log(
                f"giving up: {len(self.restarts)} restarts within {window:g} s "
                f"(limit --max-restarts {self.opts.max_restarts} --restart-window {window:g}); "
                "shutting down"
            )
            self.exit_code = 1
            self._begin_shutdown(self.opts.shutdown_timeout)
            return
        log(f"restarting {rec} ({len(self.restarts)} restart(s) in the last {window:g} s)")
        self.spawn(rec.slot, predecessor=rec.predecessor)

    def _retire(self, rec: WorkerRecord) -> None:
        """Ask ``rec`` to finish its requests and exit (no replacement)."""
        with self.cond:
            rec.retiring = True
            if rec.state != "exited":
                rec.state = "leaving"
            try:
                rec.channel.send({"cmd": "CLUSTER_leave"})
            except (ipcbus.IPCError, OSError):
                pass  # already gone: its exit event follows

    # ---------------------------------------------------------- rr acceptor

    def _accept_loop(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stopping:
            try:
                conn, _addr = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            # A failed send leaves the connection ours: offer it to the next
            # worker. (A channel torn down while the send was under way may
            # have closed it: then the client sees a reset.)
            while conn.fileno() >= 0:
                with self.cond:
                    # The hand-over happens under the lock that _retire takes,
                    # so a worker never gets a connection after its leave.
                    rec = self._next_free()
                    if rec is None:
                        conn.close()
                        break
                    try:
                        rec.channel.send({"cmd": "CLUSTER_conn"}, handle=conn, keep_open=False)
                        break
                    except (ipcbus.IPCError, OSError) as exc:
                        log(f"{rec}: could not hand over a connection: {exc}")
                        rec.inflight = False
                        if rec.state == "listening":
                            rec.state = "leaving"
        self.sock.close()

    def _next_free(self) -> WorkerRecord | None:
        # Called with self.cond held.
        while not self.stopping:
            n = len(self.workers)
            for i in range(n):
                rec = self.workers[(self.rr_next + i) % n]
                if rec.state == "listening" and not rec.retiring and not rec.inflight:
                    self.rr_next = (self.rr_next + i + 1) % n
                    rec.inflight = True
                    return rec
            self.cond.wait(0.2)
        return None

    # ----------------------------------------------------------- lifecycle

    def _begin_shutdown(self, timeout: float) -> None:
        if self.stopping:
            return
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.stop_deadline = time.monotonic() + timeout
        if self.mode == "shared":
            self.sock.close()
        # rr: the acceptor sees `stopping` and closes the socket itself.
        self.rolling.clear()
        for rec in list(self.workers):
            self._retire(rec)

    def _begin_rolling(self) -> None:
        if self.rolling or self.stopping:
            log("SIGHUP ignored: a rolling restart or shutdown is in progress")
            return
        self.rolling = [rec for rec in self.workers if not (rec.retiring or rec.replaced)]
        log(f"rolling restart of {len(self.rolling)} worker(s)")
        self._continue_rolling()

    def _continue_rolling(self) -> None:
        if self.stopping or not self.rolling:
            return
        if any(rec.predecessor is not None for rec in self.workers):
            return  # a replacement is still starting
        old = self.rolling.pop(0)
        old.replaced = True
        self.spawn(old.slot, predecessor=old)
        if not self.rolling:
            log("rolling restart: last replacement started")

    def _check_heartbeats(self) -> None:
        now = time.monotonic()
        for rec in list(self.workers):
            silent = now - rec.last_seen
            if not rec.killed and silent > self.opts.heartbeat_timeout:
                rec.killed = True
                log(f"{rec} sent no heartbeat for {silent:.1f} s (--heartbeat-timeout); killing it")
                rec.child.kill()

    def run(self) -> int:
        host, port = self.sock.getsockname()[:2]
        print(f"listening on {host}:{port}", flush=True)
        log(f"listening on {host}:{port}, mode {self.mode}, {self.opts.workers} worker(s)")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda signum, _frame: self.signals.append(signum))
        # Written by faulthandler's C handler, so the dump comes even when
        # no Python code can run in the master.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        for slot in range(1, self.opts.workers + 1):
            self.spawn(slot)
        if self.mode == "rr":
            self.acceptor = threading.Thread(target=self._accept_loop, name="acceptor", daemon=True)
            self.acceptor.start()
        while True:
            while self.signals:
                signum = self.signals.pop(0)
                if signum == signal.SIGHUP:
                    log("SIGHUP: rolling restart")
                    self._begin_rolling()
                else:
                    log(f"{signal.Signals(signum).name}: graceful shutdown")
                    self._begin_shutdown(self.opts.shutdown_timeout)
            try:
                kind, rec, payload = self.events.get(timeout=0.1)
            except queue.Empty:
                pass
            else:
                if kind == "msg":
                    self._handle_message(rec, payload)
                else:
                    self._handle_exit(rec, payload)
            if self.stopping:
                if not self.workers:
                    break
                if time.monotonic() > self.stop_deadline:
                    for rec in list(self.workers):
                        if not rec.killed:
                            rec.killed = True
                            log(f"{rec} still busy after --shutdown-timeout; killing it")
                            rec.child.kill()
            self._check_heartbeats()
        if self.acceptor is not None:
            self.acceptor.join(timeout=2.0)
        self.sock.close()
        log(f"all workers exited; exiting with status {self.exit_code}")
        return self.exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--mode", choices=["shared", "rr"], default="shared")
    parser.add_argument("--max-restarts", type=int, default=10, metavar="R")
    parser.add_argument("--restart-window", type=float, default=60.0, metavar="T")
    parser.add_argument("--heartbeat-timeout", type=float, default=10.0)
    parser.add_argument("--shutdown-timeout", type=float, default=10.0)
    opts = parser.parse_args(argv)
    if opts.workers < 1:
        parser.error("--workers must be at least 1")
    return Master(opts).run()


if __name__ == "__main__":
    sys.exit(main())
