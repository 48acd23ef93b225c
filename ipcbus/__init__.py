"""ipcbus: one message-and-handle API over interchangeable transports.

Blocking API here; the trio API is ``ipcbus.trio``. See the README for a
tour and docs/PROTOCOL.md for the bytes on the wire.
"""

from __future__ import annotations

from ._channel import Channel as Channel
from ._channel import Listener as Listener
from ._channel import connect as connect
from ._channel import listen as listen
from ._channel import pair as pair
from ._errors import AuthenticationError as AuthenticationError
from ._errors import ChannelClosed as ChannelClosed
from ._errors import CodecError as CodecError
from ._errors import ExecTimeout as ExecTimeout
from ._errors import HandleError as HandleError
from ._errors import HandshakeError as HandshakeError
from ._errors import HandshakeTimeout as HandshakeTimeout
from ._errors import HeartbeatTimeout as HeartbeatTimeout
from ._errors import IPCError as IPCError
from ._errors import ProtocolError as ProtocolError
from ._errors import TransportError as TransportError
from ._handles import Handle as Handle
from ._message import Message as Message
from ._process import ChildProcess as ChildProcess
from ._process import ExecResult as ExecResult
from ._process import exec as exec
from ._process import exec_file as exec_file
from ._process import fork as fork
from ._process import parent as parent
from ._process import spawn as spawn
from ._process import wait_any as wait_any
from ._process import wait_children as wait_children
from .codecs import Codec as Codec
from .codecs import register_codec as register_codec
from .transports import Transport as Transport
from .transports import register_transport as register_transport

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "Channel",
    "ChannelClosed",
    "ChildProcess",
    "Codec",
    "CodecError",
    "ExecResult",
    "ExecTimeout",
    "Handle",
    "HandleError",
    "HandshakeError",
    "HandshakeTimeout",
    "HeartbeatTimeout",
    "IPCError",
    "Listener",
    "Message",
    "ProtocolError",
    "Transport",
    "TransportError",
    "connect",
    "exec",
    "exec_file",
    "fork",
    "listen",
    "pair",
    "parent",
    "register_codec",
    "register_transport",
    "spawn",
    "wait_any",
    "wait_children",
]
