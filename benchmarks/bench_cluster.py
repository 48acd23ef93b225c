"""The cluster example under load, side by side with gunicorn.

Measures requests per second and latency percentiles with ``wrk`` for 1
worker and N workers, on the hello route (``/``) and the CPU-bound route
(``/fib?n=25``), for:

* ``ipcbus shared``: examples/cluster/server.py --mode shared
* ``ipcbus rr``:     examples/cluster/server.py --mode rr
* ``gunicorn``:      the same routes as a WSGI app (examples/cluster/app.py
                     ``wsgi_app``), gthread workers with one thread each, so
                     each worker, like ours, serves one request at a time and
                     keeps connections alive.

Scaling efficiency is (N-worker rate) / (N x 1-worker rate). wrk runs on the
same machine and takes CPU too, so on a small machine the efficiency is a
lower bound.

    python benchmarks/bench_cluster.py --workers 2 --duration 5

Needs ``wrk`` (Debian/Ubuntu: ``apt-get install wrk``) and gunicorn
(``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "examples" / "cluster"
ROUTES = {"hello": "/", "fib": "/fib?n=25"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(100).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not answer within {timeout} s")


def start_ipcbus(mode: str, workers: int) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [sys.executable, str(CLUSTER / "server.py"), "--workers", str(workers), "--port", "0", "--mode", mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    line = proc.stdout.readline().decode() if ready else ""
    m = re.search(r":(\d+)$", line.strip())
    if not m:
        proc.kill()
        raise RuntimeError(f"server.py printed {line!r}")
    port = int(m.group(1))
    # Every worker must be up before measuring: ask until N pids answered.
    deadline = time.monotonic() + 20
    pids: set[bytes] = set()
    while len(pids) < workers and time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                body = s.recv(1000)
                found = re.search(rb'"pid": (\d+)', body)
                if found:
                    pids.add(found.group(1))
        except OSError:
            time.sleep(0.05)
    return proc, port


def start_gunicorn(workers: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "gunicorn",
            "--workers", str(workers), "--worker-class", "gthread", "--threads", "1",
            "--bind", f"127.0.0.1:{port}", "--pythonpath", str(CLUSTER),
            "--log-level", "warning", "app:wsgi_app",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_ready(port)
    time.sleep(1.0)  # let every worker finish booting
    return proc, port


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def parse_duration_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        return float("nan")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[m.group(2)]
    return float(m.group(1)) * scale


def run_wrk(port: int, path: str, duration: float, connections: int, threads: int) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency", "--timeout", "10s",
            f"http://127.0.0.1:{port}{path}",
        ],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    result: dict[str, float] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    result["rps"] = float(m.group(1)) if m else float("nan")
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.MULTILINE)
        result[f"p{pct}"] = parse_duration_ms(m.group(1)) if m else float("nan")
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = float(non2xx.group(1)) if non2xx else 0.0
    if errors:
        result["errors"] += sum(int(n) for n in re.findall(r"\d+", errors.group(1)))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="N (default: CPU count)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per cell (default 5)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--no-gunicorn", action="store_true")
    opts = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found: install it (Debian/Ubuntu: apt-get install wrk; macOS: brew install wrk)")
        return 2
    contenders = ["ipcbus shared", "ipcbus rr"]
    if not opts.no_gunicorn:
        try:
            import gunicorn  # noqa: F401
        except ImportError:
            print("gunicorn not installed (pip install gunicorn, or pip install -e '.[bench]'); skipping it")
        else:
            contenders.append("gunicorn")
    n = opts.workers
    print(
        f"# {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, wrk -t{opts.wrk_threads} "
        f"-c{opts.connections} -d{opts.duration:g}s, N={n}",
        flush=True,
    )
    header = (
        f"{'server':<15} {'route':<6} {'workers':>7} {'req/s':>10} "
        f"{'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>6}"
    )
    print(header)
    print("-" * len(header), flush=True)
    rates: dict[tuple[str, str, int], float] = {}
    for contender in contenders:
        for workers in (1, n):
            if contender == "gunicorn":
                proc, port = start_gunicorn(workers)
            else:
                proc, port = start_ipcbus(contender.split()[1], workers)
            try:
                for route, path in ROUTES.items():
                    r = run_wrk(port, path, opts.duration, opts.connections, opts.wrk_threads)
                    rates[(contender, route, workers)] = r["rps"]
                    print(
                        f"{contender:<15} {route:<6} {workers:>7} {r['rps']:>10.0f} {r['p50']:>8.2f} "
                        f"{r['p90']:>8.2f} {r['p99']:>8.2f} {r['errors']:>6.0f}",
                        flush=True,
                    )
            finally:
                stop(proc)
    print()
    print(f"scaling efficiency = rate({n} workers) / ({n} x rate(1 worker))")
    for contender in contenders:
        cells = []
        for route in ROUTES:
            one, many = rates[(contender, route, 1)], rates[(contender, route, n)]
            cells.append(f"{route} {many / (n * one):.2f}" if one else f"{route} n/a")
        print(f"  {contender:<15} " + "   ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
