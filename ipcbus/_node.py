"""Node.js processes on either end of a channel: the ``node`` channel protocol.

A Node parent announces the channel to its child with ``NODE_CHANNEL_FD``
(the fd number of an inherited AF_UNIX socketpair end) and
``NODE_CHANNEL_SERIALIZATION_MODE`` (``json`` or ``advanced``); a Node child
reads them, deletes both from its environment and speaks Node's IPC protocol
on that fd (node-ipc.md §1). :class:`NodeProtocol` does the same for
ipcbus, so that

- ``ipcbus.spawn(["node", "child.js"], ipc=True, protocol="node")`` gives a
  Node child its ``process.send()`` / ``'message'`` channel, and
- ``ipcbus.parent()`` in a Python process started by Node
  (``child_process.fork(script, {execPath: "python3"})``, or ``spawn`` with
  an ``'ipc'`` stdio entry) returns a channel to the Node parent.

Only the json serialization is supported; ``advanced`` (V8's structured
clone) is refused when the channel is taken, with an error that says so.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from ._errors import TransportError
from ._frontend import make_core
from ._process import ChannelProtocol, InheritedChannel
from .codecs import Codec
from .transports._sockets import SocketStream

__all__ = ["NODE_CHANNEL_FD_ENV", "NODE_CHANNEL_MODE_ENV", "NodeProtocol"]

NODE_CHANNEL_FD_ENV = "NODE_CHANNEL_FD"
NODE_CHANNEL_MODE_ENV = "NODE_CHANNEL_SERIALIZATION_MODE"

# What InheritedChannel.codec holds for a channel announced in advanced mode:
# it is refused when the channel is opened, so that parent() fails (and keeps
# failing) with a clear error, after the variables were removed as Node does.
_ADVANCED = "node-advanced"


def _advanced_error() -> TransportError:
    return TransportError(
        f"{NODE_CHANNEL_MODE_ENV}=advanced: Node's advanced (V8) serialization is not "
        "supported by ipcbus; start this child with serialization: 'json' (Node's default)"
    )


class NodeProtocol(ChannelProtocol):
    """Node.js's child_process IPC channel (json serialization)."""

    name = "node"
    env_vars = (NODE_CHANNEL_FD_ENV, NODE_CHANNEL_MODE_ENV)

    def child_env(self, fd: int, codec: str) -> dict[str, str]:
        return {NODE_CHANNEL_FD_ENV: str(fd), NODE_CHANNEL_MODE_ENV: "json"}

    def from_environ(self, environ: Mapping[str, str]) -> InheritedChannel | None:
        value = environ.get(NODE_CHANNEL_FD_ENV)
        if value is None:
            return None
        try:
            fd = int(value)
        except ValueError:
            raise TransportError(f"{NODE_CHANNEL_FD_ENV}={value!r} is not an fd number") from None
        if fd < 0:
            raise TransportError(f"{NODE_CHANNEL_FD_ENV}={value!r} is not an fd number")
        mode = environ.get(NODE_CHANNEL_MODE_ENV) or "json"
        if mode == "json":
            return InheritedChannel(fd, self.name, None)
        if mode == "advanced":
            return InheritedChannel(fd, self.name, _ADVANCED)
        raise TransportError(f"{NODE_CHANNEL_MODE_ENV}={mode!r}: Node knows 'json' and 'advanced'")

    def check_options(self, codec: str | Codec | None, options: dict[str, Any]) -> None:
        make_core(
            protocol="node",
            codec=codec,
            trusted=True,
            can_carry_handles=True,
            role="peer",
            **{k: v for k, v in options.items() if k not in ("handshake_timeout", "protocol")},
        )

    @staticmethod
    def _stream_name(end: str) -> str:
        return "socketpair" if end == "parent" else "fd"

    def open_channel(
        self, sock: socket.socket, *, end: str, codec: str | Codec | None, options: dict[str, Any]
    ) -> Any:
        from ._channel import Channel

        if codec == _ADVANCED:
            sock.close()
            raise _advanced_error()
        stream = SocketStream(sock, name=self._stream_name(end), trusted=True)
        return Channel._open(stream, "peer", **_node_options(codec, options))

    def open_async_channel(
        self, sock: socket.socket, *, end: str, codec: str | Codec | None, options: dict[str, Any]
    ) -> Any:
        from ._trio_channel import AsyncChannel
        from .transports._sockets import AsyncSocketStream

        if codec == _ADVANCED:
            sock.close()
            raise _advanced_error()
        try:
            stream = AsyncSocketStream(sock, name=self._stream_name(end), trusted=True)
        except BaseException:
            sock.close()
            raise
        return AsyncChannel._open(stream, "peer", **_node_options(codec, options))


def _node_options(codec: str | Codec | None, options: dict[str, Any]) -> dict[str, Any]:
    result = {k: v for k, v in options.items() if k != "protocol"}
    result["protocol"] = "node"
    if codec is not None:
        result["codec"] = codec
    return result
