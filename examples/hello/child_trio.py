"""The child half of the hello example (trio API): started by
``parent_trio.py``, it answers every message until the parent disconnects."""

from __future__ import annotations

import os
import sys

import trio

import ipcbus.trio


async def main() -> int:
    channel = ipcbus.trio.parent()
    if channel is None:
        print("child_trio.py talks to a parent: run examples/hello/parent_trio.py instead", file=sys.stderr)
        return 2
    async with channel:
        # The loop ends when the parent disconnects (or dies).
        async for msg in channel:
            print(f"CHILD got message: {msg.data}", flush=True)
            await channel.send({"foo": "bar", "reply_to": msg.data["hello"], "pid": os.getpid()})
    print("CHILD parent disconnected, exiting", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(trio.run(main))
