"""Child processes, blocking API: ``fork``, ``spawn``, ``exec``, ``exec_file``,
``parent`` and ``wait_children``.

How a child finds its channel (the rule Node uses with ``NODE_CHANNEL_FD``):
the parent makes a socketpair, passes one end to the child with
``Popen(pass_fds=...)`` (never ``os.fork`` of the interpreter), and tells the
child the fd number and the codec in two environment variables,
``IPCBUS_CHANNEL_FD`` and ``IPCBUS_CHANNEL_CODEC``. In the child,
:func:`parent` reads them, removes them from ``os.environ`` (so a grandchild
does not believe it has a channel that is not its own) and opens the
channel. Every child started by ipcbus gets an environment scrubbed of these
variables first, so only the channel meant for it is ever announced.

The parent's end is close-on-exec, and the child's end is closed in the
parent as soon as the child runs: when the parent dies, the kernel closes
the last copy of its end and the child reads EOF. A worker whose master is
gone therefore ends its ``for msg in parent()`` loop and can exit.

Other wire protocols plug in through :class:`ChannelProtocol` and
:func:`register_channel_protocol` (the Node.js protocol selects itself with
``NODE_CHANNEL_FD``); ``native`` is the ipcbus protocol.
"""

from __future__ import annotations

import os
import select
import selectors
import signal as _signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any, NamedTuple

from ._channel import Channel
from ._errors import ExecTimeout, TransportError
from ._frontend import make_core
from .codecs import Codec, get_codec
from .transports._fd import adopt_fd, socketpair_sockets
from .transports._sockets import SocketStream

__all__ = [
    "CHANNEL_CODEC_ENV",
    "CHANNEL_FD_ENV",
    "ChannelProtocol",
    "ChildProcess",
    "ExecResult",
    "InheritedChannel",
    "exec",
    "exec_file",
    "fork",
    "get_channel_protocol",
    "inherited_channel",
    "parent",
    "register_channel_protocol",
    "spawn",
    "wait_any",
    "wait_children",
]

CHANNEL_FD_ENV = "IPCBUS_CHANNEL_FD"
CHANNEL_CODEC_ENV = "IPCBUS_CHANNEL_CODEC"

# Seconds a closing ChildProcess gives the child to leave on its own after
# the channel closed, and again after SIGTERM, before SIGKILL.
DEFAULT_GRACE = 2.0
# After a timeout kills a command, how long we still read what it wrote.
_DRAIN_AFTER_KILL = 1.0
# Polling period where pidfds are missing (not Linux, or Linux < 5.3).
_POLL_STEP = 0.02

StrPath = str | os.PathLike[str]
# What Popen accepts for stdin/stdout/stderr: None (inherit), subprocess.PIPE,
# subprocess.DEVNULL, subprocess.STDOUT, an fd, or a file object.
Redirect = int | IO[Any] | None


# ---------------------------------------------------------------- protocols


class InheritedChannel(NamedTuple):
    """What the environment says about a channel this process inherited."""

    fd: int
    protocol: str
    codec: str | None


class ChannelProtocol:
    """How a parent and its child set up a channel over a socketpair.

    The hook for wire protocols other than ipcbus's own: a protocol names
    the environment variables that announce a channel to a child, reads them
    back in the child, and builds a channel (blocking or trio) on a socket.
    Register one with :func:`register_channel_protocol`; ``spawn(...,
    protocol=name)`` and :func:`parent` then use it.
    """

    #: The value of ``spawn(protocol=...)`` that selects this protocol.
    name: str = ""
    #: Every variable this protocol uses to announce a channel. They are
    #: removed from each child's environment before its own are added, and
    #: from ``os.environ`` when a child takes its channel.
    env_vars: tuple[str, ...] = ()

    def child_env(self, fd: int, codec: str) -> dict[str, str]:
        """The variables that tell a child its channel is fd ``fd``."""
        raise NotImplementedError

    def from_environ(self, environ: Mapping[str, str]) -> InheritedChannel | None:
        """The channel ``environ`` announces, or None. TransportError if the
        variables are there but malformed."""
        raise NotImplementedError

    def check_options(self, codec: str | Codec, options: dict[str, Any]) -> None:
        """Refuse bad channel options before a child is started."""

    def open_channel(self, sock: socket.socket, *, end: str, codec: str | Codec | None, options: dict[str, Any]) -> Any:
        """A blocking channel over ``sock``; ``end`` is ``"parent"`` or ``"child"``.
        Owns ``sock`` from the call on (closes it if it fails)."""
        raise NotImplementedError

    def open_async_channel(
        self, sock: socket.socket, *, end: str, codec: str | Codec | None, options: dict[str, Any]
    ) -> Any:
        """A trio channel over ``sock`` (same contract as :meth:`open_channel`)."""
        raise NotImplementedError


