"""Python <-> Node over ipcbus's node protocol, side by side with Node <-> Node.

Node's own child_process IPC (json serialization) against ipcbus speaking
the same protocol to a real Node process, on the messages of node-ipc.md §8:
``{t:'d', i, s:'hello'}`` streamed (~30 bytes of JSON each), and
``{t:'ping', i}`` / ``{t:'pong', i}`` round trips.

Rows (each run in fresh processes; the Node side is always
``benchmarks/node/interop.js child``):

* ``Node -> Node``: a Node parent and its forked Node child, both ways;
* ``ipcbus -> Node``: a Python parent (``ipcbus.spawn(["node", ...],
  ipc=True, protocol="node")``) streaming with ``channel.send`` in a loop;
  timed until Node reports it has parsed the last message;
* ``Node -> ipcbus``: the Node child streaming with ``process.send`` in a
  tight loop, the Python parent in a ``channel.recv()`` loop;
* ping-pong: Node parent <-> Node child, and ipcbus parent <-> Node child.

Contenders alternate round-robin over ``--rounds`` rounds; the tables show
medians with min and max. The target (issue 5): ipcbus -> Node streaming at
least 2x Node -> Node streaming (the faster Node direction), in the same run.
Node's receive path takes about 220-290k msg/s when fed in big writes, its
own sender about 100k (one write per message): ipcbus batches its writes.

    python benchmarks/bench_node.py                # 5 rounds
    python benchmarks/bench_node.py --quick        # 1 round, counts x 0.1
    python benchmarks/bench_node.py --pin          # both processes on CPU 0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PEER = ROOT / "node" / "interop.js"

# (table, workload, row label, contender)
ROWS = [
    ("stream", "to-child", "Node -> Node (parent to child)", "node"),
    ("stream", "from-child", "Node -> Node (child to parent)", "node"),
    ("stream", "to-child", "ipcbus -> Node", "ipcbus"),
    ("stream", "from-child", "Node -> ipcbus", "ipcbus"),
    ("pingpong", "pingpong", "Node <-> Node", "node"),
    ("pingpong", "pingpong", "ipcbus <-> Node", "ipcbus"),
]


def run_ipcbus(workload: str, n: int) -> float:
    """One timed run with this process as the ipcbus parent of a Node child."""
    sys.path.insert(0, str(ROOT.parent))
    import ipcbus

    with ipcbus.spawn(["node", str(PEER), "child"], ipc=True, protocol="node") as child:
        ch = child.channel
        assert ch.recv(timeout=30).data == "ready"
        send, recv = ch.send, ch.recv
        if workload == "to-child":
            t0 = time.perf_counter()
            send({"op": "sink", "n": n})
            assert recv(timeout=30).data == {"sinking": n}
            for i in range(n):
                send({"t": "d", "i": i, "s": "hello"})
            assert recv(timeout=60).data == {"done": n}
        elif workload == "from-child":
            t0 = time.perf_counter()
            send({"op": "stream", "n": n})
            for _ in range(n):
                msg = recv(timeout=30)
            assert msg.data == {"t": "d", "i": n - 1, "s": "hello"}
        else:
            t0 = time.perf_counter()
            for i in range(n):
                send({"t": "ping", "i": i})
                assert recv(timeout=30).data["i"] == i
        seconds = time.perf_counter() - t0
        ch.close()
    return seconds


def run_node(workload: str, n: int) -> float:
    out = subprocess.run(
        ["node", str(PEER), "parent", workload, str(n)], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    return json.loads(out.splitlines()[0])["seconds"]


def one_run(contender: str, workload: str, n: int, pin: bool) -> float:
    cmd = [sys.executable, __file__, "--_run", contender, workload, str(n)]
    if pin:
        cmd.append("--pin")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{contender} {workload} failed:\n{out.stderr}")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stream", type=int, default=200_000, help="messages per streaming run")
    parser.add_argument("--pingpong", type=int, default=20_000, help="round trips per ping-pong run")
    parser.add_argument("--quick", action="store_true", help="1 round, counts x 0.1")
    parser.add_argument("--pin", action="store_true", help="pin both processes to CPU 0")
    parser.add_argument("--_run", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._run:
        contender, workload, n = args._run[0], args._run[1], int(args._run[2])
        if args.pin:
            os.sched_setaffinity(0, {0})  # children inherit it
        seconds = (run_ipcbus if contender == "ipcbus" else run_node)(workload, n)
        print(seconds)
        return

    if shutil.which("node") is None:
        sys.exit("bench_node.py needs node (20+) on PATH")
    rounds = 1 if args.quick else args.rounds
    scale = 0.1 if args.quick else 1.0
    counts = {"stream": int(args.stream * scale), "pingpong": int(args.pingpong * scale)}
    version = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    print(f"node {version}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"{rounds} rounds, {'pinned to CPU 0' if args.pin else 'unpinned'}")

    rates: dict[str, list[float]] = {label: [] for _, _, label, _ in ROWS}
    for r in range(rounds):
        for table, workload, label, contender in ROWS:
            n = counts[table]
            seconds = one_run(contender, workload, n, args.pin)
            rates[label].append(n / seconds)
            print(f"  round {r + 1}: {label:32s} {n / seconds:>10,.0f} /s", flush=True)

    print()
    for table, unit in (("stream", "msg/s"), ("pingpong", "RTT/s")):
        n = counts[table]
        print(f"{'streaming' if table == 'stream' else 'ping-pong'}, {n:,} "
              f"{'messages' if table == 'stream' else 'round trips'} ({unit}, median [min - max])")
        for t, _, label, _ in ROWS:
            if t == table:
                values = rates[label]
                print(f"  {label:32s} {statistics.median(values):>10,.0f}  "
                      f"[{min(values):,.0f} - {max(values):,.0f}]")
        print()

    node_best = max(statistics.median(rates["Node -> Node (parent to child)"]),
                    statistics.median(rates["Node -> Node (child to parent)"]))
    ours = statistics.median(rates["ipcbus -> Node"])
    ratio = ours / node_best
    verdict = "PASS" if ratio >= 2.0 else "FAIL"
    print(f"target: ipcbus -> Node >= 2x Node -> Node (faster direction): {ratio:.2f}x  {verdict}")


if __name__ == "__main__":
    main()
