"""Child processes, trio API: ``fork``, ``spawn``, ``exec``, ``exec_file``,
``parent``, ``wait_children`` and ``wait_any``.

The same rules as the blocking :mod:`ipcbus._process` (how the channel is
announced, scrubbed environments, ``exec`` killing the whole process
group), with the child's lifetime tied to an ``async with`` block::

    async with ipcbus.trio.fork("worker.py") as child:
        await child.channel.send("hi")
        print(await child.channel.recv())

On leaving the block the channel closes and the child gets a grace period
to exit; cancellation skips that wait and goes straight to SIGTERM, then
SIGKILL after the grace period. Either way the child is reaped.
"""

from __future__ import annotations

import math
import os
import signal as _signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import trio

from ._errors import ExecTimeout
from ._process import (
    _DRAIN_AFTER_KILL,
    DEFAULT_GRACE,
    ChildBase,
    ExecResult,
    Redirect,
    StrPath,
    _argv,
    _codec_name,
    _fork_argv,
    _scrubbed_env,
    _take_parent,
    get_channel_protocol,
)
from .codecs import Codec
from .transports._fd import socketpair_sockets

__all__ = [
    "AsyncChildProcess",
    "exec",
    "exec_file",
    "fork",
    "parent",
    "spawn",
    "wait_any",
    "wait_children",
]


def parent(**options: Any) -> Any:
    """In a child started by ``fork`` or ``spawn(..., ipc=True)``: the trio
    channel (``AsyncChannel``) to the parent, or None in a process started
    without one. Call it inside ``trio.run``.

    Same contract as :func:`ipcbus.parent`: the first call removes the
    variables from ``os.environ``, later calls return the same channel, and
    ``options`` count on the first call only. RuntimeError if the blocking
    ``ipcbus.parent()`` already took the channel.
    """
    return _take_parent("trio", options)


class AsyncChildProcess(ChildBase):
    """A child process started by ``ipcbus.trio.fork`` / ``spawn``.

    ``channel`` is an ``AsyncChannel`` to the child (None without
    ``ipc=True``). As with :class:`ipcbus.ChildProcess`, ChannelClosed from
    ``channel.recv()`` only says the channel ended; ``await wait()``,
    ``poll()`` and ``returncode`` say whether and how the process exited
    (``exit_code``, ``signal``; ``returncode`` is ``-N`` for signal N).
    ``stdin``/``stdout``/``stderr`` are trio streams when started with
    ``subprocess.PIPE``.

    ``async with child:`` (or ``async with ipcbus.trio.fork(...) as
    child:``) ties the child's lifetime to the block; see :meth:`aclose`.
    """

    def __init__(self, process: trio.Process, channel: Any, args: Sequence[str]) -> None:
        super().__init__(process, channel, args)
        self._process = process

    @property
    def stdin(self) -> trio.abc.SendStream | None:
        """The child's stdin (a trio stream) when started with ``stdin=PIPE``."""
        return self._process.stdin

    @property
    def stdout(self) -> trio.abc.ReceiveStream | None:
        """The child's stdout (a trio stream) when started with ``stdout=PIPE``."""
        return self._process.stdout

    @property
    def stderr(self) -> trio.abc.ReceiveStream | None:
        """The child's stderr (a trio stream) when started with ``stderr=PIPE``."""
        return self._process.stderr

    async def wait(self) -> int:
        """Wait for the child to exit; return ``returncode``. Bound it with
        ``trio.move_on_after`` / ``fail_after``."""
        return await self._process.wait()

    async def disconnect(self) -> None:
        """Close the channel (after flushing it): the child's ``recv`` raises
        ChannelClosed and its loop over ``parent()`` ends."""
        if self._channel is not None:
            with trio.move_on_after(DEFAULT_GRACE):
                await self._channel.aclose()
            if not self._channel.closed:  # pragma: no cover - aclose closes even when cut short
                self._channel._teardown()

    async def aclose(self, grace: float = DEFAULT_GRACE, *, polite: bool = True) -> int:
        """End the child and reap it; returns ``returncode``.

        Closes the channel and stdin; with ``polite`` (the default) waits
        ``grace`` seconds for the child to leave on its own; then SIGTERM,
        ``grace`` seconds, SIGKILL. Runs shielded from cancellation, so the
        child is never left behind; at most about ``2 * grace`` seconds.
        """
        with trio.CancelScope(shield=True):
            try:
                if self._channel is not None:
                    with trio.move_on_after(grace):
                        await self._channel.aclose()
                    if not self._channel.closed:  # pragma: no cover
                        self._channel._teardown()
                if self._process.stdin is not None:
                    await self._process.stdin.aclose()
                steps: list[int | None] = [None] if polite else []
                steps += [_signal.SIGTERM, _signal.SIGKILL]
                for sig in steps:
                    if sig is not None:
                        self._process.send_signal(sig)
                    if sig == _signal.SIGKILL:
                        break
                    with trio.move_on_after(grace):
                        await self._process.wait()
                    if self._process.poll() is not None:
                        break
                return await self._process.wait()
            finally:
                for stream in (self._process.stdout, self._process.stderr):
                    if stream is not None:
                        await stream.aclose()

    async def __aenter__(self) -> AsyncChildProcess:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose(polite=not isinstance(exc, trio.Cancelled))

    def __repr__(self) -> str:
        rc = self._process.returncode
        state = "running" if rc is None else f"returncode={rc}"
        return f"<ipcbus.trio.AsyncChildProcess pid={self.pid} {state}>"


