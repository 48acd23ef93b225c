"""The parent half of the hello example (trio API).

``python examples/hello/parent_trio.py``: the same exchange as
``parent.py``, with the child's lifetime tied to an ``async with`` block.
"""

from __future__ import annotations

from pathlib import Path

import trio

import ipcbus.trio

CHILD = Path(__file__).with_name("child_trio.py")


async def main() -> None:
    async with ipcbus.trio.fork(CHILD) as child:
        print(f"PARENT forked {CHILD.name} as pid {child.pid}", flush=True)
        for greeting in ({"hello": "world"}, {"hello": "again", "n": 2}):
            print(f"PARENT sends {greeting}", flush=True)
            await child.channel.send(greeting)
            with trio.fail_after(10):
                reply = await child.channel.recv()
            print(f"PARENT got message: {reply.data}", flush=True)
        print("PARENT disconnects", flush=True)
        await child.disconnect()
        with trio.fail_after(10):
            code = await child.wait()
        print(f"PARENT child exited with code {code}", flush=True)


if __name__ == "__main__":
    trio.run(main)
