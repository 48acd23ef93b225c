"""The remote workers example (examples/remote_workers): a master on TCP
loopback, worker processes connecting to it with the shared key."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "remote_workers"


def _count_primes():
    spec = importlib.util.spec_from_file_location("remote_worker", EXAMPLE / "worker.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.count_primes


def _run_master(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, IPCBUS_AUTHKEY="example-test-key")
    return subprocess.run(
        [sys.executable, str(EXAMPLE / "master.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
    )


def _expected_sum(jobs: int) -> int:
    count_primes = _count_primes()
    return sum(count_primes(200_000 + 10_000 * i) for i in range(jobs))


def test_master_distributes_jobs_to_three_workers():
    proc = _run_master("--workers", "3", "--jobs", "30")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert re.fullmatch(r"listening on tcp://127\.0\.0\.1:\d+", lines[0]), lines[0]
    assert len([ln for ln in lines if ln.endswith(" connected")]) == 3, proc.stdout
    m = re.search(r"^30/30 jobs done in [\d.]+ s; sum of results = (\d+)$", proc.stdout, re.M)
    assert m, proc.stdout
    assert int(m.group(1)) == _expected_sum(30)
    per_worker = [int(n) for n in re.findall(r"^  worker-\d \(pid \d+\): (\d+) job\(s\)$", proc.stdout, re.M)]
    assert sum(per_worker) == 30


def test_job_of_a_crashed_worker_is_done_by_another():
    proc = _run_master("--workers", "2", "--jobs", "12", "--crash-one-at-job", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^worker worker-0 \(pid \d+\) lost \(\w+\); job \d+ goes back to the queue$",
                     proc.stdout, re.M), proc.stdout
    m = re.search(r"^12/12 jobs done in [\d.]+ s; sum of results = (\d+)$", proc.stdout, re.M)
    assert m, proc.stdout
    assert int(m.group(1)) == _expected_sum(12)