class ChildOpener(Awaitable[AsyncChildProcess]):
    """What :func:`fork` and :func:`spawn` return: await it for the child
    (``child = await ipcbus.trio.spawn(...)``; then ``async with child:`` or
    ``await child.aclose()``), or use it directly as ``async with
    ipcbus.trio.fork(...) as child:``."""

    def __init__(self, start: Callable[[], Awaitable[AsyncChildProcess]]) -> None:
        self._start = start
        self._child: AsyncChildProcess | None = None

    def __await__(self) -> Generator[Any, None, AsyncChildProcess]:
        return self._start().__await__()

    async def __aenter__(self) -> AsyncChildProcess:
        self._child = await self._start()
        return self._child

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._child is not None
        await self._child.__aexit__(exc_type, exc, tb)


async def _open(
    args: list[str],
    *,
    ipc: bool,
    codec: str | Codec | None,
    protocol: str,
    env: Mapping[str, str] | None,
    popen_options: dict[str, Any],
    pass_fds: Sequence[int],
    options: dict[str, Any],
) -> AsyncChildProcess:
    child_env = _scrubbed_env(env)
    if not ipc:
        if protocol != "native":
            raise ValueError(f"protocol={protocol!r} needs ipc=True")
        if options:
            raise TypeError(f"channel options without ipc=True: {', '.join(sorted(options))}")
        process = await trio.lowlevel.open_process(args, env=child_env, pass_fds=tuple(pass_fds), **popen_options)
        return AsyncChildProcess(process, None, args)
    proto = get_channel_protocol(protocol)
    proto.check_options(codec, options)
    ours, theirs = socketpair_sockets()
    try:
        child_env.update(proto.child_env(theirs.fileno(), _codec_name(codec)))
        # Open before the child starts, as the blocking spawn does: a child
        # that dies at once is a ChannelClosed on recv, not an error here.
        channel = proto.open_async_channel(ours, end="parent", codec=codec, options=options)
    except BaseException:
        ours.close()
        theirs.close()
        raise
    try:
        process = await trio.lowlevel.open_process(
            args, env=child_env, pass_fds=(theirs.fileno(), *pass_fds), **popen_options
        )
    except BaseException:
        theirs.close()
        channel._teardown()
        raise
    # Only the child may hold this end now: its exit must read as EOF here.
    theirs.close()
    return AsyncChildProcess(process, channel, args)


