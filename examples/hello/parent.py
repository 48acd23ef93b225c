"""The parent half of the hello example (blocking API).

Run from anywhere: ``python examples/hello/parent.py``. It forks
``child.py`` with a channel, greets it, reads the replies, then
disconnects; the child sees the end of the channel and exits.
(The Python version of the parent.js / sub.js pair in Node's
child_process docs.)
"""

from __future__ import annotations

from pathlib import Path

import ipcbus

CHILD = Path(__file__).with_name("child.py")


def main() -> None:
    # The with block guarantees the child is reaped (or killed) on the way out.
    with ipcbus.fork(CHILD) as child:
        print(f"PARENT forked {CHILD.name} as pid {child.pid}", flush=True)
        for greeting in ({"hello": "world"}, {"hello": "again", "n": 2}):
            print(f"PARENT sends {greeting}", flush=True)
            child.channel.send(greeting)
            reply = child.channel.recv(timeout=10)
            print(f"PARENT got message: {reply.data}", flush=True)
        print("PARENT disconnects", flush=True)
        child.disconnect()
        code = child.wait(timeout=10)
        print(f"PARENT child exited with code {code}", flush=True)


if __name__ == "__main__":
    main()
