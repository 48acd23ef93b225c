"""Child side of the cross-process streaming tests (tests/test_channel_blocking.py).

Run as ``python core_stream_child.py URL CODEC COUNT [AUTHKEY]``: connect to
URL, wait for the parent's go-ahead, send COUNT messages ``value(codec, i)``
in order, then a summary, then wait for the parent to hang up.
The functions are also used directly by a forked child.
"""

from __future__ import annotations

import sys
from typing import Any

import ipcbus


def value(codec: str, i: int) -> Any:
    """The i-th message of a stream, in a form every codec can carry."""
    if codec == "raw":
        return i.to_bytes(4, "big") + b"x" * (i % 7)
    return i


def index_of(codec: str, data: Any) -> int:
    if codec == "raw":
        return int.from_bytes(data[:4], "big")
    return data


def expect_stream(ch: ipcbus.Channel, codec: str, count: int) -> None:
    """Receive ``count`` messages; raise AssertionError at the first one out of order."""
    for i in range(count):
        msg = ch.recv(timeout=30)
        if msg.data != value(codec, i):
            raise AssertionError(f"message {i}: got {msg.data!r}")


def send_stream(ch: ipcbus.Channel, codec: str, count: int) -> None:
    for i in range(count):
        ch.send(value(codec, i))
    ch.flush(timeout=30)


def serve(ch: ipcbus.Channel, codec: str, count: int) -> None:
    """The child's whole protocol (the parent checks the order)."""
    ch.recv(timeout=30)  # the go-ahead: the parent is listening
    send_stream(ch, codec, count)
    summary = b"done" if codec == "raw" else {"done": count}
    ch.send(summary)
    ch.flush(timeout=30)
    try:
        ch.recv(timeout=30)
    except ipcbus.ChannelClosed:
        pass


def main() -> int:
    url, codec, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    options: dict[str, Any] = {"codec": codec}
    if len(sys.argv) > 4:
        options["authkey"] = sys.argv[4].encode()
    with ipcbus.connect(url, **options) as ch:
        serve(ch, codec, count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