def _parse_fd(name: str, value: str) -> int:
    try:
        fd = int(value)
    except ValueError:
        raise TransportError(f"{name}={value!r} is not an fd number") from None
    if fd < 0:
        raise TransportError(f"{name}={value!r} is not an fd number")
    return fd


class NativeProtocol(ChannelProtocol):
    """The ipcbus protocol: ``IPCBUS_CHANNEL_FD`` and ``IPCBUS_CHANNEL_CODEC``."""

    name = "native"
    env_vars = (CHANNEL_FD_ENV, CHANNEL_CODEC_ENV)

    def child_env(self, fd: int, codec: str) -> dict[str, str]:
        return {CHANNEL_FD_ENV: str(fd), CHANNEL_CODEC_ENV: codec}

    def from_environ(self, environ: Mapping[str, str]) -> InheritedChannel | None:
        value = environ.get(CHANNEL_FD_ENV)
        if value is None:
            return None
        return InheritedChannel(_parse_fd(CHANNEL_FD_ENV, value), self.name, environ.get(CHANNEL_CODEC_ENV) or None)

    def check_options(self, codec: str | Codec, options: dict[str, Any]) -> None:
        make_core(
            codec=codec,
            trusted=True,
            can_carry_handles=True,
            role="peer",
            **{k: v for k, v in options.items() if k != "handshake_timeout"},
        )

    @staticmethod
    def _stream_name(end: str) -> str:
        return "socketpair" if end == "parent" else "fd"

    def open_channel(self, sock: socket.socket, *, end: str, codec: str | Codec | None, options: dict[str, Any]) -> Any:
        stream = SocketStream(sock, name=self._stream_name(end), trusted=True)
        return Channel._open(stream, "peer", codec=codec or "msgpack", **options)

    def open_async_channel(
        self, sock: socket.socket, *, end: str, codec: str | Codec | None, options: dict[str, Any]
    ) -> Any:
        from ._trio_channel import AsyncChannel
        from .transports._sockets import AsyncSocketStream

        try:
            stream = AsyncSocketStream(sock, name=self._stream_name(end), trusted=True)
        except BaseException:
            sock.close()
            raise
        return AsyncChannel._open(stream, "peer", codec=codec or "msgpack", **options)


_PROTOCOLS: dict[str, ChannelProtocol] = {}


def register_channel_protocol(protocol: ChannelProtocol) -> None:
    """Make ``protocol`` available as ``spawn(..., protocol=protocol.name)``
    and let :func:`parent` recognise the channels it announces. Protocols are
    consulted in registration order; ``native`` comes first."""
    if not protocol.name:
        raise ValueError("a channel protocol needs a name")
    _PROTOCOLS[protocol.name] = protocol


def get_channel_protocol(name: str) -> ChannelProtocol:
    """The registered protocol called ``name`` (ValueError naming the known ones)."""
    try:
        return _PROTOCOLS[name]
    except KeyError:
        known = ", ".join(sorted(_PROTOCOLS))
        raise ValueError(f"unknown channel protocol {name!r} (known: {known})") from None


register_channel_protocol(NativeProtocol())


def inherited_channel(environ: Mapping[str, str] | None = None) -> InheritedChannel | None:
    """The channel ``environ`` (default ``os.environ``) announces, as
    ``(fd, protocol, codec)``, or None. Only reads; :func:`parent` is what
    takes the channel and removes the variables."""
    environ = os.environ if environ is None else environ
    for protocol in _PROTOCOLS.values():
        found = protocol.from_environ(environ)
        if found is not None:
            return found
    return None


def _scrubbed_env(env: Mapping[str, str] | None) -> dict[str, str]:
    result = dict(os.environ if env is None else env)
    for protocol in _PROTOCOLS.values():
        for var in protocol.env_vars:
            result.pop(var, None)
    return result


