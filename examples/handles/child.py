"""The child half of the handles example: it receives the listening socket
from ``parent.py`` and answers HTTP requests on it, next to its sibling.

Both children accept on the same kernel socket (the parent bound it once);
each connection goes to whichever child accepts it first. Each request is
answered ``handled by child, pid is N`` and reported to the parent, which
counts them. The child stops when the parent says so or goes away.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

import ipcbus


def watch_parent(channel: ipcbus.Channel, server: socket.socket, stop: threading.Event) -> None:
    """Stop serving when the parent says "stop", closes the channel or dies."""
    try:
        for msg in channel:
            if msg.data.get("cmd") == "stop":
                break
    except ipcbus.IPCError:
        pass
    stop.set()
    # Wakes the accept() below (on Linux it then fails with EINVAL). The
    # socket is shared with the sibling, which is being stopped as well.
    try:
        server.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def answer(conn: socket.socket) -> None:
    conn.settimeout(5)
    request = b""
    while b"\r\n\r\n" not in request and len(request) < 65536:
        chunk = conn.recv(4096)
        if not chunk:
            return
        request += chunk
    body = f"handled by child, pid is {os.getpid()}\n".encode()
    head = (
        "HTTP/1.1 200 OK\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    conn.sendall(head.encode() + body)


def main() -> int:
    channel = ipcbus.parent()
    if channel is None:
        print("child.py is started by examples/handles/parent.py", file=sys.stderr)
        return 2
    msg = channel.recv()
    server = msg.handle
    if not isinstance(server, socket.socket):
        print(f"child {os.getpid()}: expected a socket, got {server!r}", file=sys.stderr)
        return 1
    # A blocking accept(): the kernel queues the children that wait in it
    # and hands each new connection to the next in line, so both serve.
    # (No settimeout here: O_NONBLOCK lives in the open file the children
    # share, so one child's timeout would change the other's socket.)
    stop = threading.Event()
    threading.Thread(target=watch_parent, args=(channel, server, stop), daemon=True).start()
    print(f"child {os.getpid()}: serving on {server.getsockname()}", flush=True)
    channel.send({"ready": os.getpid()})
    with server, channel:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue  # shut down by watch_parent (the loop ends), or a failed accept
            with conn:
                try:
                    answer(conn)
                except OSError:
                    continue  # a client that went away is not our problem
            try:
                channel.send({"handled": os.getpid()})
            except ipcbus.IPCError:
                break  # the parent is gone
    return 0


if __name__ == "__main__":
    sys.exit(main())
