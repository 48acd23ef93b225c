"""The child half of the hello example (blocking API): started by
``parent.py`` through ``ipcbus.fork()``, it answers every message until the
parent disconnects."""

from __future__ import annotations

import os
import sys

import ipcbus


def main() -> int:
    channel = ipcbus.parent()
    if channel is None:
        print("child.py talks to a parent: run examples/hello/parent.py instead", file=sys.stderr)
        return 2
    # The loop ends when the parent disconnects (or dies).
    for msg in channel:
        print(f"CHILD got message: {msg.data}", flush=True)
        channel.send({"foo": "bar", "reply_to": msg.data["hello"], "pid": os.getpid()})
    print("CHILD parent disconnected, exiting", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
