"""examples/hello: the parent/child pair runs and prints the expected exchange
(blocking and trio versions), started the way the README says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "examples" / "hello"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX fd inheritance (pass_fds)")

EXPECTED = """\
PARENT forked {child} as pid PID
PARENT sends {{'hello': 'world'}}
CHILD got message: {{'hello': 'world'}}
PARENT got message: {{'foo': 'bar', 'reply_to': 'world', 'pid': PID}}
PARENT sends {{'hello': 'again', 'n': 2}}
CHILD got message: {{'hello': 'again', 'n': 2}}
PARENT got message: {{'foo': 'bar', 'reply_to': 'again', 'pid': PID}}
PARENT disconnects
CHILD parent disconnected, exiting
PARENT child exited with code 0
"""


@pytest.mark.parametrize(("parent", "child"), [("parent.py", "child.py"), ("parent_trio.py", "child_trio.py")])
def test_hello_exchange(parent: str, child: str) -> None:
    proc = subprocess.run(
        [sys.executable, f"examples/hello/{parent}"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    pids = set(re.findall(r"pid'?:? (\d+)", proc.stdout))
    assert len(pids) == 1, proc.stdout  # one child, the one that answered
    assert proc.stdout.replace(pids.pop(), "PID") == EXPECTED.format(child=child)


@pytest.mark.parametrize("child", ["child.py", "child_trio.py"])
def test_hello_child_alone_explains_itself(child: str) -> None:
    proc = subprocess.run([sys.executable, str(HELLO / child)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "run examples/hello/parent" in proc.stderr