def spawn(
    argv: Sequence[StrPath],
    *,
    ipc: bool = False,
    codec: str | Codec | None = None,
    protocol: str = "native",
    env: Mapping[str, str] | None = None,
    cwd: StrPath | None = None,
    stdin: Redirect = None,
    stdout: Redirect = None,
    stderr: Redirect = None,
    pass_fds: Sequence[int] = (),
    start_new_session: bool = False,
    **options: Any,
) -> ChildOpener:
    """Start ``argv`` (trio API); arguments as for :func:`ipcbus.spawn`.

    ``child = await ipcbus.trio.spawn([...], ipc=True)``, or ``async with
    ipcbus.trio.spawn([...]) as child:`` to tie its lifetime to the block.
    """
    args = _argv(argv)
    popen_options = {
        "cwd": cwd,
        "stdin": stdin,
        "stdout": stdout,
        "stderr": stderr,
        "start_new_session": start_new_session,
    }

    def start() -> Awaitable[AsyncChildProcess]:
        return _open(
            args,
            ipc=ipc,
            codec=codec,
            protocol=protocol,
            env=env,
            popen_options=popen_options,
            pass_fds=pass_fds,
            options=dict(options),
        )

    return ChildOpener(start)


def fork(
    target: StrPath | None = None,
    args: Sequence[StrPath] = (),
    *,
    module: str | None = None,
    codec: str | Codec = "msgpack",
    python: StrPath = sys.executable,
    python_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: StrPath | None = None,
    stdin: Redirect = None,
    stdout: Redirect = None,
    stderr: Redirect = None,
    pass_fds: Sequence[int] = (),
    start_new_session: bool = False,
    **options: Any,
) -> ChildOpener:
    """Start a Python child with a channel to it (trio API); arguments as
    for :func:`ipcbus.fork` (a script path, or ``module="pkg.worker"``).

    ``async with ipcbus.trio.fork("worker.py") as child:`` or ``child =
    await ipcbus.trio.fork(...)``. The child takes its end with
    ``ipcbus.parent()`` or ``ipcbus.trio.parent()``.
    """
    return spawn(
        _fork_argv(target, args, module, python, python_args),
        ipc=True,
        codec=codec,
        env=env,
        cwd=cwd,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        pass_fds=pass_fds,
        start_new_session=start_new_session,
        **options,
    )


# ------------------------------------------------------------------- waiting


async def wait_children(children: Iterable[AsyncChildProcess]) -> list[AsyncChildProcess]:
    """Wait until at least one of ``children`` has exited; return every one
    that has, in the order given (an empty list for no children). Bound it
    with ``trio.move_on_after``. Each child is waited on through its own
    pidfd on Linux (trio's ``Process.wait``), never ``waitpid(-1)``."""
    children = list(children)
    done = [c for c in children if c.poll() is not None]
    if done or not children:
        await trio.lowlevel.checkpoint()
        return done

    async with trio.open_nursery() as nursery:

        async def watch(child: AsyncChildProcess) -> None:
            await child.wait()
            nursery.cancel_scope.cancel()

        for child in children:
            nursery.start_soon(watch, child)
    return [c for c in children if c.poll() is not None]


async def wait_any(children: Iterable[AsyncChildProcess]) -> AsyncIterator[AsyncChildProcess]:
    """Yield each of ``children`` as it exits, until all have:
    ``async for child in ipcbus.trio.wait_any(workers): ...``."""
    pending = list(children)
    while pending:
        for child in await wait_children(pending):
            pending.remove(child)
            yield child


# ------------------------------------------------------------ exec / exec_file


async def _read_all(stream: trio.abc.ReceiveStream, buf: bytearray, eof: list[trio.abc.ReceiveStream]) -> None:
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            eof.append(stream)
            return
        buf += chunk


