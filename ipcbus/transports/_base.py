"""The transport contract: byte streams that may carry file descriptors.

A transport moves bytes and, if it can, fds; it knows nothing of frames or
codecs. Each URL scheme (``unix``, ``fd``, ``tcp``, ``memory``...) names a
:class:`Transport`, which opens blocking :class:`Stream` objects and trio
:class:`AsyncStream` objects, and listeners for both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

__all__ = [
    "AsyncListener",
    "AsyncStream",
    "Listener",
    "Stream",
    "Transport",
]


class Stream(ABC):
    """A connected, blocking byte stream.

    ``transport_name`` names the transport in error messages;
    ``can_send_handles`` says whether :meth:`send` accepts fds.
    """

    transport_name: str = "?"
    can_send_handles: bool = False
    #: True when the peer is known without a handshake proof: an inherited fd
    #: or a socketpair made by this process (pickle is allowed on these).
    trusted: bool = False

    @abstractmethod
    def send(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = (), *, block: bool = True) -> int:
        """Write a prefix of ``data`` and return its length.

        ``fds`` must ride with the first byte written, in one system call.
        With ``block=True`` at least one byte is written (waiting as needed);
        with ``block=False`` the call never waits and may return 0 (then no
        fd was sent either). Raises ChannelClosed if the peer is gone,
        TransportError for other failures.
        """

    @abstractmethod
    def receive(self, max_bytes: int, max_fds: int, timeout: float | None = None) -> tuple[bytes, list[int]]:
        """Read up to ``max_bytes`` bytes and the fds that came with them.

        ``b""`` means EOF. Waits at most ``timeout`` seconds (None: forever)
        and raises TimeoutError past it. Received fds are owned by the
        caller, and are close-on-exec.
        """

    def receive_into(self, buffer: memoryview, max_fds: int, timeout: float | None = None) -> tuple[int, list[int]]:
        """Like :meth:`receive`, but into ``buffer``; returns (bytes read,
        fds). 0 means EOF. The default copies from :meth:`receive`; a
        stream that can read in place (large payloads: one copy less)
        overrides it."""
        data, fds = self.receive(len(buffer), max_fds, timeout)
        buffer[: len(data)] = data
        return len(data), fds

    @abstractmethod
    def close(self) -> None:
        """Close the stream (idempotent). The peer sees EOF."""

    def wait_writable(self, timeout: float | None) -> bool:
        """Wait until :meth:`send` with ``block=False`` can make progress;
        False if ``timeout`` passed first. The default does not wait."""
        return True

    def shutdown_write(self) -> None:  # noqa: B027 - optional capability
        """Send EOF while still reading (where the transport can)."""

    def interrupt_reads(self) -> None:  # noqa: B027 - optional capability
        """End a :meth:`receive` another thread of this process is blocked
        in: it returns EOF at once, as every later one does. A channel calls
        it before :meth:`close` when another thread is reading. The default
        does nothing: for a stream whose ``close`` wakes its readers itself.
        """

    def peer_credentials(self) -> tuple[int, int, int] | None:
        """(pid, uid, gid) of the peer process, where the OS says; else None."""
        return None

    def describe_peer(self) -> str:
        """A short description of the peer for logs (an address, a pid)."""
        return self.transport_name


class Listener(ABC):
    """A bound, listening endpoint that yields blocking streams."""

    @property
    @abstractmethod
    def address(self) -> str:
        """The URL peers connect to (with the real port or path)."""

    @abstractmethod
    def accept(self, timeout: float | None = None) -> Stream:
        """Wait for the next admitted peer. TimeoutError past ``timeout``."""

    @abstractmethod
    def close(self) -> None:
        """Stop listening and remove what the listener created (idempotent)."""


class AsyncStream(ABC):
    """The trio counterpart of :class:`Stream`. Every method is a checkpoint."""

    transport_name: str = "?"
    can_send_handles: bool = False
    trusted: bool = False

    @abstractmethod
    async def send(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> int:
        """Write a non-empty prefix of ``data`` (fds on its first byte)."""

    @abstractmethod
    async def receive(self, max_bytes: int, max_fds: int) -> tuple[bytes, list[int]]:
        """Read some bytes and their fds; ``b""`` is EOF."""

    @abstractmethod
    async def aclose(self) -> None:
        """Close the stream (idempotent)."""

    def close_nowait(self) -> None:  # noqa: B027 - optional capability
        """Close without waiting (for cleanup paths that cannot await)."""

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Write a prefix of ``data`` (no fds) without waiting: how many
        bytes went out. 0 when the kernel took none, or when the stream has
        no such write (this default): the caller then queues ``data`` for
        its writer. An optional capability; a lone message skips a round of
        the scheduler with it."""
        return 0

    def peer_credentials(self) -> tuple[int, int, int] | None:
        return None

    def describe_peer(self) -> str:
        return self.transport_name


class AsyncListener(ABC):
    """The trio counterpart of :class:`Listener`."""

    @property
    @abstractmethod
    def address(self) -> str: ...

    @abstractmethod
    async def accept(self) -> AsyncStream: ...

    @abstractmethod
    async def aclose(self) -> None: ...


class Transport(ABC):
    """A URL scheme: how to connect to and listen on its addresses.

    ``address`` is the URL with ``scheme://`` removed. ``options`` are the
    keyword arguments the user passed to ``listen``/``connect`` that are not
    channel options; a transport raises TypeError for ones it does not know.
    """

    scheme: str
    can_send_handles: bool = False

    @abstractmethod
    def connect(self, address: str, **options: Any) -> Stream: ...

    @abstractmethod
    def listen(self, address: str, **options: Any) -> Listener: ...

    async def connect_async(self, address: str, **options: Any) -> AsyncStream:
        """Connect for the trio frontend. The default says it is not supported."""
        from .._errors import TransportError

        raise TransportError(f"the {self.scheme} transport has no trio support")

    async def listen_async(self, address: str, **options: Any) -> AsyncListener:
        """Listen for the trio frontend. The default says it is not supported."""
        from .._errors import TransportError

        raise TransportError(f"the {self.scheme} transport has no trio support")