# -------------------------------------------------------------- the child side

_parent_lock = threading.Lock()
_parent_taken = False
_parent_spec: InheritedChannel | None = None
_parent_result: dict[str, Any] = {}  # "blocking" / "trio" -> channel, None, or the error


def _take_parent(kind: str, options: dict[str, Any]) -> Any:
    # Shared by ipcbus.parent() and ipcbus.trio.parent(): the inherited fd can
    # become one channel only, so the first kind to ask owns it.
    global _parent_taken, _parent_spec
    with _parent_lock:
        if kind in _parent_result:
            result = _parent_result[kind]
            if isinstance(result, BaseException):
                raise result
            return result
        if not _parent_taken:
            _parent_taken = True
            spec = inherited_channel(os.environ)
            for protocol in _PROTOCOLS.values():
                for var in protocol.env_vars:
                    os.environ.pop(var, None)
            _parent_spec = spec
        other = [k for k, v in _parent_result.items() if v is not None and k != kind]
        if _parent_spec is None or other:
            if other:
                api = "ipcbus.trio.parent()" if other[0] == "trio" else "ipcbus.parent()"
                error = RuntimeError(f"{api} already took this process's channel to its parent")
                _parent_result[kind] = error
                raise error
            _parent_result[kind] = None
            return None
        spec = _parent_spec
        if sys.platform == "win32":  # Windows: an inherited pipe handle (_process_windows.py)
            from ._process_windows import open_parent_channel

            try:
                _parent_result[kind] = open_parent_channel(spec, kind, options)
            except BaseException as exc:
                _parent_result[kind] = exc
                raise
            return _parent_result[kind]
        try:
            protocol = get_channel_protocol(spec.protocol)
            sock = adopt_fd(spec.fd)
            if kind == "trio":
                channel = protocol.open_async_channel(sock, end="child", codec=spec.codec, options=options)
            else:
                channel = protocol.open_channel(sock, end="child", codec=spec.codec, options=options)
        except BaseException as exc:
            _parent_result[kind] = exc
            raise
        _parent_result[kind] = channel
        return channel


def parent(**options: Any) -> Channel | None:
    """In a child started by :func:`fork` or ``spawn(..., ipc=True)``: the
    channel to the parent. None in a process started without one.

    The first call reads ``IPCBUS_CHANNEL_FD`` / ``IPCBUS_CHANNEL_CODEC``,
    removes them from ``os.environ`` and opens the channel; later calls
    return the same channel (or None), and ``options`` (``max_message_size``,
    ``max_handles``, ``internal_prefix``, ``handshake_timeout``) only count on
    the first. When the parent closes its end or dies, ``recv`` raises
    ChannelClosed and iteration ends. Raises TransportError if the variables
    name an fd that is not an open stream socket, and RuntimeError if
    ``ipcbus.trio.parent()`` already took the channel.
    """
    return _take_parent("blocking", options)


# ------------------------------------------------------------- waiting on pids


def _returncode_signal(returncode: int | None) -> _signal.Signals | None:
    if returncode is None or returncode >= 0:
        return None
    try:
        return _signal.Signals(-returncode)
    except ValueError:
        return None


def _open_pidfd(pid: int) -> int | None:
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        return pidfd_open(pid)
    except OSError:
        # ENOSYS on old kernels, ESRCH if it is gone: either way, poll.
        return None


def _block_until_exit(pids: Sequence[int], timeout: float | None) -> None:
    """Return once one of ``pids`` (our unreaped children) may have exited,
    or after ``timeout``. Reaps nothing: the caller polls afterwards.

    Uses pidfds (Linux 5.3+), which become readable when the process exits,
    so nothing spins; elsewhere the caller polls every 20 ms.
    """
    pidfds: list[int] = []
    try:
        for pid in pids:
            fd = _open_pidfd(pid)
            if fd is None:
                break
            pidfds.append(fd)
        else:
            poller = select.poll()
            for fd in pidfds:
                poller.register(fd, select.POLLIN)
            poller.poll(None if timeout is None else max(0.0, timeout) * 1000)
            return
    finally:
        for fd in pidfds:
            os.close(fd)
    # No pidfds: a short sleep that the caller repeats after polling.
    time.sleep(_POLL_STEP if timeout is None else min(_POLL_STEP, max(0.0, timeout)))


