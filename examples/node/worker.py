"""Python worker of examples/node/master.py: gets the shared listening
socket from the master (ipcbus.parent()), answers every HTTP request with
its runtime name and pid, and reports each one to the master."""

from __future__ import annotations

import os
import socket
import threading

import ipcbus

RESPONSE = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n{body}"


def serve_one(conn: socket.socket) -> str:
    with conn:
        conn.settimeout(5)
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = conn.recv(4096)
            if not chunk:
                return ""
            request += chunk
        path = request.split(b" ", 2)[1].decode("latin-1") if request.count(b" ") >= 2 else "/"
        body = f"python {os.getpid()}\n"
        conn.sendall(RESPONSE.format(n=len(body), body=body).encode())
        return path


def main() -> None:
    channel = ipcbus.parent()
    if channel is None:
        raise SystemExit("worker.py is started by master.py")
    with channel:
        msg = channel.recv()
        server = msg.handle
        # The Node worker holds the same listening socket, and libuv made it
        # non-blocking for both of us: wait with a timeout (poll underneath),
        # never setblocking(True), which would block Node's accept() too.
        server.settimeout(0.2)
        stop = threading.Event()

        def watch() -> None:
            try:
                for m in channel:
                    if isinstance(m.data, dict) and m.data.get("op") == "stop":
                        break
            except ipcbus.IPCError:
                pass
            stop.set()

        threading.Thread(target=watch, daemon=True).start()
        channel.send({"ready": "python", "pid": os.getpid()})
        with server:
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except (TimeoutError, BlockingIOError):
                    continue  # nothing came, or the Node worker took it
                try:
                    path = serve_one(conn)
                except OSError:
                    continue
                if not path:
                    continue
                try:
                    channel.send({"served": path, "runtime": "python", "pid": os.getpid()})
                except ipcbus.IPCError:
                    # The master closed the channel while we answered (it is
                    # stopping): the report is moot, and we leave.
                    break


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
