"""Shared fixtures: every test checks that it left no file descriptor open."""

from __future__ import annotations

import gc
import os
import shutil
import sys
import time
from typing import Any

import pytest


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked ``node`` skip where no ``node`` binary is on PATH, and
    fail instead when ``IPCBUS_REQUIRE_NODE=1`` (CI sets it: there, a
    missing node is a broken machine, not a reason to skip)."""
    posix = item.get_closest_marker("posix")
    if posix is not None and sys.platform == "win32":
        why = posix.args[0] if posix.args else "fork/pass_fds, SCM_RIGHTS or Unix sockets"
        pytest.skip(f"POSIX only ({why}); this is Windows")
    if item.get_closest_marker("node") is None:
        return
    if sys.platform == "win32":
        # Node's IPC channel is framed differently on Windows (node-ipc.md
        # §1.3); ipcbus refuses it there, so there is nothing to test.
        pytest.skip("Node interop is POSIX-only (Node frames its Windows IPC pipe differently)")
    if shutil.which("node") is not None:
        return
    if os.environ.get("IPCBUS_REQUIRE_NODE") == "1":
        pytest.fail("IPCBUS_REQUIRE_NODE=1, but there is no `node` on PATH", pytrace=False)
    pytest.skip("needs Node.js: no `node` on PATH")


@pytest.fixture
def speedups() -> Any:
    """The C accelerator module, ipcbus._speedups. Where it was not built
    the test skips, except under ``IPCBUS_REQUIRE_SPEEDUPS=1`` (CI sets it:
    there a compiler is present, so a missing accelerator is a broken
    install), where it fails."""
    try:
        from ipcbus import _speedups
    except ImportError:
        if os.environ.get("IPCBUS_REQUIRE_SPEEDUPS") == "1":
            pytest.fail("IPCBUS_REQUIRE_SPEEDUPS=1, but ipcbus._speedups is not built", pytrace=False)
        pytest.skip("needs the C accelerator ipcbus._speedups (not built here: no C compiler at install?)")
    return _speedups


def fd_count() -> int:
    """Open fds of this process (Linux /proc, else /dev/fd)."""
    path = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    return len(os.listdir(path))


@pytest.fixture(autouse=True)
def no_fd_leak(request: pytest.FixtureRequest):
    """Fail a test that leaves more fds open than it found.

    Mark a test ``@pytest.mark.allow_fd_leak`` only where the count is
    legitimately off (none should need it)."""
    if sys.platform == "win32" or request.node.get_closest_marker("allow_fd_leak"):
        yield
        return
    gc.collect()
    before = fd_count()
    yield
    # Give background closers (trio system tasks, reaped children) a moment.
    for _ in range(50):
        gc.collect()
        after = fd_count()
        if after <= before:
            return
        time.sleep(0.02)
    pytest.fail(f"fd leak: {before} fds open before the test, {after} after")