def wait_children(children: Iterable[ChildProcess], timeout: float | None = None) -> list[ChildProcess]:
    """Wait until at least one of ``children`` has exited; return every one
    that has (reaped, ``returncode`` set), in the order given.

    Returns an empty list past ``timeout`` seconds, or when ``children`` is
    empty. Only these children are waited for (never ``waitpid(-1)``, which
    would reap other code's children); on Linux the wait sleeps on pidfds.
    """
    children = list(children)
    deadline = None if timeout is None else time.monotonic() + timeout
    while children:
        done = [c for c in children if c.poll() is not None]
        if done:
            return done
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return []
        _block_until_exit([c.pid for c in children], remaining)
    return []


def wait_any(children: Iterable[ChildProcess], timeout: float | None = None) -> Iterator[ChildProcess]:
    """Yield each of ``children`` as it exits, until all have.

    ``for child in ipcbus.wait_any(workers): restart(child)``. Raises
    TimeoutError if ``timeout`` seconds (counted from the first ``next``)
    pass with children still running.
    """
    pending = list(children)
    deadline = None if timeout is None else time.monotonic() + timeout
    while pending:
        remaining = None if deadline is None else deadline - time.monotonic()
        done = wait_children(pending, remaining)
        if not done:
            raise TimeoutError(f"{len(pending)} children still running after {timeout} s")
        for child in done:
            pending.remove(child)
            yield child


# --------------------------------------------------------------- ChildProcess


class ChildBase:
    """What a child looks like from both frontends: its pid, its channel and
    how it ended. ``_proc`` is a ``subprocess.Popen`` or a ``trio.Process``
    (both have ``poll``, ``send_signal``, ``terminate`` and ``kill``)."""

    def __init__(self, proc: Any, channel: Any, args: Sequence[str]) -> None:
        self._proc = proc
        self._channel = channel
        self.args = list(args)

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._proc.pid

    @property
    def channel(self) -> Any:
        """The channel to the child, or None if it was started without one."""
        return self._channel

    @property
    def returncode(self) -> int | None:
        """None while the child runs; then its exit code, or ``-N`` if signal
        N killed it. Reading it reaps an exited child (like ``poll()``)."""
        return self._proc.poll()

    @property
    def exit_code(self) -> int | None:
        """The exit status if the child exited normally, else None."""
        rc = self.returncode
        return rc if rc is not None and rc >= 0 else None

    @property
    def signal(self) -> _signal.Signals | None:
        """The signal that killed the child, else None."""
        return _returncode_signal(self.returncode)

    @property
    def connected(self) -> bool:
        """True while the parent's end of the channel is open."""
        return self._channel is not None and not self._channel.closed

    def poll(self) -> int | None:
        """``returncode`` without waiting (reaps the child if it exited)."""
        return self._proc.poll()

    def send_signal(self, sig: int) -> None:
        """Send signal ``sig`` to the child (nothing once it was reaped)."""
        self._proc.send_signal(sig)

    def terminate(self) -> None:
        """Send SIGTERM."""
        self._proc.terminate()

    def kill(self) -> None:
        """Send SIGKILL."""
        self._proc.kill()


