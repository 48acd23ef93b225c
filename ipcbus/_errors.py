"""The one exception hierarchy of ipcbus.

::

    IPCError
     ├── ChannelClosed        the peer closed the channel cleanly (EOF at a frame boundary),
     │                        or this side closed it and then used it
     ├── ProtocolError        the peer sent bytes that break the wire rules
     │    └── HandshakeError  the two ends disagree (magic, version, codec, authentication)
     │         └── AuthenticationError  the peer did not prove knowledge of the shared key
     ├── HandleError          a handle could not be sent or received as declared
     ├── CodecError           a value could not be encoded, or a payload decoded
     ├── TransportError       the transport failed (bad address, OS error, refused peer)
     │    ├── HandshakeTimeout the peer did not complete the handshake in time
     │    └── HeartbeatTimeout nothing arrived from the peer within the heartbeat time
     └── ExecTimeout          ``exec()`` / ``exec_file()`` ran past their timeout

An error raised because of what a *peer* did is raised on that channel only:
the channel is closed, and every other channel and the process keep working.
The OSError that caused a TransportError is kept as ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ChannelClosed",
    "CodecError",
    "ExecTimeout",
    "HandleError",
    "HandshakeError",
    "HandshakeTimeout",
    "HeartbeatTimeout",
    "IPCError",
    "ProtocolError",
    "TransportError",
]


class IPCError(Exception):
    """Base class of every error ipcbus raises on purpose."""


class ChannelClosed(IPCError):
    """The channel is closed: the peer hung up cleanly, or this side closed it."""


class ProtocolError(IPCError):
    """The peer broke the wire protocol. The message says what and how much."""


class HandshakeError(ProtocolError):
    """The two ends could not agree: magic, version, codec or authentication.

    Where both sides' values are known, the message names both.
    """


class AuthenticationError(HandshakeError):
    """The peer did not prove knowledge of the shared key (``authkey``): a
    wrong key, a missing or malformed proof, or a key on one side only.

    Raised on both ends; nothing the peer sent after its hello is read.
    """


class HandleError(IPCError):
    """A handle could not be sent or received as declared.

    Raised at ``send`` when the transport cannot carry handles or an object is
    not a handle ipcbus knows; on the receiving side when the descriptors that
    arrived do not match what the frame declared (every fd received for it is
    closed first).
    """


class CodecError(IPCError):
    """A value could not be encoded by the channel's codec, or a payload decoded."""


class TransportError(IPCError):
    """The transport failed: bad address, OS error, or a peer that was refused."""


class HandshakeTimeout(TransportError):
    """The peer did not complete the handshake within the handshake timeout."""


class HeartbeatTimeout(TransportError):
    """Nothing arrived from the peer for the channel's ``heartbeat`` seconds:
    the peer process is dead, stopped, or the connection is half-open.
    The channel is closed."""


class ExecTimeout(IPCError, TimeoutError):
    """``exec()`` / ``exec_file()`` ran past their timeout.

    The command (and every process in its process group) was killed. What it
    wrote before that is kept: ``stdout`` and ``stderr`` (bytes, or str with
    ``text=True``), with ``cmd``, ``timeout`` and the ``returncode`` of the
    killed process (negative: the signal number).
    """

    def __init__(
        self,
        cmd: object,
        timeout: float,
        stdout: bytes | str = b"",
        stderr: bytes | str = b"",
        returncode: int | None = None,
    ) -> None:
        super().__init__(f"command {cmd!r} timed out after {timeout:g} s and was killed")
        self.cmd = cmd
        self.timeout = timeout
        self.stdout = stdout
        self.stderr = stderr
        self.returncode = returncode
