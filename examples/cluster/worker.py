"""One cluster worker: an HTTP/1.1 server driven by its master over ipcbus.

Started by ``server.py`` with ``ipcbus.fork``; it is not meant to be run by
hand. One thread runs a selector loop over the listening socket (``shared``
mode), the connections and a wake-up socket; a second thread only reads the
channel to the master and hands the control messages to the loop. Heartbeats
are sent *from the loop*, so a loop that is stuck stops them and the master
notices.

Control messages (all under the claimed ``CLUSTER_`` prefix):

    master -> worker   CLUSTER_start   {mode}  (+ listening socket in shared mode)
                       CLUSTER_conn    + one accepted connection (rr mode)
                       CLUSTER_leave   finish in-flight requests, then exit
    worker -> master   CLUSTER_online  the process is up, the channel works
                       CLUSTER_listening  ready to serve
                       CLUSTER_ack     took the connection of a CLUSTER_conn
                       CLUSTER_heartbeat {conns}
                       CLUSTER_leaving {reason}  about to exit
"""

from __future__ import annotations

import argparse
import os
import queue
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if os.environ.get("CLUSTER_CRASH_AT_START"):
    # Debug switch for the restart-limit path: every worker dies at import.
    raise RuntimeError("CLUSTER_CRASH_AT_START is set: this worker fails at startup")

import h11
from app import parse_target, respond, sleep_seconds, slept

import ipcbus

RECV_SIZE = 65536
# A connection accepted while draining gets this long to send its request
# before it counts as idle; closing it at once would fail a request already
# on its way (the rolling restart promises none fail).
FRESH_GRACE = 2.0
IDLE_TIMEOUT = 60.0


def log(msg: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()) + f".{int(time.time() * 1000) % 1000:03d}"
    # One write per line, so lines from several processes do not interleave.
    sys.stderr.write(f"{stamp} worker[{os.getpid()}] {msg}\n")
    sys.stderr.flush()


