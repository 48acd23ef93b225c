"""The README's demo command runs from start to finish."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the cluster demo needs POSIX fork and fd passing")


def test_demo_serves_replaces_and_shuts_down() -> None:
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "demo.py"), "--requests", "40"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "requests spread over the workers: 40 requests" in out
    assert "after the replacement" in out
    assert "restarting worker" in out
    assert "master exited with status 0" in out