class ChildProcess(ChildBase):
    """A child process started by :func:`fork` or :func:`spawn`.

    ``channel`` is the :class:`Channel` to the child (None without
    ``ipc=True``). Closing the channel and the process ending are separate
    events: ``channel.recv()`` raising ChannelClosed (or a ``for`` loop over
    the channel ending) says only that the channel is gone, because the child
    closed it or because it exited. ``poll()`` / ``returncode`` /
    ``wait(timeout)`` say whether the process has exited, and how:
    ``exit_code`` for a normal exit, ``signal`` for a death by signal
    (``returncode`` is then ``-signal``, as in :mod:`subprocess`).

    Used as a context manager, the child leaves neither a zombie nor an
    orphan: on exit the channel (and stdin) are closed, the child gets
    ``grace`` seconds to leave, then SIGTERM, ``grace`` more seconds, then
    SIGKILL, and it is reaped.
    """

    def __init__(self, popen: subprocess.Popen[bytes], channel: Any, args: Sequence[str]) -> None:
        super().__init__(popen, channel, args)
        self._popen = popen

    @property
    def stdin(self) -> IO[bytes] | None:
        """The child's stdin when started with ``stdin=subprocess.PIPE``."""
        return self._popen.stdin

    @property
    def stdout(self) -> IO[bytes] | None:
        """The child's stdout when started with ``stdout=subprocess.PIPE``."""
        return self._popen.stdout

    @property
    def stderr(self) -> IO[bytes] | None:
        """The child's stderr when started with ``stderr=subprocess.PIPE``."""
        return self._popen.stderr

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to exit and return ``returncode``.

        TimeoutError past ``timeout`` seconds (the child keeps running).
        """
        if timeout is None:
            return self._popen.wait()
        if not wait_children([self], timeout):
            raise TimeoutError(f"child {self.pid} still running after {timeout} s")
        return self._popen.wait()

    def disconnect(self) -> None:
        """Close the channel: the child's ``recv`` raises ChannelClosed (its
        loop over ``parent()`` ends). Messages already sent are flushed first."""
        if self._channel is not None:
            try:
                self._channel.close(timeout=DEFAULT_GRACE)
            except TimeoutError:
                pass

    def close(self, grace: float = DEFAULT_GRACE) -> int:
        """Close the channel and stdin, then wait for the child: ``grace``
        seconds, SIGTERM, ``grace`` seconds, SIGKILL. Reaps it and closes its
        pipes; returns ``returncode``."""
        try:
            if self._channel is not None:
                try:
                    self._channel.close(timeout=grace)
                except TimeoutError:
                    pass
            if self._popen.stdin is not None:
                try:
                    self._popen.stdin.close()
                except OSError:
                    pass
            # Windows has no SIGKILL: TerminateProcess is both.
            for sig in (_signal.SIGTERM, getattr(_signal, "SIGKILL", _signal.SIGTERM)):
                try:
                    self.wait(grace)
                    break
                except TimeoutError:
                    self._popen.send_signal(sig)
            return self._popen.wait()
        finally:
            for stream in (self._popen.stdin, self._popen.stdout, self._popen.stderr):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass

    def __enter__(self) -> ChildProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        rc = self._popen.returncode
        state = "running" if rc is None else f"returncode={rc}"
        return f"<ipcbus.ChildProcess pid={self.pid} {state}>"


# ------------------------------------------------------------- fork / spawn


def _codec_name(codec: str | Codec | None) -> str:
    return get_codec("msgpack" if codec is None else codec).name


def _argv(argv: Sequence[StrPath]) -> list[str]:
    if isinstance(argv, (str, bytes)):
        raise TypeError("argv must be a sequence of arguments, not a string (use exec() for a command line)")
    result = [os.fspath(a) for a in argv]
    if not result:
        raise ValueError("argv is empty")
    return result  # type: ignore[return-value]


def _fork_argv(
    target: StrPath | None,
    args: Sequence[StrPath],
    module: str | None,
    python: StrPath,
    python_args: Sequence[str],
) -> list[str]:
    # fork()'s command line, for both frontends: a script path or a module.
    if (target is None) == (module is None):
        raise TypeError("fork() needs a script path or module=..., and not both")
    entry = ["-m", module] if module is not None else [os.fspath(target)]  # type: ignore[arg-type]
    return [os.fspath(python), *python_args, *entry, *(os.fspath(a) for a in args)]


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
) -> ChildProcess:
    """Start the executable ``argv[0]`` with arguments ``argv[1:]``.

    With ``ipc=True`` the child gets a channel (``child.channel``) over an
    inherited socketpair, announced to it by ``protocol``'s environment
    variables (``native``: ``IPCBUS_CHANNEL_FD`` / ``IPCBUS_CHANNEL_CODEC``;
    other protocols are added with :func:`register_channel_protocol`).
    ``protocol="node"`` starts a Node.js child with its own IPC channel
    (``NODE_CHANNEL_FD``, json serialization): ``process.send()`` and
    ``process.on("message")`` there, handles included; its codec is always
    Node's JSON (``codec`` may be omitted or ``"json"``). The
    child's environment is ``env`` (default: this process's), minus any
    channel variables inherited from our own parent.

    ``stdin``/``stdout``/``stderr`` take what :class:`subprocess.Popen`
    takes (None inherits; ``subprocess.PIPE`` makes ``child.stdout`` etc.).
    ``pass_fds`` are more fds for the child to inherit. ``options`` are
    channel options (``max_message_size``, ``max_handles``,
    ``internal_prefix``, ``handshake_timeout``); they are checked before the
    child starts. OSError if the executable cannot be started.
    """
    args = _argv(argv)
    child_env = _scrubbed_env(env)
    kwargs: dict[str, Any] = {
        "env": child_env,
        "cwd": cwd,
        "stdin": stdin,
        "stdout": stdout,
        "stderr": stderr,
        "close_fds": True,
        "start_new_session": start_new_session,
    }
    if not ipc:
        if protocol != "native":
            raise ValueError(f"protocol={protocol!r} needs ipc=True")
        if options:
            raise TypeError(f"channel options without ipc=True: {', '.join(sorted(options))}")
        return ChildProcess(subprocess.Popen(args, pass_fds=tuple(pass_fds), **kwargs), None, args)

    proto = get_channel_protocol(protocol)
    proto.check_options(codec, options)
    if sys.platform == "win32":  # Windows: an inherited pipe handle (_process_windows.py)
        from ._process_windows import spawn_with_pipe

        return spawn_with_pipe(args, proto, codec, options, kwargs, pass_fds)
    ours, theirs = socketpair_sockets()
    try:
        child_env.update(proto.child_env(theirs.fileno(), _codec_name(codec)))
        # The channel exists before the child: what it writes first (the
        # hello) waits in the socket buffer, so a child that dies at once
        # shows up as ChannelClosed on recv, not as an error here.
        channel = proto.open_channel(ours, end="parent", codec=codec, options=options)
    except BaseException:
        ours.close()
        theirs.close()
        raise
    try:
        popen = subprocess.Popen(args, pass_fds=(theirs.fileno(), *pass_fds), **kwargs)
    except BaseException:
        channel.close()
        raise
    finally:
        # Only the child may hold this end now: its exit must read as EOF here.
        theirs.close()
    return ChildProcess(popen, channel, args)


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
) -> ChildProcess:
    """Start a Python child with a channel to it (``child.channel``).

    ``target`` is a script path (``fork("worker.py", ["--id", "3"])``); or
    pass ``module="pkg.worker"`` instead to run ``python -m pkg.worker``.
    The child calls ``ipcbus.parent()`` (or ``ipcbus.trio.parent()``) to
    get its end. ``python`` is the interpreter (default: this one) and
    ``python_args`` go before the target (``["-u"]``, ``["-X", "dev"]``).
    Other arguments as for :func:`spawn`. The child is a fresh interpreter
    started with ``exec``; the running one is never ``os.fork``-ed.

    A child that fails before taking its channel (a script that raises at
    import, a bad path) is not an error here: the parent's ``recv`` raises
    ChannelClosed and ``wait()`` gives the exit code; start it with
    ``stderr=subprocess.PIPE`` to read the traceback.
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


