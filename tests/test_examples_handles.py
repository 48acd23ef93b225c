"""The handles example (examples/handles/): two children serve HTTP on one
listening socket that the parent bound and passed to them."""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PARENT = os.path.join(HERE, "..", "examples", "handles", "parent.py")
T = 30.0

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX SCM_RIGHTS")

ANSWER = re.compile(r"handled by child, pid is (\d+)")


def _get(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=T)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200
        return resp.read().decode()
    finally:
        conn.close()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0): it has exited all the same.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")
    except OSError:
        return True


def test_both_children_answer_and_sigterm_cleans_up() -> None:
    proc = subprocess.Popen(
        [sys.executable, PARENT, "--serve", "--requests", "1000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = ""
        deadline = time.monotonic() + T
        while "serve http://" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
        m = re.search(r"children \[(\d+), (\d+)\] serve http://127\.0\.0\.1:(\d+)/", line)
        assert m, line
        children = {int(m.group(1)), int(m.group(2))}
        port = int(m.group(3))
        seen: set[int] = set()
        for _ in range(200):
            body = _get(port)
            got = ANSWER.fullmatch(body.strip())
            assert got, body
            seen.add(int(got.group(1)))
            if seen == children:
                break
        assert seen == children, f"answers only from {seen}, children are {children}"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=T)
        assert proc.returncode == 0, err
        assert "requests handled" in out
        for pid in children:
            assert _gone(pid), f"child {pid} outlived the parent"
        with pytest.raises(OSError):
            _get(port)  # nobody holds the port any more
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_stops_by_itself_after_its_requests() -> None:
    out = subprocess.run(
        [sys.executable, PARENT, "--requests", "8"], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    answers = ANSWER.findall(out.stdout)
    assert len(answers) == 8, out.stdout
    assert "8 requests handled" in out.stdout
    assert "children exited [0, 0]" in out.stdout