async def _feed(stream: trio.abc.SendStream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the command stopped reading its input
    finally:
        await stream.aclose()


def _kill_group(process: trio.Process) -> None:
    # Its own session: the pid is the process group (see _process._kill_group).
    try:
        os.killpg(process.pid, _signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def _run(
    argv: list[str],
    cmd: str | list[str],
    *,
    timeout: float | None,
    input: bytes | str | None,
    text: bool,
    encoding: str,
    errors: str,
    env: Mapping[str, str] | None,
    cwd: StrPath | None,
) -> ExecResult:
    if isinstance(input, str):
        input = input.encode(encoding, errors)
    process = await trio.lowlevel.open_process(
        argv,
        stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_scrubbed_env(env),
        cwd=cwd,
        start_new_session=True,
    )
    assert process.stdout is not None and process.stderr is not None
    out, err = bytearray(), bytearray()
    eof: list[trio.abc.ReceiveStream] = []
    pipes = ((process.stdout, out), (process.stderr, err))
    try:
        with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
            async with trio.open_nursery() as nursery:
                for stream, buf in pipes:
                    nursery.start_soon(_read_all, stream, buf, eof)
                if input is not None:
                    assert process.stdin is not None
                    nursery.start_soon(_feed, process.stdin, input)
                nursery.start_soon(process.wait)
        timed_out = scope.cancelled_caught
        if timed_out:
            _kill_group(process)
            # What the killed group wrote before dying is still in the pipes.
            with trio.move_on_after(_DRAIN_AFTER_KILL):
                async with trio.open_nursery() as nursery:
                    for stream, buf in pipes:
                        if stream not in eof:
                            nursery.start_soon(_read_all, stream, buf, eof)
    except BaseException:
        _kill_group(process)
        raise
    finally:
        with trio.CancelScope(shield=True):
            await process.wait()
            for s in (process.stdin, process.stdout, process.stderr):
                if s is not None:
                    await s.aclose()

    def convert(data: bytearray) -> bytes | str:
        return data.decode(encoding, errors) if text else bytes(data)

    if timed_out:
        assert timeout is not None
        raise ExecTimeout(cmd, timeout, convert(out), convert(err), process.returncode)
    return ExecResult(cmd, process.returncode, convert(out), convert(err))


async def exec(
    command: str,
    *,
    timeout: float | None = None,
    input: bytes | str | None = None,
    text: bool = False,
    encoding: str = "utf-8",
    errors: str = "replace",
    env: Mapping[str, str] | None = None,
    cwd: StrPath | None = None,
    shell: StrPath = "/bin/sh",
) -> ExecResult:
    """Run a shell command line to completion (trio API); as
    :func:`ipcbus.exec`. Past ``timeout`` the process group is killed and
    ExecTimeout carries the partial output; cancellation kills it too."""
    if not isinstance(command, str):
        raise TypeError("exec() takes a command line string; use exec_file() for an argv")
    return await _run(
        [os.fspath(shell), "-c", command],
        command,
        timeout=timeout,
        input=input,
        text=text,
        encoding=encoding,
        errors=errors,
        env=env,
        cwd=cwd,
    )


async def exec_file(
    path: StrPath,
    args: Sequence[StrPath] = (),
    *,
    timeout: float | None = None,
    input: bytes | str | None = None,
    text: bool = False,
    encoding: str = "utf-8",
    errors: str = "replace",
    env: Mapping[str, str] | None = None,
    cwd: StrPath | None = None,
) -> ExecResult:
    """Run a program (no shell) to completion (trio API); as
    :func:`ipcbus.exec_file`."""
    argv = _argv([path, *args])
    return await _run(
        argv,
        argv,
        timeout=timeout,
        input=input,
        text=text,
        encoding=encoding,
        errors=errors,
        env=env,
        cwd=cwd,
    )
