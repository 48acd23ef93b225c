"""A Python child of a Node parent (fork_python.js): runs the scenarios
named on the command line against the parent, over ipcbus.parent()."""

from __future__ import annotations

import os
import sys

import scenarios

import ipcbus


def main() -> int:
    assert "NODE_CHANNEL_FD" in os.environ, "not started by Node with an IPC channel"
    ch = ipcbus.parent()
    assert ch is not None
    # Taken, and removed from the environment as Node does.
    assert "NODE_CHANNEL_FD" not in os.environ
    assert "NODE_CHANNEL_SERIALIZATION_MODE" not in os.environ
    with ch:
        for name in sys.argv[1:]:
            scenarios.ALL[name](ch)
            print(f"ok {name}", flush=True)
        ch.send({"op": "exit"})
        try:
            ch.recv(timeout=scenarios.TIMEOUT)
        except ipcbus.ChannelClosed:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