class HTTPConnection:
    """One client connection: an h11 state machine and an output buffer."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.h11 = h11.Connection(h11.SERVER)
        self.out = bytearray()
        self.request: h11.Request | None = None
        self.wake_at: float | None = None  # a /sleep response is due then
        self.sleep_for = 0.0
        self.close_after_flush = False
        self.served = 0
        self.accepted_at = self.last_active = time.monotonic()
        self.writing = False

    def idle(self) -> bool:
        """No request in progress and nothing left to write."""
        return (
            self.h11.their_state is h11.IDLE
            and self.h11.our_state is h11.IDLE
            and not self.out
            and self.wake_at is None
        )


class Worker:
    def __init__(self, channel: ipcbus.Channel, heartbeat_interval: float) -> None:
        self.channel = channel
        self.heartbeat_interval = heartbeat_interval
        self.sel = selectors.DefaultSelector()
        self.inbox: queue.SimpleQueue[ipcbus.Message | None] = queue.SimpleQueue()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, self._on_wake)
        self.listener: socket.socket | None = None
        self.conns: dict[int, HTTPConnection] = {}
        self.draining = False
        self.master_gone = False
        self.terminated = False
        channel.on_internal("CLUSTER_", self._on_control)

    # ------------------------------------------------------------ the channel

    def _on_control(self, msg: ipcbus.Message) -> None:
        # Runs in the reader thread: only hand over to the loop.
        self.inbox.put(msg)
        self._wake()

    def _wake(self) -> None:
        try:
            self.wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or we are closing

    def _read_channel(self) -> None:
        try:
            while True:
                self.channel.recv()  # application messages: none expected, ignored
        except (ipcbus.IPCError, OSError):
            pass
        self.inbox.put(None)
        self._wake()

    def _on_wake(self, _mask: int) -> None:
        try:
            while self.wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _send(self, data: dict[str, Any]) -> None:
        try:
            self.channel.send(data)
        except (ipcbus.IPCError, OSError):
            self.master_gone = True

    def _handle_control(self, msg: ipcbus.Message | None) -> None:
        if msg is None:
            log("the master closed the channel; exiting")
            self.master_gone = True
            return
        cmd = msg.data.get("cmd") if isinstance(msg.data, dict) else None
        if cmd == "CLUSTER_start":
            if msg.handle is not None:
                if self.draining:
                    msg.handle.close()
                else:
                    self.listener = msg.handle
                    self.listener.setblocking(False)
                    self.sel.register(self.listener, selectors.EVENT_READ, self._on_accept)
            self._send({"cmd": "CLUSTER_listening"})
        elif cmd == "CLUSTER_conn":
            if msg.handle is None:
                return
            self._adopt(msg.handle)
            self._send({"cmd": "CLUSTER_ack"})
        elif cmd == "CLUSTER_leave":
            self._start_draining("asked by the master")
        else:
            for h in msg.handles:
                h.close()

    # -------------------------------------------------------------- the loop

    def _on_sigterm(self, _signum: int, _frame: Any) -> None:
        # set_wakeup_fd wakes the selector; the loop starts draining.
        self.terminated = True

    def run(self) -> None:
        signal.set_wakeup_fd(self.wake_w.fileno())
        signal.signal(signal.SIGTERM, self._on_sigterm)
        threading.Thread(target=self._read_channel, name="channel-reader", daemon=True).start()
        self._send({"cmd": "CLUSTER_online", "pid": os.getpid()})
        next_beat = time.monotonic() + self.heartbeat_interval
        next_sweep = time.monotonic() + 1.0
        while not self.master_gone:
            now = time.monotonic()
            deadline = min(next_beat, next_sweep)
            for c in self.conns.values():
                if c.wake_at is not None and c.wake_at < deadline:
                    deadline = c.wake_at
            for key, mask in self.sel.select(max(0.0, deadline - now)):
                key.data(mask)
            if self.terminated:
                self._start_draining("SIGTERM")
            while True:
                try:
                    msg = self.inbox.get_nowait()
                except queue.Empty:
                    break
                self._handle_control(msg)
            now = time.monotonic()
            for c in [c for c in self.conns.values() if c.wake_at is not None and c.wake_at <= now]:
                c.wake_at = None
                self._send_response(c, *slept(c.sleep_for))
            if now >= next_beat:
                next_beat = now + self.heartbeat_interval
                self._send({"cmd": "CLUSTER_heartbeat", "conns": len(self.conns)})
            if now >= next_sweep or self.draining:
                next_sweep = now + (0.2 if self.draining else 1.0)
                self._sweep(now)
                if self.draining and not self.conns:
                    break
        self.close()

    def _sweep(self, now: float) -> None:
        for c in list(self.conns.values()):
            if not c.idle():
                continue
            if (
                self.draining and (c.served or now - c.accepted_at > FRESH_GRACE)
            ) or now - c.last_active > IDLE_TIMEOUT:
                self._close(c)

    def _start_draining(self, reason: str) -> None:
        if self.draining:
            return
        self.draining = True
        self._send({"cmd": "CLUSTER_leaving", "reason": reason})
        log(f"leaving ({reason}): stop accepting, {len(self.conns)} connection(s) to finish")
        if self.listener is not None:
            self.sel.unregister(self.listener)
            self.listener.close()
            self.listener = None

    def close(self) -> None:
        for c in list(self.conns.values()):
            self._close(c)
        if self.listener is not None:
            self.sel.unregister(self.listener)
            self.listener.close()
            self.listener = None
        self.sel.close()
        signal.set_wakeup_fd(-1)
        self.wake_r.close()
        self.wake_w.close()

    # ---------------------------------------------------------- connections

    def _on_accept(self, _mask: int) -> None:
        assert self.listener is not None
        for _ in range(16):  # bounded, so one worker does not hog a burst
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log(f"accept failed: {exc}")
                return
            self._adopt(sock)

    def _adopt(self, sock: socket.socket) -> None:
        c = HTTPConnection(sock)
        self.conns[sock.fileno()] = c
        self.sel.register(sock, selectors.EVENT_READ, lambda mask, c=c: self._on_conn(c, mask))

    def _close(self, c: HTTPConnection) -> None:
        fd = c.sock.fileno()
        if fd >= 0 and self.conns.get(fd) is c:
            del self.conns[fd]
            self.sel.unregister(c.sock)
        c.sock.close()

    def _on_conn(self, c: HTTPConnection, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(c)
            if c.sock.fileno() < 0:
                return
        if mask & selectors.EVENT_READ:
            try:
                data = c.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(c)
                return
            c.last_active = time.monotonic()
            if not data and c.wake_at is not None:
                self._close(c)  # the client left while its /sleep was pending
                return
            try:
                c.h11.receive_data(data)
            except RuntimeError:
                self._close(c)  # data after the end of the stream
                return
            self._process(c)

    def _process(self, c: HTTPConnection) -> None:
        while c.wake_at is None and c.sock.fileno() >= 0:
            try:
                ev = c.h11.next_event()
            except h11.RemoteProtocolError as exc:
                if c.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    body = f"bad request: {exc}\n".encode()
                    c.close_after_flush = True
                    self._raw_response(c, exc.error_status_hint, body)
                else:
                    self._close(c)
                return
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return
            if isinstance(ev, h11.ConnectionClosed):
                self._close(c)
                return
            if isinstance(ev, h11.Request):
                c.request = ev
            elif isinstance(ev, h11.EndOfMessage):
                self._dispatch(c)
            # Data (a request body) is read and ignored.

    def _dispatch(self, c: HTTPConnection) -> None:
        assert c.request is not None
        path, query = parse_target(c.request.target.decode("latin-1"))
        if path == "/sleep":
            s = sleep_seconds(query)
            if s is not None:
                c.sleep_for = s
                c.wake_at = time.monotonic() + s
                log(f"/sleep: answering in {s:g} s")
                return
            self._raw_response(c, 400, b"s must be a number of seconds between 0 and 30\n")
        elif path == "/block":
            log("/block: blocking the loop forever (heartbeats stop)")
            while True:
                time.sleep(3600)
        elif path == "/crash":
            raise RuntimeError("crash requested by /crash")
        else:
            self._send_response(c, *respond(path, query))

    def _raw_response(self, c: HTTPConnection, status: int, body: bytes) -> None:
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        self._send_response(c, status, headers, body)

    def _send_response(self, c: HTTPConnection, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        if self.draining or c.close_after_flush:
            headers = [*headers, (b"connection", b"close")]
        try:
            c.out += c.h11.send(h11.Response(status_code=status, headers=headers))
            c.out += c.h11.send(h11.Data(data=body))
            c.out += c.h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            self._close(c)
            return
        c.served += 1
        c.request = None
        if c.h11.our_state is h11.DONE and c.h11.their_state is h11.DONE:
            c.h11.start_next_cycle()
        else:
            c.close_after_flush = True
        self._flush(c)
        if c.sock.fileno() >= 0 and not c.close_after_flush:
            self._process(c)  # a pipelined request may already be buffered

    def _flush(self, c: HTTPConnection) -> None:
        if c.out:
            try:
                n = c.sock.send(c.out)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self._close(c)
                return
            del c.out[:n]
        want_write = bool(c.out)
        if want_write != c.writing:
            c.writing = want_write
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)
            self.sel.modify(c.sock, events, lambda mask, c=c: self._on_conn(c, mask))
        if not c.out and c.close_after_flush:
            self._close(c)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--heartbeat-interval", type=float, default=1.0)
    opts = parser.parse_args(argv)
    # The master owns shutdown: Ctrl-C in a terminal reaches the whole
    # process group, and the master turns it into an orderly leave.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    channel = ipcbus.parent()
    if channel is None:
        print("worker.py is started by server.py (through ipcbus.fork)", file=sys.stderr)
        return 2
    worker = Worker(channel, opts.heartbeat_interval)
    try:
        worker.run()
    except BaseException as exc:
        # An uncaught exception ends this worker only: say so, so the master
        # starts the replacement at once, then die with the traceback.
        traceback.print_exc()
        worker._send({"cmd": "CLUSTER_leaving", "reason": "exception", "error": repr(exc)})
        channel.close(timeout=1.0)
        return 1
    channel.close(timeout=1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