# ------------------------------------------------------------ exec / exec_file


@dataclass(frozen=True)
class ExecResult:
    """What :func:`exec` / :func:`exec_file` return: the finished command.

    ``stdout`` and ``stderr`` are bytes, or str with ``text=True``.
    ``returncode`` is the exit status, or ``-N`` when signal N killed it.
    """

    args: str | list[str]
    returncode: int
    stdout: bytes | str
    stderr: bytes | str

    @property
    def exit_code(self) -> int | None:
        """The exit status if the command exited normally, else None."""
        return self.returncode if self.returncode >= 0 else None

    @property
    def signal(self) -> _signal.Signals | None:
        """The signal that killed the command, else None."""
        return _returncode_signal(self.returncode)

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0."""
        return self.returncode == 0


def _kill_group(popen: subprocess.Popen[bytes]) -> None:
    # The command runs in its own session, so its pid is its process group:
    # this reaches a shell's children too. The unreaped leader keeps the
    # group id alive, so it cannot name someone else's group.
    try:
        os.killpg(popen.pid, _signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class _Capture:
    """Feeds stdin and collects stdout/stderr of a Popen with pipes, without
    threads, up to a deadline."""

    def __init__(self, popen: subprocess.Popen[bytes], input: bytes | None) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self._sel = selectors.DefaultSelector()
        self._bufs: dict[int, bytearray] = {}
        assert popen.stdout is not None and popen.stderr is not None
        for stream, buf in ((popen.stdout, self.out), (popen.stderr, self.err)):
            self._sel.register(stream.fileno(), selectors.EVENT_READ)
            self._bufs[stream.fileno()] = buf
        self._input = memoryview(input or b"")
        self._stdin = popen.stdin
        if popen.stdin is not None:
            if self._input:
                os.set_blocking(popen.stdin.fileno(), False)
                self._sel.register(popen.stdin.fileno(), selectors.EVENT_WRITE)
            else:
                popen.stdin.close()

    def run(self, deadline: float | None) -> bool:
        """True once both output pipes reached EOF; False at the deadline."""
        while self._sel.get_map():
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                return False
            for key, _ in self._sel.select(timeout):
                fd = key.fd
                if fd in self._bufs:
                    data = os.read(fd, 65536)
                    if data:
                        self._bufs[fd] += data
                    else:
                        self._sel.unregister(fd)
                    continue
                try:
                    n = os.write(fd, self._input[:65536])
                except BlockingIOError:
                    continue
                except OSError:
                    n = len(self._input)  # the command stopped reading (EPIPE)
                self._input = self._input[n:]
                if not self._input:
                    self._sel.unregister(fd)
                    assert self._stdin is not None
                    try:
                        self._stdin.close()
                    except OSError:
                        pass
        return True

    def close(self) -> None:
        self._sel.close()


def _run(
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
    deadline = None if timeout is None else time.monotonic() + timeout
    popen = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_scrubbed_env(env),
        cwd=cwd,
        close_fds=True,
        start_new_session=True,
    )
    capture = _Capture(popen, input)
    child = ChildProcess(popen, None, argv)
    try:
        finished = capture.run(deadline)
        if finished:
            # The pipes are closed, but the command may still be running.
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            finished = bool(wait_children([child], remaining))
        if not finished:
            _kill_group(popen)
            capture.run(time.monotonic() + _DRAIN_AFTER_KILL)
            popen.wait()
    except BaseException:
        _kill_group(popen)
        popen.wait()
        raise
    finally:
        capture.close()
        for stream in (popen.stdin, popen.stdout, popen.stderr):
            if stream is not None:
                stream.close()

    def convert(data: bytearray) -> bytes | str:
        return data.decode(encoding, errors) if text else bytes(data)

    if not finished:
        assert timeout is not None
        raise ExecTimeout(cmd, timeout, convert(capture.out), convert(capture.err), popen.returncode)
    return ExecResult(cmd, popen.returncode, convert(capture.out), convert(capture.err))


def exec(
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
    """Run the shell command line ``command`` to completion and capture its
    output: ``ipcbus.exec("ls -l | wc -l").stdout``.

    The shell and everything it starts run in a new session (their own
    process group). Past ``timeout`` seconds the whole group gets SIGKILL,
    and ExecTimeout is raised carrying the output captured so far. If this
    call is interrupted (KeyboardInterrupt...), the group is killed too.
    ``input`` is written to the command's stdin (otherwise stdin is
    /dev/null). Output is bytes, or str with ``text=True`` (decoded with
    ``encoding``/``errors``), read until every process holding the command's
    stdout and stderr has closed them (so a background job that keeps them
    open keeps ``exec`` waiting, up to ``timeout``). A non-zero exit is not
    an error: check ``result.returncode`` (or ``result.ok``).
    """
    if not isinstance(command, str):
        raise TypeError("exec() takes a command line string; use exec_file() for an argv")
    return _run(
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


def exec_file(
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
    """Run the program ``path`` with ``args`` (no shell) to completion and
    capture its output. Same timeout, input and output rules as :func:`exec`
    (the program and its own children are killed as a group)."""
    argv = _argv([path, *args])
    return _run(
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


# Node.js's own IPC protocol (protocol="node", and NODE_CHANNEL_FD in parent()).
# Imported last: ipcbus._node builds on the classes above.
from ._node import NodeProtocol  # noqa: E402

register_channel_protocol(NodeProtocol())
