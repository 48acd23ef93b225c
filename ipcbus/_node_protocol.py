"""The sans-IO core of Node.js's own child_process IPC protocol (json mode).

:class:`NodeConnection` has the interface the frontends use on the native
:class:`~ipcbus._protocol.Connection`, so a channel speaks Node's protocol
when it is built with ``protocol="node"``. The wire facts, and the Node
source lines behind them, are in node-ipc.md; the section numbers below
refer to it.

- Framing (§2.1): one ``JSON.stringify`` value per line, UTF-8, ``\\n``
  terminated. The writer is compact, never writes NaN or an empty line, and
  escapes lone surrogates. The reader tolerates ``\\r`` and whitespace, reads
  an empty line or invalid JSON as a ProtocolError on this channel (Node
  itself dies of both), and refuses a line over ``max_message_size`` before
  buffering more of it.
- Internal messages (§4): an object whose ``cmd`` is a string longer than 5
  characters starting ``NODE_`` never reaches ``recv()``. Applications may
  claim more prefixes (``on_internal``), including longer ``NODE_`` ones such
  as ``NODE_CLUSTER``.
- Handles (§3): a handle travels as ``{"cmd":"NODE_HANDLE","type":T,"msg":M}``
  with one fd on the sendmsg that carries the line's first byte. The receiver
  answers exactly one ``NODE_HANDLE_ACK`` (fd present) or ``NODE_HANDLE_NACK``
  (no fd). While a handle of ours awaits its answer, every later message is
  held back (ACK and NACK excepted), as Node does, so nothing overtakes it.

There is no handshake in Node's protocol: the connection is established from
the start and never emits :class:`HandshakeComplete`; ``peer`` is a
:class:`NodePeer` from the start, saying what little is known.

Like the native core, this one never closes an fd (it cannot: no ``os``).
"""

from __future__ import annotations

import json
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from json import encoder as _json_encoder
from typing import Any

from ._errors import ChannelClosed, CodecError, HandleError, ProtocolError
from ._message import Message
from ._protocol import (
    DEFAULT_MAX_MESSAGE_SIZE,
    NEED_DATA,
    SEGMENT_TARGET,
    Closed,
    HandlesReleased,
    InternalMessage,
    RawMessage,
)

__all__ = ["NODE_PREFIX", "NodeConnection", "NodeJSONCodec", "NodePeer"]

NODE_PREFIX = "NODE_"
CMD_HANDLE = "NODE_HANDLE"
CMD_ACK = "NODE_HANDLE_ACK"
CMD_NACK = "NODE_HANDLE_NACK"
CMD_NOTIFY_CLOSE = "NODE_SOCKET_NOTIFY_CLOSE"
CMD_ALL_CLOSED = "NODE_SOCKET_ALL_CLOSED"
CMD_GET_COUNT = "NODE_SOCKET_GET_COUNT"
CMD_COUNT = "NODE_SOCKET_COUNT"

_ACK_LINE = b'{"cmd":"NODE_HANDLE_ACK"}\n'
_NACK_LINE = b'{"cmd":"NODE_HANDLE_NACK"}\n'

# Node resends a NACKed net.Socket at most 3 times (MAX_HANDLE_RETRANSMISSIONS,
# child_process.js:83); we resend any NACKed handle as often, then fail.
MAX_RETRANSMISSIONS = 3
# Node nests a resent envelope in another (§3.5); deeper nesting is garbage.
MAX_ENVELOPE_DEPTH = 4
# fds that arrived with no NODE_HANDLE to claim them yet (Node keeps them for
# the next one, §3.2). A peer could otherwise pile up fds without limit.
MAX_PENDING_FDS = 16

# Descriptor kind for a handle received from Node: a socket whose family and
# type come from the fd itself (the envelope only says "net.Socket"); byte 1
# says what the envelope type requires, byte 2 the family for dgram types
# (0: any). See ipcbus/_handles.py.
KIND_NODE_SOCKET = 4
NODE_REQ_LISTENING = 1  # net.Server
NODE_REQ_CONNECTED = 2  # net.Socket
NODE_REQ_STREAM = 3  # net.Native: TCP or Pipe wrap, listening or not
NODE_REQ_DGRAM = 4  # dgram.Socket / dgram.Native
_RECV_TYPES = {
    "net.Server": NODE_REQ_LISTENING,
    "net.Socket": NODE_REQ_CONNECTED,
    "net.Native": NODE_REQ_STREAM,
    "dgram.Socket": NODE_REQ_DGRAM,
    "dgram.Native": NODE_REQ_DGRAM,
}
_DGRAM_FAMILIES = {"udp4": 2, "udp6": 3}  # family codes of ipcbus/_handles.py

