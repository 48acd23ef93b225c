"""Instructions per message on each side of a stream, counted by valgrind:
a deterministic cost measure for comparing two versions of the code.

On a shared VM, side-by-side timings of the streaming benchmark swing by
±20% between runs, more than most changes to a hot path; the number of
instructions a side executes per message does not move unless the code does.
It is not a speed (a cache miss or a system call costs more than an
instruction; valgrind counts each byte a ``rep movsb`` copies), and it
leaves out what only the pair does (wake-ups, the flusher thread, the two
processes sharing the machine): use it beside ``bench_messages.py``, not
instead of it.

    python benchmarks/bench_instructions.py                    # ipcbus and the raw loop
    python benchmarks/bench_instructions.py --baseline /tmp/before

Each figure is (instructions with N messages - instructions with none) / N,
for the process that sends or receives the 200k-message benchmark's small
dicts:

- recv: the receiver, fed by a child that writes a recorded byte stream (for
  ipcbus: what a Channel sent, batch frames and all); ``recv()`` per
  message, and the raw loop's ``next()`` over a ``msgpack.Unpacker``.
- send: the sender, into a child that drains the socket; ``send()`` per
  message, and the raw loop's reused ``Packer`` with a ``sendall`` per 256.
  ipcbus tells a burst from lone sends by the clock, which valgrind slows
  down fifty-fold: the harness gives it a clock that barely moves, and
  keeps the flusher thread out (its visits are not counted).

Needs valgrind (``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)  # (a measured run puts its own checkout before this)

# The streaming workload's message and raw loop, as bench_messages.py runs them.
from bench_messages import RAW_BATCH, RAW_RECV_SMALL, raw_messages, small  # noqa: E402

N = 20_000


# ------------------------------------------------------------------ harness


def recorded_stream(n: int) -> bytes:
    """What an ipcbus Channel writes for ``n`` small dicts sent in bursts of
    1024 (its hello, then batch frames), read off the peer's socket. The
    bursts are ``send_many`` calls: the same frames whatever the clock."""
    import ipcbus

    a, b = ipcbus.pair()
    sock = b.stream.socket
    chunks: list[bytes] = []

    def read() -> None:
        try:
            while data := sock.recv(1 << 20):
                chunks.append(data)
        except ConnectionResetError:
            pass  # (a closed with b's hello unread: everything before it arrived)

    reader = threading.Thread(target=read)
    reader.start()
    for start in range(0, n, 1024):
        a.send_many([small(i) for i in range(start, min(n, start + 1024))])
    a.close()  # flushes, then EOF on b's socket
    reader.join()
    b.close()
    stream = b"".join(chunks)
    sock, pid = feeder(stream)
    with ipcbus.connect(f"fd://{sock.detach()}") as check:  # the recording is whole: n messages, then EOF
        got = sum(1 for _ in check)
    os.waitpid(pid, 0)
    if got != n:
        raise SystemExit(f"recorded {got} messages, not {n}")
    return stream


def raw_stream(n: int) -> bytes:
    import msgpack

    return b"".join(msgpack.packb(small(i)) for i in range(n))


def feeder(data: bytes) -> tuple[socket.socket, int]:
    """A socket whose peer, a child process, writes ``data`` then exits."""
    mine, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        mine.close()
        try:
            theirs.sendall(data)
        except OSError:
            pass
        os._exit(0)
    theirs.close()
    return mine, pid


def drain(peer: Any, mine: socket.socket) -> int:
    """A child process that reads everything ``peer`` (a socket, or a
    channel whose socket it reads raw) receives, until ``mine``, the other
    end, is closed."""
    sock = peer if isinstance(peer, socket.socket) else peer.stream.socket
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        mine.close()  # (or EOF never comes)
        try:
            while sock.recv(1 << 20):
                pass
        except OSError:
            pass
        os._exit(0)
    sock.close()  # (a channel's: the child reads its copy)
    return pid


def run_side(side: str, contender: str, n: int, stream_file: str) -> None:
    """One measured process: ``n`` messages (0 for the count without them);
    a receiver reads the recorded stream in ``stream_file``."""
    import msgpack

    if side == "recv":
        with open(stream_file, "rb") as f:
            sock, pid = feeder(f.read())
    if side == "recv" and contender == "ipcbus":
        import ipcbus

        ch = ipcbus.connect(f"fd://{sock.detach()}")  # (the recording starts with a hello)
        recv = ch.recv
        for _ in range(n):
            recv()
        ch.close()
    elif side == "recv":
        it = raw_messages(sock, RAW_RECV_SMALL)
        for _ in range(n):
            next(it)
        sock.close()
    elif contender == "ipcbus":
        import ipcbus
        import ipcbus._channel as channel_module
        import ipcbus._flusher as flusher_module

        clock = [0.0]

        def slow_clock() -> float:
            clock[0] += 1e-8
            return clock[0]

        channel_module._monotonic = slow_clock
        channel_module.HOLD_WINDOW = 1e6
        flusher_module.DELAY = 1e6
        ch, peer = ipcbus.pair()
        pid = drain(peer, ch.stream.socket)
        send = ch.send
        for i in range(n):
            send(small(i))
        ch.close()
    else:
        sock, theirs = socket.socketpair()
        pid = drain(theirs, sock)
        packer = msgpack.Packer(autoreset=False)
        pack, sendall = packer.pack, sock.sendall
        for start in range(0, n, RAW_BATCH):
            for i in range(start, min(n, start + RAW_BATCH)):
                pack(small(i))
            sendall(packer.getbuffer())
            packer.reset()
        sock.close()
    os.waitpid(pid, 0)


# ------------------------------------------------------------------ driver


def count(side: str, contender: str, n: int, stream_file: str, path: str, workdir: str) -> int:
    """Instructions the measuring process executed (not its children)."""
    out = os.path.join(workdir, f"{side}-{contender}-{n}-{abs(hash(path))}")
    cmd = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p",
        sys.executable, os.path.abspath(__file__), "--_side", side, contender, str(n), stream_file, path,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    pid = proc.stdout.split()[-1]
    with open(f"{out}.{pid}") as f:
        for line in f:
            if line.startswith("summary:"):
                return int(line.split()[1])
    raise SystemExit(f"no summary in {out}.{pid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=N, help=f"messages per measured run (default {N})")
    parser.add_argument("--baseline", metavar="DIR", help="also count another checkout's ipcbus (built in place)")
    parser.add_argument("--_side", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._side:
        side, contender, n, stream_file, path = args._side
        sys.path.insert(0, path)
        run_side(side, contender, int(n), stream_file)
        print(os.getpid())
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind (apt-get install valgrind)")
    contenders = [("ipcbus", "ipcbus", REPO), ("raw", "raw loop", REPO)]
    if args.baseline:
        contenders.insert(1, ("ipcbus", "ipcbus, baseline", os.path.abspath(args.baseline)))
    print(f"instructions per message (valgrind callgrind), {args.n} messages; python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory(prefix="ipcbus-instr-") as workdir:
        streams = {}
        for contender, make in (("ipcbus", recorded_stream), ("raw", raw_stream)):
            streams[contender] = os.path.join(workdir, f"{contender}.stream")
            with open(streams[contender], "wb") as f:
                f.write(make(args.n))
        for side in ("recv", "send"):
            rows = []
            for contender, label, path in contenders:
                with_n = count(side, contender, args.n, streams[contender], path, workdir)
                without = count(side, contender, 0, streams[contender], path, workdir)
                per = (with_n - without) / args.n
                rows.append((label, per))
            raw = rows[-1][1]
            print(f"== {side} ==")
            for label, per in rows:
                print(f"{label:20s} {per:9,.0f}   x raw {per / raw:5.2f}")


if __name__ == "__main__":
    main()
