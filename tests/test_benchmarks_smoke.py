"""Smoke tests of benchmarks/bench_messages.py (end to end with tiny counts)
and benchmarks/hotpath.py: they run and print their tables. No timing is
asserted; the figures of a smoke run mean nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.posix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "bench_messages.py")

if not sys.platform.startswith("linux"):
    pytest.skip("bench_messages.py needs Linux (os.fork, sched_setaffinity)", allow_module_level=True)


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, BENCH, *args],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


def test_bench_messages_quick_prints_every_table() -> None:
    proc = run_bench("--quick", "--n-scale", "0.01")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "ipcbus message benchmark" in out
    assert "machine: nproc=" in out
    for title in ("== one-way streaming:", "== ping-pong:", "pinned to one CPU", "unpinned ==", "== bulk:"):
        assert title in out, f"missing {title!r} in:\n{out}"
    assert "msg/s" in out and "median RTT us" in out and "MB/s" in out
    # Every contender either ran or says why it was skipped; none failed.
    assert "FAILED" not in out, out
    rows = [line for line in out.splitlines() if line.startswith("ipcbus blocking ")]
    assert len(rows) == 4, out
    assert "== targets" in out
    assert "streaming: ipcbus blocking vs raw loop" in out


def test_bench_messages_subset_and_profile() -> None:
    proc = run_bench("--quick", "--n-scale", "0.01", "--contenders", "ipcbus,raw-packer", "--workloads", "stream")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    labels = ("ipcbus blocking", "ipcbus trio", "raw socketpair", "multiprocessing", "pyzmq", "node")
    rows = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith(labels)]
    assert rows == ["blocking", "socketpair+Packer"], proc.stdout
    assert "== ping-pong" not in proc.stdout

    prof = run_bench("--profile", "--n-scale", "0.01", "--profile-top", "5")
    assert prof.returncode == 0, prof.stdout + prof.stderr
    assert "sender (child)" in prof.stdout
    assert "receiver (parent)" in prof.stdout
    assert "send" in prof.stdout and "recv" in prof.stdout


def test_bench_messages_rejects_unknown_contender() -> None:
    proc = run_bench("--quick", "--contenders", "nosuch")
    assert proc.returncode == 2
    assert "unknown contenders" in proc.stderr


def test_hotpath_counts_every_path() -> None:
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "hotpath.py")],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    rows = {line[:28].strip(): float(line[28:]) for line in out.splitlines()[1:]}
    assert set(rows) == {
        "send, lone (a reply)", "send, in a burst", "recv, round trip",
        "send, handle= in a burst", "recv, handle=",
    }
    assert all(n > 0 for n in rows.values())