# Native descriptor bytes (ipcbus/_handles.py): kind 1 socket, family 1 unix /
# 2 inet / 3 inet6, type 1 stream / 2 dgram / 3 seqpacket, listening flag.
_KIND_SOCKET = 1


def _envelope_type(desc: bytes) -> tuple[str, str | None]:
    """The NODE_HANDLE ``type`` (and ``dgramType``) for a handle we send.

    Only what libuv's ``uv_guess_handle`` recognises may go to Node: anything
    else aborts it (a file: SIGABRT) or jams its handle passing for good (an
    AF_UNIX datagram socket), §3.2 and §3.4.
    """
    if len(desc) != 4 or desc[0] != _KIND_SOCKET:
        raise HandleError(
            "Node accepts only TCP, Unix stream and UDP sockets as handles; "
            "a file, pipe or bare fd would crash it"
        )
    family, typ, listening = desc[1], desc[2], desc[3]
    if typ == 1 and family in (1, 2, 3):
        return ("net.Server" if listening else "net.Socket"), None
    if typ == 2 and family in (2, 3):
        return "dgram.Socket", ("udp4" if family == 2 else "udp6")
    what = {1: "Unix", 2: "IPv4", 3: "IPv6"}.get(family, "unknown-family")
    kind = {1: "stream", 2: "datagram", 3: "seqpacket"}.get(typ, "unknown-type")
    raise HandleError(
        f"Node cannot take a {what} {kind} socket (only TCP, Unix stream and UDP sockets)"
    )


# ------------------------------------------------------------------- codec


class _BadConstant(Exception):
    pass


def _refuse_constant(name: str) -> Any:
    raise _BadConstant(name)


