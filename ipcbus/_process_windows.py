"""``fork()`` / ``spawn(ipc=True)`` / ``parent()`` on Windows.

The child's channel is one end of a named pipe pair, made inheritable and
passed to the child alone (``STARTUPINFO`` handle list), its handle value
named in ``IPCBUS_CHANNEL_FD`` as an fd number is on POSIX (multiprocessing
passes its pipe the same way). The parent's end knows the child's pid from
``Popen``, the child's knows its parent's from ``os.getppid()``, so handles
can be sent both ways before the hellos are read.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from typing import Any

from ._errors import TransportError

__all__ = ["open_parent_channel", "spawn_with_pipe"]


def _refuse_node(protocol_name: str) -> None:
    if protocol_name != "native":
        raise TransportError(
            f"protocol={protocol_name!r} is not supported on Windows: Node.js frames its "
            "Windows IPC channel differently (node-ipc.md §1.3); use the native protocol"
        )


def spawn_with_pipe(
    args: list[str],
    protocol: Any,
    codec: Any,
    options: dict[str, Any],
    popen_kwargs: dict[str, Any],
    pass_fds: Sequence[int],
) -> Any:
    """The ``ipc=True`` part of ``spawn`` on Windows: a pipe pair, the
    child's end inherited, the parent's end a trusted channel."""
    import _winapi

    from ._channel import Channel
    from ._process import ChildProcess, _codec_name
    from .transports._pipe import PipeStream, pipe_pair

    _refuse_node(protocol.name)
    if pass_fds:
        raise ValueError("pass_fds is not supported on Windows (send handles over the channel)")
    ours, theirs = pipe_pair(inheritable_second=True)
    try:
        stream = PipeStream(ours, name="pipe-child", trusted=True, server_end=True)
    except BaseException:
        _winapi.CloseHandle(ours)
        _winapi.CloseHandle(theirs)
        raise
    kwargs = dict(popen_kwargs)
    kwargs.pop("start_new_session", None)
    kwargs["env"] = dict(kwargs["env"] or os.environ)
    kwargs["env"].update(protocol.child_env(theirs, _codec_name(codec)))
    # Only this handle is inherited (plus the std handles Popen adds).
    kwargs["startupinfo"] = subprocess.STARTUPINFO(lpAttributeList={"handle_list": [theirs]})
    kwargs["close_fds"] = True
    try:
        channel = Channel._open(stream, "peer", codec=codec or "msgpack", **options)
    except BaseException:
        _winapi.CloseHandle(theirs)
        raise
    try:
        popen = subprocess.Popen(args, **kwargs)
    except BaseException:
        channel.close()
        raise
    finally:
        # Only the child may hold this end now: its exit must read as EOF here.
        _winapi.CloseHandle(theirs)
    stream._peer_pid = popen.pid
    return ChildProcess(popen, channel, args)


def open_parent_channel(spec: Any, kind: str, options: dict[str, Any]) -> Any:
    """The child's side: the channel over the inherited pipe handle."""
    import _winapi

    from .transports._pipe import AsyncPipeStream, PipeStream

    _refuse_node(spec.protocol)
    handle = spec.fd
    try:
        # Not inherited further by accident: a non-inheritable duplicate.
        proc = _winapi.GetCurrentProcess()
        own = _winapi.DuplicateHandle(proc, handle, proc, 0, False, _winapi.DUPLICATE_SAME_ACCESS)
    except OSError as exc:
        raise TransportError(f"IPCBUS_CHANNEL_FD={handle} is not an open handle: {exc}") from exc
    _winapi.CloseHandle(handle)
    codec = spec.codec or "msgpack"
    ppid = os.getppid()
    if kind == "trio":
        from ._trio_channel import AsyncChannel

        astream = AsyncPipeStream(own, name="pipe-parent", trusted=True, peer_pid=ppid)
        return AsyncChannel._open(astream, "peer", codec=codec, **options)
    from ._channel import Channel

    stream = PipeStream(own, name="pipe-parent", trusted=True, peer_pid=ppid)
    return Channel._open(stream, "peer", codec=codec, **options)