def _refuse_type(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_CONTAINERS = (dict, list, tuple)
_CONTAINER_SET = frozenset(_CONTAINERS)


def _has_bad_key(value: Any, depth: int = 0) -> bool:
    # The C encoder turns 1 into "1" silently; that loses information, so
    # non-string keys are refused (like ipcbus's json codec). Only
    # containers are walked: floats and types are checked by the encoder.
    if depth > 500:
        raise CodecError("json: value nested deeper than 500 levels")
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str and not isinstance(key, str):
                return True
            if type(item) in _CONTAINERS and _has_bad_key(item, depth + 1):
                return True
    else:
        for item in value:
            if type(item) in _CONTAINERS and _has_bad_key(item, depth + 1):
                return True
    return False


# The one JSON string encoder both paths use (CPython's C one when present):
# the flat path must write strings byte for byte as the general path does.
_encode_string = _json_encoder.c_encode_basestring or _json_encoder.py_encode_basestring
_float_repr = float.__repr__
# Dicts with at most this many keys get a flat encoder, and at most this many
# shapes are remembered (further ones take the general path).
_MAX_SHAPE_KEYS = 32
_MAX_SHAPES = 256


class _NotFlat(Exception):
    pass


def _scalar(item: Any) -> str:
    # The rarer scalars of a flat dict (str and int are tested inline).
    kind = type(item)
    if kind is float:
        if item - item == 0.0:
            return _float_repr(item)
        raise ValueError("NaN or Infinity")  # an error, not a change of shape
    if kind is bool:
        return "true" if item else "false"
    if item is None:
        return "null"
    raise _NotFlat


_FLAT_MAKERS: dict[int, Callable[..., Callable[[dict[str, Any]], bytes]]] = {}


def _flat_encoder(pieces: tuple[str, ...]) -> Callable[[dict[str, Any]], bytes]:
    """An encoder for dicts with one shape: ``pieces`` are what precedes each
    value (``{"k0":``, ``,"k1":``, ...). It raises _NotFlat for a value that
    is not a JSON scalar, and ValueError for NaN, Infinity, an int too long
    for str() or a lone surrogate."""
    # One f-string with the values unpacked into locals costs about a fifth
    # less than a loop filling a %-template. The source depends only on the
    # number of keys (the keys themselves are closure cells), so it is
    # generated once per size, from no caller data.
    n = len(pieces)
    make = _FLAT_MAKERS.get(n)
    if make is None:
        body = "".join(
            f"{{k{i}}}{{_e(v{i}) if type(v{i}) is str else str(v{i}) if type(v{i}) is int else _scalar(v{i})}}"
            for i in range(n)
        )
        source = (
            f"def make({', '.join(f'k{i}' for i in range(n))}):\n"
            "    def encode(value):\n"
            f"        {''.join(f'v{i}, ' for i in range(n))}= value.values()\n"
            f"        return f'{body}}}}}'.encode()\n"
            "    return encode\n"
        )
        namespace: dict[str, Any] = {"_e": _encode_string, "_scalar": _scalar}
        exec(source, namespace)
        make = _FLAT_MAKERS[n] = namespace["make"]
    return make(*pieces)


class NodeJSONCodec:
    """JSON exactly as Node's json mode reads and writes it (node-ipc.md §2.1).

    Compact, UTF-8, never NaN or Infinity (Node dies of them), lone
    surrogates escaped as ``\\udXXX`` (what ``JSON.stringify`` sends), never
    a raw newline. Non-string keys, sets, bytes and other values JSON cannot
    carry are a CodecError. Decoding refuses NaN and Infinity.

    A flat dict (string keys, JSON scalar values) whose keys come in an order
    seen before takes a faster path that writes the same bytes.
    """

    name = "json"
    requires_trust = False

    def __init__(self) -> None:
        # The encoder is built once: json.dumps with options builds a new
        # one per call, which costs more than the encoding itself.
        self._encode = _json_encoder.c_make_encoder(  # type: ignore[attr-defined]
            None, _refuse_type, _json_encoder.c_encode_basestring, None, ":", ",",
            False, False, False,
        ) if _json_encoder.c_make_encoder is not None else None
        self._fallback = json.JSONEncoder(
            separators=(",", ":"), allow_nan=False, ensure_ascii=False, check_circular=False
        ).encode
        self._ascii = json.JSONEncoder(
            separators=(",", ":"), allow_nan=False, ensure_ascii=True, check_circular=False
        ).encode
        self._decode = json.JSONDecoder(parse_constant=_refuse_constant).decode
        # Key tuple -> its flat encoder, or False for a shape left to the
        # general path. Only tuples of exact str keys are stored, so a key
        # that is not a str never matches one (only an object impersonating
        # a str through __eq__ and __hash__ could).
        self._shapes: dict[tuple[str, ...], Any] = {}

    def encode(self, value: Any) -> bytes:
        # The hot path. For a small message the C encoder's per-call setup
        # (and the checks around it) cost more than the values: a flat dict
        # of a known shape is written by that shape's own encoder instead,
        # in about 30% fewer instructions.
        if type(value) is dict:
            keys = tuple(value)
            flat = self._shapes.get(keys)
            if flat:
                try:
                    return flat(value)
                except _NotFlat:
                    # This shape also carries containers (or other values):
                    # it takes the general path from now on, rather than
                    # raising on the way there again and again.
                    self._shapes[keys] = False
                except ValueError:
                    pass  # the general path reports it, or escapes the surrogate
            elif flat is None:
                payload = self._encode_any(value)
                self._learn(keys, value)
                return payload
        return self._encode_any(value)

    def _learn(self, keys: tuple[Any, ...], value: dict[Any, Any]) -> None:
        # Called once value was encoded: its keys are all str instances.
        shapes = self._shapes
        if not keys or len(keys) > _MAX_SHAPE_KEYS or len(shapes) >= _MAX_SHAPES:
            return
        for key in keys:
            if type(key) is not str:
                return  # a str subclass: too rare to be worth a shape
        if _CONTAINER_SET.isdisjoint(map(type, value.values())):
            pieces = tuple(("," if i else "{") + _encode_string(key) + ":" for i, key in enumerate(keys))
            shapes[keys] = _flat_encoder(pieces)
        else:
            shapes[keys] = False

    def _encode_any(self, value: Any) -> bytes:
        # A flat dict with string keys is checked inline, and only a dict
        # with something to look into is walked.
        if type(value) is dict:
            for key, item in value.items():
                if type(key) is not str or type(item) in _CONTAINER_SET:
                    if _has_bad_key(value):
                        raise CodecError("json cannot carry a non-string map key")
                    break
        elif type(value) in _CONTAINER_SET and _has_bad_key(value):
            raise CodecError("json cannot carry a non-string map key")
        try:
            encode = self._encode
            # CPython always has the C encoder; the fallback is for others.
            text = "".join(encode(value, 0)) if encode is not None else self._fallback(value)
        except (TypeError, ValueError) as exc:
            raise CodecError(f"json cannot encode {type(value).__name__}: {exc}") from exc
        except RecursionError as exc:
            raise CodecError("json: value nested too deeply") from exc
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate: JSON.stringify sends it as an escape (§2.1);
            # the ASCII encoder does the same.
            return self._ascii(value).encode("ascii")

    def decode(self, data: bytes | bytearray | memoryview) -> Any:
        try:
            return self._decode(bytes(data).decode("utf-8"))
        except _BadConstant as exc:
            raise CodecError(f"json: {exc} is not valid JSON") from None
        except (ValueError, RecursionError) as exc:
            raise CodecError(f"undecodable json payload ({len(data)} bytes): {exc}") from exc


# -------------------------------------------------------------- connection


@dataclass(frozen=True, slots=True, kw_only=True)
class NodePeer:
    """What is known of a Node peer without a handshake (the fields of
    :class:`~ipcbus._protocol.HandshakeComplete` that frontends read)."""

    peer_pid: int | None
    peer_codec: str = "json"
    peer_can_carry_handles: bool
    peer_max_message_size: int
    authenticated: bool = False


_OPEN = "OPEN"
_EOF = "EOF"
_ERROR = "ERROR"
_CLOSED = Closed()


class _Tracked:
    """Received net.Socket handles under one socket-list key (§3.6)."""

    __slots__ = ("refs", "waiting")

    def __init__(self) -> None:
        self.refs: list[weakref.ref[Any]] = []
        self.waiting = False  # a NODE_SOCKET_NOTIFY_CLOSE awaits our answer

    def open_count(self) -> int:
        n = 0
        live = []
        for ref in self.refs:
            obj = ref()
            if obj is None:
                continue
            try:
                closed = obj.fileno() < 0
            except (OSError, ValueError):
                closed = True
            if not closed:
                n += 1
                live.append(ref)
        self.refs = live
        return n


class NodeConnection:
    """One end of a Node.js IPC channel (json serialization), without I/O.

    Same interface as the native ``Connection``: feed ``receive_data``, pull
    ``next_event``, queue with ``send``/``send_encoded``, write what
    ``take_output`` returns (its fds on the first byte). ``can_carry_handles``
    says whether the transport can pass fds at all.

    Sending a handle: one per message, a TCP / Unix stream / UDP socket
    (anything else is a HandleError before a byte is queued); every message
    queued after it is held until Node acknowledges it (``awaiting_ack``).
    """

    # Never a batch being delivered (the frontends read the native core's).
    _lazy: Any = None

    internal_prefix = NODE_PREFIX

    def __init__(
        self,
        *,
        can_carry_handles: bool,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        codec: NodeJSONCodec | None = None,
        peer_pid: int | None = None,
    ) -> None:
        if max_message_size < 1024:
            raise ValueError(f"max_message_size must be at least 1024, not {max_message_size}")
        self.codec = codec if codec is not None else NodeJSONCodec()
        self.can_carry_handles = can_carry_handles
        self.max_message_size = max_message_size
        self.max_handles = 1
        # No handshake: the peer is taken as it comes (its pid, if the
        # frontend knows it, e.g. from SO_PEERCRED).
        self.peer = NodePeer(
            peer_pid=peer_pid,
            peer_can_carry_handles=can_carry_handles,
            peer_max_message_size=max_message_size,
        )
        self._prefixes: tuple[str, ...] = (NODE_PREFIX,)
        self._state = _OPEN
        self._error: BaseException | None = None

        # receiving
        self._buf = bytearray()
        self._scan = 0  # no newline in self._buf[:self._scan]
        self._consumed = 0  # stream offset of self._buf[0]
        self._fds: deque[tuple[int, int]] = deque()  # (fd, stream offset where its chunk began)
        self._events: deque[Any] = deque()
        self._eof = False
        self._decode = self.codec._decode
        self._keys: dict[int, str] = {}  # received net.Socket fd -> socket-list key
        self._socket_lists: dict[str, _Tracked] = {}

        # sending
        self._out: deque[list[Any]] = deque()  # [bytearray, fds]
        self._out_size = 0
        # While a handle awaits its ACK: everything sent after it, in order,
        # as [bytearray, fds, in-flight record or None].
        self._behind: deque[list[Any]] | None = None
        self._inflight: list[Any] | None = None  # [line, fd, release, attempts]
        self._closed_for_sending = False

    # ----------------------------------------------------------------- state

    @property
    def state(self) -> str:
        """``OPEN``, ``EOF`` or ``ERROR`` (there is no handshake state)."""
        return self._state

    @property
    def established(self) -> bool:
        return self._state in (_OPEN, _EOF)

    @property
    def handles_allowed(self) -> bool:
        return self.can_carry_handles

    @property
    def awaiting_ack(self) -> bool:
        """True while a handle we sent has not been ACKed or NACKed yet."""
        return self._inflight is not None

    def claim_prefix(self, prefix: str) -> None:
        """Route messages whose ``cmd`` starts with ``prefix`` to
        :class:`InternalMessage` instead of the application's receive path."""
        if not prefix:
            raise ValueError("prefix must not be empty")
        if prefix not in self._prefixes:
            self._prefixes = tuple(sorted((*self._prefixes, prefix), key=len, reverse=True))

    # --------------------------------------------------------------- sending

    def _check_can_send(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed_for_sending:
            raise ChannelClosed("channel closed for sending")

    def send(
        self,
        data: Any,
        handles: Sequence[tuple[bytes, int]] = (),
        *,
        multi: bool = False,
        release: Any = None,
    ) -> None:
        """Queue ``data`` and at most one handle, as a (descriptor, fd) pair.

        With a handle the message goes as a ``NODE_HANDLE`` envelope whose
        ``type`` follows the socket's kind. ``release`` comes back in
        :class:`HandlesReleased` once Node answered (ACK or NACK). Raises
        CodecError (a value JSON cannot carry, or over ``max_message_size``)
        and HandleError (more than one handle, a kind Node cannot take, a
        transport that cannot pass fds), in both cases before anything is
        queued. ``multi`` is accepted for interface parity: Node has no
        handle lists, so the peer receives the one handle alone.
        """
        self._check_can_send()
        if not handles:
            self.send_encoded(self.codec.encode(data))
            return
        if len(handles) > 1:
            raise HandleError(f"Node's protocol carries one handle per message, not {len(handles)}")
        if not self.can_carry_handles:
            raise HandleError("this channel cannot carry handles")
        desc, fd = handles[0]
        htype, dgram_type = _envelope_type(desc)
        envelope: dict[str, Any] = {"cmd": CMD_HANDLE, "type": htype, "msg": data}
        if dgram_type is not None:
            envelope["dgramType"] = dgram_type
        payload = self.codec.encode(envelope)
        self._check_size(len(payload))
        line = bytearray(payload)
        line += b"\n"
        record = [bytes(line), fd, release, 0]
        if self._inflight is not None:
            assert self._behind is not None
            self._behind.append([line, [fd], record])
        else:
            self._start_handle(record, line)

    def _start_handle(self, record: list[Any], line: bytearray) -> None:
        # The envelope starts its own segment, so that its one fd rides on
        # the sendmsg carrying its first byte (§3.2).
        self._out.append([line, [record[1]]])
        self._out_size += len(line)
        self._inflight = record
        self._behind = deque()

    def _check_size(self, n: int) -> None:
        if n > self.max_message_size:
            raise CodecError(f"message of {n} bytes exceeds the max_message_size of {self.max_message_size}")

    def send_encoded(self, payload: bytes) -> int:
        """Queue a message already encoded with ``codec`` (the hot path).

        Returns how many bytes were queued for writing before it.
        """
        if self._error is not None or self._closed_for_sending:
            self._check_can_send()
        n = len(payload)
        if n > self.max_message_size:
            self._check_size(n)
        before = self._out_size
        held = self._behind
        if held is None:
            out = self._out
            if out:
                buf = out[-1][0]
                if len(buf) < SEGMENT_TARGET:
                    buf += payload
                    buf.append(10)  # b"\n", a little cheaper than a second +=
                    self._out_size = before + n + 1
                    return before
            buf = bytearray(payload)
            buf.append(10)
            out.append([buf, []])
            self._out_size = before + n + 1
            return before
        if held and not held[-1][1] and len(held[-1][0]) < SEGMENT_TARGET:
            buf = held[-1][0]
            buf += payload
            buf += b"\n"
        else:
            buf = bytearray(payload)
            buf += b"\n"
            held.append([buf, [], None])
        return before

    def check_can_send(self) -> None:
        """Raise the channel's error, or ChannelClosed once sending is over."""
        if self._error is not None or self._closed_for_sending:
            self._check_can_send()

    def send_encoded_many(self, payloads: list[bytes], max_size: int | None = None) -> None:
        """Queue several messages already encoded with ``codec``, in order
        (a frontend's burst): one join, not one call per message. Nothing is
        queued if one is over the size limit (CodecError). ``max_size``: a
        bound on every payload's size the caller already knows."""
        if self._error is not None or self._closed_for_sending:
            self._check_can_send()
        if max_size is None or max_size > self.max_message_size:
            self._check_size(max(map(len, payloads), default=0))
        if self._behind is not None:
            for payload in payloads:
                self.send_encoded(payload)
            return
        body = b"\n".join(payloads)
        out = self._out
        if out and len(out[-1][0]) < SEGMENT_TARGET:
            buf = out[-1][0]
            buf += body
        else:
            buf = bytearray(body)
            out.append([buf, []])
        buf.append(10)
        self._out_size += len(body) + 1

    def _send_exempt(self, line: bytes) -> None:
        # ACK and NACK never wait behind our own handle: holding them could
        # deadlock two senders (node-v0.x #7466, §3.3).
        out = self._out
        if out and len(out[-1][0]) < SEGMENT_TARGET:
            out[-1][0] += line
        else:
            out.append([bytearray(line), []])
        self._out_size += len(line)

    def _send_internal(self, message: dict[str, Any]) -> None:
        if not self._closed_for_sending:
            self.send_encoded(self.codec.encode(message))

    def _answered(self, acked: bool) -> None:
        record = self._inflight
        if record is None:
            # A surplus ACK is what Node's own resend sends (§3.5): Node
            # asserts on it, we let it pass.
            return
        if not acked and record[3] < MAX_RETRANSMISSIONS and not self._closed_for_sending:
            record[3] += 1
            line = bytearray(record[0])
            self._out.append([line, [record[1]]])
            self._out_size += len(line)
            return
        self._inflight = None
        if record[2] is not None:
            self._events.append(HandlesReleased([record[2]]))
        held, self._behind = self._behind, None
        if not acked:
            if held:
                self._drop_held(held)
            raise HandleError(
                f"the peer did not receive a handle after {MAX_RETRANSMISSIONS + 1} attempts (NACK)"
            )
        # Release what was held, up to and including the next handle.
        while held:
            seg = held.popleft()
            if seg[2] is not None:
                self._start_handle(seg[2], seg[0])
                assert self._behind is not None
                self._behind.extend(held)
                return
            self._out.append([seg[0], []])
            self._out_size += len(seg[0])

    def _drop_held(self, held: deque[list[Any]]) -> None:
        tokens = [seg[2][2] for seg in held if seg[2] is not None and seg[2][2] is not None]
        if tokens:
            self._events.append(HandlesReleased(tokens))

    def take_output(self) -> tuple[bytearray, list[int]] | None:
        """Remove and return the next segment to write: (bytes, fds); the
        fds go with its first byte. None when nothing is ready to go."""
        if not self._out:
            return None
        seg = self._out.popleft()
        self._out_size -= len(seg[0])
        return seg[0], seg[1]

    def drop_output(self) -> list[int]:
        """Forget what is ready to write (the channel is going); return the
        fds it carried (the caller's own: the frontend does not close them)."""
        fds = [fd for seg in self._out for fd in seg[1]]
        self._out.clear()
        self._out_size = 0
        return fds

    @property
    def output_size(self) -> int:
        """Bytes ready to write (held messages are not counted)."""
        return self._out_size

    def queued_segments(self) -> int:
        """How many segments :meth:`take_output` has yet to return."""
        return len(self._out)

    def has_output(self) -> bool:
        return bool(self._out)

    @property
    def releases_pending(self) -> bool:
        """Always False: ``send`` itself waits for Node's answer to a handle."""
        return False

    def withdraw_release(self, token: Any) -> None:
        """Forget ``token`` (by identity): the ``send`` that queued it failed,
        so the handle it names stays the caller's, not ours to close."""
        records = [self._inflight] + [seg[2] for seg in self._behind or ()]
        for record in records:
            if record is not None and record[2] is token:
                record[2] = None

    def take_unreleased(self) -> list[Any]:
        """Remove and return the release tokens of handle messages Node never
        answered (the frontend closes them when the channel goes)."""
        tokens = []
        if self._inflight is not None and self._inflight[2] is not None:
            tokens.append(self._inflight[2])
        for seg in self._behind or ():
            if seg[2] is not None and seg[2][2] is not None:
                tokens.append(seg[2][2])
        self._inflight = None
        self._behind = None
        return tokens

    def close_sending(self) -> None:
        """No more messages will be sent (the frontend is closing)."""
        self._closed_for_sending = True

    # ------------------------------------------------------------- receiving

    def receive_data(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Feed bytes read from the transport and the fds that came with
        them; ``b""`` means EOF. Errors come out of :meth:`next_event`, after
        every message that preceded them."""
        if fds:
            start = self._consumed + len(self._buf)
            for fd in fds:
                self._fds.append((fd, -1 if self._eof else start))
        if self._eof:
            return
        if not data:
            self._eof = True
        elif self._error is None:
            self._buf += data
        if self._error is None:
            try:
                if len(fds) > 1:
                    # Linux never merges two fd-carrying writes into one read
                    # (§3.2): several fds here came from one sendmsg, which
                    # Node's protocol never does.
                    raise HandleError(f"{len(fds)} fds arrived with one write; Node sends one")
                if len(self._fds) > MAX_PENDING_FDS:
                    raise HandleError(
                        f"{len(self._fds)} fds arrived with no NODE_HANDLE message to claim them"
                    )
                self._parse()
            except (ProtocolError, HandleError, CodecError) as exc:
                self._fail(exc)

    def next_event(self) -> Any:
        """The next event, or NEED_DATA. Raises the channel's error (sticky)
        once every event that came before it has been returned."""
        if self._events:
            return self._events.popleft()
        if self._error is not None:
            raise self._error
        if self._state == _EOF:
            return _CLOSED
        if self._socket_lists:
            self._answer_notify()
        return NEED_DATA

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self._state = _ERROR

    def fail_locally(self, exc: BaseException) -> None:
        """Put the connection in the error state (a frontend saw a fault)."""
        if self._error is None:
            self._fail(exc)

    def unclaimed_fds(self) -> list[int]:
        """Remove and return every received fd no message has claimed; the
        frontend closes them (on close, or after an error)."""
        fds = [fd for fd, _ in self._fds]
        self._fds.clear()
        return fds

    def _parse(self) -> None:
        buf = self._buf
        end = buf.rfind(b"\n", self._scan)
        if end < 0:
            self._scan = len(buf)
            if len(buf) > self.max_message_size:
                raise ProtocolError(
                    f"message of over {len(buf)} bytes with no end in sight exceeds "
                    f"max_message_size {self.max_message_size}"
                )
            if self._eof:
                self._at_eof()
            return
        try:
            # One decode and split for the whole chunk: far cheaper than one
            # per line. Only b"\n" delimits (U+2028 stays inside a string).
            text = buf[:end].decode("utf-8")
        except UnicodeDecodeError:
            text = None
        pos = 0
        try:
            if text is not None:
                for line in text.split("\n"):
                    self._line(line, pos)
                    # Offsets are in bytes (fds are placed by stream offset).
                    pos += (len(line) if line.isascii() else len(line.encode("utf-8"))) + 1
            else:
                while pos <= end:
                    nl = buf.find(b"\n", pos)
                    raw = bytes(buf[pos:nl])
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise ProtocolError(
                            f"message of {len(raw)} bytes is not valid UTF-8: {exc.reason} at byte {exc.start}"
                        ) from None
                    self._line(line, pos)
                    pos = nl + 1
        finally:
            del buf[:pos]
            self._consumed += pos
            self._scan = 0
        if len(buf) > self.max_message_size:
            raise ProtocolError(
                f"message of over {len(buf)} bytes exceeds max_message_size {self.max_message_size}"
            )
        self._scan = len(buf)
        if self._eof:
            self._at_eof()

    def _at_eof(self) -> None:
        rest = bytes(self._buf).strip()
        if rest:
            raise ProtocolError(f"EOF inside a message: {len(rest)} bytes without their newline")
        if self._fds:
            raise HandleError(f"{len(self._fds)} fd(s) arrived with no NODE_HANDLE message to claim them")
        self._state = _EOF

    def _line(self, line: str, offset: int) -> None:
        if len(line) > self.max_message_size:
            raise ProtocolError(
                f"message of {len(line)} characters exceeds max_message_size {self.max_message_size}"
            )
        try:
            value = self._decode(line)
        except _BadConstant as exc:
            raise ProtocolError(f"message is not valid JSON: {exc} (Node never sends it)") from None
        except ValueError as exc:
            if not line.strip():
                raise ProtocolError("empty line: Node's protocol has none (it would kill Node)") from None
            raise ProtocolError(f"message of {len(line)} characters is not valid JSON: {exc}") from None
        except RecursionError:
            raise ProtocolError(f"message of {len(line)} characters is nested too deeply") from None
        if type(value) is dict:
            cmd = value.get("cmd")
            if type(cmd) is str and cmd.startswith(self._prefixes):
                self._internal(value, cmd, self._consumed + offset)
                return
        self._events.append(Message(value, None))

    def _prefix_of(self, cmd: str) -> str | None:
        for prefix in self._prefixes:
            if cmd.startswith(prefix):
                if prefix == NODE_PREFIX and len(cmd) == len(NODE_PREFIX):
                    continue  # exactly "NODE_" is an ordinary message in Node (§4)
                return prefix
        return None

    def _internal(self, value: dict[str, Any], cmd: str, offset: int) -> None:
        prefix = self._prefix_of(cmd)
        if prefix is None:
            self._events.append(Message(value, None))
        elif cmd == CMD_HANDLE:
            self._handle_envelope(value, offset)
        elif cmd in (CMD_ACK, CMD_NACK):
            self._answered(cmd == CMD_ACK)
        elif cmd == CMD_NOTIFY_CLOSE:
            key = value.get("key")
            tracked = self._socket_lists.get(key) if isinstance(key, str) else None
            if tracked is None:
                self._send_internal({"cmd": CMD_ALL_CLOSED, "key": key})
            else:
                tracked.waiting = True
                self._answer_notify()
        elif cmd == CMD_GET_COUNT:
            key = value.get("key")
            tracked = self._socket_lists.get(key) if isinstance(key, str) else None
            count = tracked.open_count() if tracked is not None else 0
            self._send_internal({"cmd": CMD_COUNT, "key": key, "count": count})
        else:
            self._events.append(InternalMessage(prefix, value, [], False))

    def _handle_envelope(self, envelope: dict[str, Any], offset: int) -> None:
        fd = None
        # The fd rides with the first byte of its envelope, so it came with
        # a chunk that began at or before the envelope's line (§3.2).
        if self._fds and self._fds[0][1] <= offset:
            fd = self._fds.popleft()[0]
        if fd is None:
            # Node drops such a message after its NACK (§3.3).
            self._send_exempt(_NACK_LINE)
            return
        self._send_exempt(_ACK_LINE)
        # Accept Node's resend form, an envelope inside an envelope (§3.5):
        # one fd, one ACK, the innermost type and message.
        inner = envelope
        for _ in range(MAX_ENVELOPE_DEPTH):
            msg = inner.get("msg")
            if type(msg) is dict and msg.get("cmd") == CMD_HANDLE:
                inner = msg
            else:
                break
        htype = inner.get("type")
        req = _RECV_TYPES.get(htype) if isinstance(htype, str) else None
        if req is None:
            self._fds.appendleft((fd, -1))  # closed by the frontend with the channel
            raise ProtocolError(f"NODE_HANDLE of unknown type {htype!r}")
        family = 0
        if req == NODE_REQ_DGRAM:
            family = _DGRAM_FAMILIES.get(inner.get("dgramType"), 0)  # type: ignore[arg-type]
        desc = bytes([KIND_NODE_SOCKET, req, family, 0])
        key = inner.get("key")
        if htype == "net.Socket" and isinstance(key, str):
            self._keys[fd] = key
        msg = inner.get("msg")
        cmd = msg.get("cmd") if type(msg) is dict else None
        prefix = self._prefix_of(cmd) if type(cmd) is str else None
        if prefix is not None:
            self._events.append(InternalMessage(prefix, msg, [(desc, fd)], False))
        else:
            self._events.append(RawMessage(msg, [(desc, fd)], False))

    # ----------------------------------------------------- socket lists (§3.6)

    def on_restored(self, event: Any, objects: Sequence[Any]) -> None:
        """The frontend turned ``event``'s fds into ``objects``.

        Received ``net.Socket`` handles that carry a socket-list key are
        tracked (weakly) so that Node's ``server.close()`` and
        ``getConnections()`` can be answered: ``NODE_SOCKET_COUNT`` counts
        the ones not closed yet, and ``NODE_SOCKET_ALL_CLOSED`` is sent once
        all of them are closed. The core cannot see a close happen, so that
        answer goes out at the channel's next receive (any ``recv`` that has
        to wait for data) after the last one was closed or collected.
        """
        if not self._keys:
            return
        for (_desc, fd), obj in zip(event.handles, objects, strict=False):
            key = self._keys.pop(fd, None)
            if key is not None:
                tracked = self._socket_lists.get(key)
                if tracked is None:
                    tracked = self._socket_lists[key] = _Tracked()
                try:
                    tracked.refs.append(weakref.ref(obj))
                except TypeError:
                    pass  # an object without weakref support cannot be tracked

    def _answer_notify(self) -> None:
        for key, tracked in list(self._socket_lists.items()):
            if tracked.open_count() == 0:
                if tracked.waiting:
                    self._send_internal({"cmd": CMD_ALL_CLOSED, "key": key})
                del self._socket_lists[key]


def is_node_internal(value: Any) -> bool:
    """Node's own rule for "this goes to internalMessage" (§4)."""
    if type(value) is not dict:
        return False
    cmd = value.get("cmd")
    return type(cmd) is str and len(cmd) > len(NODE_PREFIX) and cmd.startswith(NODE_PREFIX)
