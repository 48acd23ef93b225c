"""The sans-IO core of the native ipcbus protocol (docs/PROTOCOL.md).

Nothing here does I/O: bytes and received file descriptor numbers go in
through :meth:`Connection.receive_data`, events come out of
:meth:`Connection.next_event`, and messages to send go in through
:meth:`Connection.send`, coming out as segments of bytes (with the fds that
must ride on their first byte) from :meth:`Connection.take_output`. Both
frontends and every transport share this one implementation, so framing,
ordering, batching and limits are written and tested once.

The core never closes a file descriptor: it cannot (no ``os``). Where fds
must be closed (a bad frame, a channel torn down with fds unclaimed) it says
so, through :class:`HandlesReleased` and :meth:`Connection.unclaimed_fds`.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from bisect import bisect_right
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, NamedTuple

import msgpack

from ._errors import (
    AuthenticationError,
    ChannelClosed,
    CodecError,
    HandleError,
    HandshakeError,
    ProtocolError,
)
from ._fastpath import ACCELERATED, CoreSlots, messages
from ._message import Message
from .codecs import Codec, MsgpackCodec

__all__ = [
    "Closed",
    "Connection",
    "HandlesReleased",
    "HandshakeComplete",
    "InternalMessage",
    "NEED_DATA",
    "RawMessage",
]

MAGIC = b"IPCB"
VERSION = 1

# Hello: magic, version, flags, body length, pid; the body is
# u8 codec-name length, codec name, u32 max_message_size, u8 nonce length, nonce.
HELLO = struct.Struct(">4sBBHI")
HELLO_FLAG_HANDLES = 0x01
HELLO_FLAG_AUTH = 0x02
MAX_HELLO_BODY = 512

# Frame: payload length, frame type, number of handles, reserved (zero).
FRAME = struct.Struct(">IBBH")
FRAME_DATA = 0
FRAME_CONTROL = 1
FRAME_AUTH = 2
FRAME_BATCH = 3
# A batch frame packs many plain messages of a self-delimiting codec; it is
# capped below SEGMENT_TARGET so that a burst still leaves in early writes.
BATCH_TARGET = 64 * 1024
# A frame at least this large is gathered in a buffer of its own size (one
# allocation; the frontend reads straight into it).
BIG_FRAME = 256 * 1024
# The largest such buffer a connection keeps for the next large frame.
SPARE_MAX = 16 * 1024 * 1024
# Messages larger than this are framed alone: batching them saves nothing.
BATCH_MESSAGE_MAX = 16 * 1024
# Every receiver accepts a frame of BATCH_TARGET bytes, so a sender can batch
# before it has seen the peer's hello.
MIN_MAX_MESSAGE_SIZE = BATCH_TARGET
HANDLE_DESCRIPTOR_SIZE = 4
# Without the accelerator, lone_message decodes msgpack payloads up to this
# size with a kept Unpacker.
ONE_UNPACKER_MAX = 64 * 1024
# The handle block's first byte (PROTOCOL.md §4.1): the sender passed a list;
# the sender wants an IPCBUS_ACK for this frame (it releases its copies then:
# keep_open=False). Frames without HANDLES_ACK are never acknowledged, so a
# stream of handles costs the receiver no writes and the sender no reads.
HANDLES_LIST = 0x01
HANDLES_ACK = 0x02
_HANDLE_FLAGS = HANDLES_LIST | HANDLES_ACK
_FLAG_BYTES = [bytes([i]) for i in range(_HANDLE_FLAGS + 1)]

# 64 MiB, like the design card; multiprocessing has no limit at all, h11
# bounds incomplete events at 16 KiB: ours must carry real payloads.
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
# 16 handles per message by default; Linux refuses more than SCM_MAX_FD (253)
# in one sendmsg, so no setting may go above it.
DEFAULT_MAX_HANDLES = 16
SCM_MAX_FD = 253
# Plain frames are coalesced into segments up to this size: big enough that
# a syscall is amortised over hundreds of small messages, small enough that
# the first bytes leave early.
SEGMENT_TARGET = 256 * 1024

DEFAULT_INTERNAL_PREFIX = "IPCBUS_"
CONTROL_ACK = "IPCBUS_ACK"
CONTROL_PING = "IPCBUS_PING"
CONTROL_PONG = "IPCBUS_PONG"

NONCE_SIZE = 32
AUTH_LABEL = b"ipcbus-auth-v1"


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Any = _NeedData()


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeComplete:
    """The peer's hello was accepted (and, with a key, it authenticated)."""

    peer_pid: int
    peer_codec: str
    peer_can_carry_handles: bool
    peer_max_message_size: int
    authenticated: bool


class RawMessage(NamedTuple):
    """A message that carried handles; the frontend turns ``handles``
    (descriptor bytes, fd) into objects. ``multi`` is true when the sender
    passed a list of handles rather than one. (A named tuple: one is made
    per handle received, and a frozen dataclass costs three times as much.)"""

    data: Any
    handles: list[tuple[bytes, int]]
    multi: bool


@dataclass(frozen=True, slots=True)
class InternalMessage:
    """A message whose ``cmd`` starts with a claimed or reserved prefix."""

    prefix: str
    data: Any
    handles: list[tuple[bytes, int]]
    multi: bool


@dataclass(frozen=True, slots=True)
class HandlesReleased:
    """The peer acknowledged handle-carrying messages sent with a release
    token: the frontend may now close what each token stands for."""

    tokens: list[Any]


@dataclass(frozen=True, slots=True)
class Closed:
    """The peer closed the channel cleanly, at a frame boundary."""


_CLOSED = Closed()
_tuple_new = tuple.__new__  # Message(value, None) without its Python-level __new__


class _LazyBatch:
    """A batch frame queued behind other events, not decoded yet."""

    __slots__ = ("size", "values")

    def __init__(self, values: Iterator[Any], size: int) -> None:
        self.values = values
        self.size = size


# Connection states
_HELLO = "HELLO"
_AUTH = "AUTH"
_OPEN = "OPEN"
_EOF = "EOF"
_ERROR = "ERROR"


class Connection(CoreSlots):
    """One end of a native ipcbus channel, without I/O.

    ``codec`` encodes and decodes application messages. ``can_carry_handles``
    is what this end's transport can do; handles are sent only when both ends
    can. ``authkey``, if given, makes both ends prove knowledge of the key
    (HMAC-SHA256 over the other side's nonce) before any application frame is
    released or read; ``role`` ("client" or "server") is mixed into the proof
    so that it cannot be reflected back. ``nonce`` is required with a key
    (the frontend draws it from ``os.urandom``; the core has no randomness).
    """

    def __init__(
        self,
        codec: Codec,
        *,
        pid: int,
        can_carry_handles: bool,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_handles: int = DEFAULT_MAX_HANDLES,
        internal_prefix: str = DEFAULT_INTERNAL_PREFIX,
        authkey: bytes | None = None,
        nonce: bytes | None = None,
        role: str = "peer",
    ) -> None:
        if not MIN_MAX_MESSAGE_SIZE <= max_message_size < 2**32:
            raise ValueError(
                f"max_message_size must be in {MIN_MAX_MESSAGE_SIZE}..{2**32 - 1}, not {max_message_size}"
            )
        if not 0 <= max_handles <= SCM_MAX_FD:
            raise ValueError(f"max_handles must be in 0..{SCM_MAX_FD} (SCM_MAX_FD), not {max_handles}")
        if not internal_prefix:
            raise ValueError("internal_prefix must not be empty")
        if authkey is not None and (nonce is None or len(nonce) != NONCE_SIZE):
            raise ValueError(f"authentication needs a {NONCE_SIZE}-byte nonce")
        self.codec = codec
        self._decode = codec.decode
        self._one_told = 0
        # (With the accelerator, the codec's own decode is quicker.)
        self._one = self._new_one() if type(codec) is MsgpackCodec and not ACCELERATED else None
        self.pid = pid
        self.can_carry_handles = can_carry_handles
        self.max_message_size = max_message_size
        self.max_handles = max_handles
        self.internal_prefix = internal_prefix
        self._authkey = authkey
        self._nonce = nonce if authkey is not None else b""
        self._role = role.encode()
        self.peer: HandshakeComplete | None = None

        self._state = _HELLO
        self._error: BaseException | None = None
        self._prefixes: tuple[str, ...] = (internal_prefix,)

        # receiving
        self._buf = bytearray()
        self._fds: deque[tuple[int, int]] = deque()  # (fd, stream offset where its chunk ended)
        self._orphans: list[int] = []  # claimed by a frame that then failed
        self._consumed = 0  # stream offset of self._buf[0]
        self._events: deque[Any] = deque()
        # The batch being delivered: an iterator of Messages decoded one at a
        # time, as they are asked for (see _parse_batch); every event in
        # _events comes after it.
        self._lazy: Iterator[Message] | None = None
        self._lazy_batch: _LazyBatch | None = None
        self._eof = False
        self._peer_hello: tuple[int, bytes] | None = None
        self._acks_due = 0
        self._run_end = -2  # chunk end of the fds the last handle frame claimed
        # The payload of a large plain frame, gathered in a buffer of its
        # own size (see receive_buffer), and how much of it has arrived.
        self._big: memoryview | None = None
        self._big_filled = 0
        # The last such buffer, kept for the next large frame: a fresh one
        # costs an allocation and a page fault per 4 KiB every time.
        self._spare = bytearray()

        # sending
        self._out: deque[list[Any]] = deque()  # [bytearray, fds]
        self._held: deque[list[Any]] | None = deque() if authkey is not None else None
        self._out_size = 0
        # The release token of each frame sent with HANDLES_ACK (None once
        # withdrawn by a failed send).
        self._unacked: deque[Any] = deque()
        self._hrun: list[Any] | None = None  # [segment, its length after the last handle frame]
        self.queued_fds = 0  # fds in segments not yet taken by take_output
        self._closed_for_sending = False
        # Small plain messages of a self-delimiting codec are appended here
        # and framed as one BATCH frame when anything else is queued or
        # output is taken.
        self._pending = bytearray()
        self._pending_one = 0  # length of pending's first value
        self._batchable = bool(getattr(codec, "decode_batch", None))
        self.pending_limit = BATCH_MESSAGE_MAX if self._batchable and self._held is None else -1
        self._send_limit = max_message_size
        self._decode_batch = getattr(codec, "decode_batch", None)
        self._msgpack = type(codec) is MsgpackCodec

        self._emit_hello()

    # ----------------------------------------------------------------- state

    @property
    def state(self) -> str:
        """``HELLO``, ``AUTH``, ``OPEN``, ``EOF`` or ``ERROR``."""
        return self._state

    @property
    def established(self) -> bool:
        return self._state in (_OPEN, _EOF)

    @property
    def handles_allowed(self) -> bool:
        """True once both ends are known to be able to carry handles."""
        return self.can_carry_handles and (self.peer is None or self.peer.peer_can_carry_handles)

    def claim_prefix(self, prefix: str) -> None:
        """Route messages whose ``cmd`` starts with ``prefix`` to
        :class:`InternalMessage` instead of the application's receive path."""
        if not prefix:
            raise ValueError("prefix must not be empty")
        if prefix not in self._prefixes:
            # Longest first, so that a claim of "APP_X_" beats "APP_".
            self._prefixes = tuple(sorted((*self._prefixes, prefix), key=len, reverse=True))

    # ----------------------------------------------------------------- sending

    def _emit_hello(self) -> None:
        name = self.codec.name.encode("ascii")
        body = (
            bytes([len(name)])
            + name
            + struct.pack(">I", self.max_message_size)
            + bytes([len(self._nonce)])
            + self._nonce
        )
        flags = (HELLO_FLAG_HANDLES if self.can_carry_handles else 0) | (
            HELLO_FLAG_AUTH if self._authkey is not None else 0
        )
        hello = HELLO.pack(MAGIC, VERSION, flags, len(body), self.pid & 0xFFFFFFFF) + body
        # The hello goes out before anything else, even while frames are held.
        self._out.append([bytearray(hello), []])
        self._out_size += len(hello)

    def send(
        self,
        data: Any,
        handles: Sequence[tuple[bytes, int]] = (),
        *,
        multi: bool = False,
        release: Any = None,
    ) -> None:
        """Queue ``data`` (encoded with the codec) and its handles.

        ``handles`` are (4-byte descriptor, fd) pairs; the fds must stay open
        until :meth:`take_output` has handed them out and they were written.
        ``release`` is any token; it comes back in :class:`HandlesReleased`
        once the peer acknowledged this message. Raises CodecError for a
        value the codec refuses or a message over the peer's size limit,
        HandleError for handles the channel cannot carry.
        """
        if self._error is not None or self._closed_for_sending:
            self._check_can_send()
        payload = self.codec.encode(data)
        if not handles:
            self.send_encoded(payload)
            return
        self._queue_handles(payload, handles, multi, release)

    def send_encoded(self, payload: bytes) -> int:
        """Queue an already-encoded plain message (the hot path of send).

        Returns how many bytes were queued before this message (0: the
        queue was empty), which the frontend uses to tell a lone send from a
        burst.
        """
        if self._error is not None or self._closed_for_sending:
            self._check_can_send()
        pending = self._pending
        size = len(pending)
        before = self._out_size + size
        n = len(payload)
        if n <= self.pending_limit:
            if size + n > BATCH_TARGET:
                self._seal_pending()
                size = 0
            if not size:
                self._pending_one = n
            pending += payload
            return before
        self._queue_frame(FRAME_DATA, payload, (), False, None)
        return before

    def send_encoded_many(self, payloads: list[bytes], max_size: int | None = None) -> None:
        """Queue several already-encoded plain messages, in order (a
        frontend's burst). Those of a batching codec share BATCH frames
        without being handled one by one here. Nothing is queued if one is
        over the size limit (CodecError). ``max_size``: a bound on every
        payload's size that the caller already knows (a frontend's burst
        list takes only small ones), which saves measuring them."""
        if self._error is not None or self._closed_for_sending:
            self._check_can_send()
        limit = self.pending_limit
        if max_size is None or max_size > limit:
            biggest = max(map(len, payloads), default=0)
            if biggest > self._send_limit:
                raise CodecError(f"message of {biggest} bytes exceeds the max_message_size of {self._send_limit}")
            small = biggest <= limit
        else:
            small = True
        if len(payloads) < 2 or limit < 0 or not small:
            for payload in payloads:
                self.send_encoded(payload)
            return
        pending = self._pending
        joined = b"".join(payloads)
        if len(joined) <= BATCH_TARGET:
            # The common case: one frame's worth, after what pending holds
            # or (if that does not fit too) in a frame of its own.
            if len(pending) + len(joined) > BATCH_TARGET:
                self._seal_pending()
            if not pending:
                self._pending_one = -1  # more than one value: a BATCH frame
            pending += joined
            return
        # More than one batch: cut at value boundaries, BATCH_TARGET bytes
        # at most per frame (bisect over the running sizes).
        self._seal_pending()
        ends = list(accumulate(map(len, payloads)))
        view = memoryview(joined)
        start = 0
        while start < len(payloads):
            base = ends[start - 1] if start else 0
            stop = max(bisect_right(ends, base + BATCH_TARGET), start + 1)
            pending += view[base : ends[stop - 1]]
            self._pending_one = len(pending) if stop - start == 1 else -1
            start = stop
            if start < len(payloads):
                self._seal_pending()
        view.release()

    def check_can_send(self) -> None:
        """Raise the channel's error, or ChannelClosed once sending is over."""
        if self._error is not None or self._closed_for_sending:
            self._check_can_send()

    def direct_header(self, length: int) -> bytes | None:
        """Account for a plain DATA frame of ``length`` payload bytes that the
        frontend writes itself, right after everything already taken from
        :meth:`take_output` (so that a large payload is never copied into a
        segment), and return its header. None when it must be queued like any
        other frame: something is still queued, or frames are held back
        until authentication completes. Raises CodecError over the size limit.
        """
        if self._error is not None or self._closed_for_sending:
            self._check_can_send()
        if self._out or self._pending or self._held is not None:
            return None
        limit = self._send_limit
        if length > limit:
            raise CodecError(f"message of {length} bytes exceeds the max_message_size of {limit}")
        self._hrun = None
        return FRAME.pack(length, FRAME_DATA, 0, 0)

    def _seal_pending(self) -> None:
        # Frame what pending holds, behind everything queued before it. One
        # value goes out as an ordinary DATA frame: the receiver decodes it
        # without setting up a stream decoder (the ping-pong case).
        pending = self._pending
        n = len(pending)
        if not n:
            return
        header = FRAME.pack(n, FRAME_DATA if n == self._pending_one else FRAME_BATCH, 0, 0)
        out = self._out
        if out and len(out[-1][0]) < SEGMENT_TARGET:
            buf = out[-1][0]
            buf += header
            buf += pending
        else:
            buf = bytearray(header)
            buf += pending
            out.append([buf, []])
        self._out_size += n + FRAME.size
        pending.clear()

    def _check_can_send(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed_for_sending:
            raise ChannelClosed("channel closed for sending")

    def _queue_frame(
        self,
        ftype: int,
        payload: bytes,
        handles: Sequence[tuple[bytes, int]],
        multi: bool,
        release: Any,
    ) -> None:
        if handles:
            self._queue_handles(payload, handles, multi, release)
            return
        self._seal_pending()
        length = len(payload)
        limit = self._send_limit
        if length > limit:
            raise CodecError(f"message of {length} bytes exceeds the max_message_size of {limit}")
        out = self._held if (self._held is not None and ftype == FRAME_DATA) else self._out
        header = FRAME.pack(length, ftype, 0, 0)
        if out:
            last = out[-1]
            buf = last[0]
            if len(buf) < SEGMENT_TARGET:
                buf += header
                buf += payload
                if out is self._out:
                    self._out_size += length + 8
                return
        seg = bytearray(header)
        seg += payload
        out.append([seg, []])
        if out is self._out:
            self._out_size += length + 8

    def _queue_handles(
        self, payload: bytes, handles: Sequence[tuple[bytes, int]], multi: bool, release: Any
    ) -> None:
        if self._pending:
            self._seal_pending()
        n = len(handles)
        length = len(payload) + n * HANDLE_DESCRIPTOR_SIZE + 1
        if length > self._send_limit or n > self.max_handles or not self.handles_allowed:
            self._refuse_handles(length, n)
        if n == 1:
            descs, fd = handles[0]
            fds = [fd]
        else:
            descs = b"".join(d for d, _ in handles)
            fds = [fd for _, fd in handles]
        if len(descs) != n * HANDLE_DESCRIPTOR_SIZE:
            raise HandleError("malformed handle descriptors")
        flags = _FLAG_BYTES[(HANDLES_LIST if multi else 0) | (0 if release is None else HANDLES_ACK)]
        frame = b"".join((FRAME.pack(length, FRAME_DATA, n, 0), flags, descs, payload))
        # A handle frame starts its own segment, so that its fds ride on the
        # sendmsg that carries its first byte; handle frames queued right
        # behind it (nothing else in between, segment not yet taken) join
        # that segment and its fds: a run of handle frames then costs the
        # receiver one recvmsg (PROTOCOL.md §4.1).
        held = self._held
        out = self._out if held is None else held
        run = self._hrun
        if (
            run is not None and out and out[-1] is (seg := run[0]) and len(seg[0]) == run[1]
            and len(seg[1]) + n <= SCM_MAX_FD and run[1] < SEGMENT_TARGET
        ):
            seg[0] += frame
            seg[1] += fds
            run[1] += len(frame)
        else:
            seg = [bytearray(frame), fds]
            out.append(seg)
            self._hrun = [seg, len(frame)]
        if held is None:
            self._out_size += length + 8
            self.queued_fds += n
        if release is not None:
            self._unacked.append(release)

    def _refuse_handles(self, length: int, n: int) -> None:
        if length > self._send_limit:
            raise CodecError(f"message of {length} bytes exceeds the max_message_size of {self._send_limit}")
        if n > self.max_handles:
            raise HandleError(f"{n} handles in one message; the limit is {self.max_handles}")
        raise HandleError("this channel cannot carry handles")

    def _send_control(self, message: dict[str, Any]) -> None:
        self._queue_frame(FRAME_CONTROL, msgpack.packb(message), (), False, None)

    def send_ping(self) -> None:
        """Queue a heartbeat ping; the peer's core answers with a pong."""
        self._check_can_send()
        self._send_control({"cmd": CONTROL_PING})

    def take_output(self) -> tuple[bytearray, list[int]] | None:
        """Remove and return the next segment to write: (bytes, fds).

        The fds must be sent with the first byte of the bytes (one sendmsg);
        the rest may follow in later writes. None when nothing is queued.
        """
        if self._pending:
            self._seal_pending()
        if not self._out:
            return None
        seg = self._out.popleft()
        self._out_size -= len(seg[0])
        if seg[1]:
            self.queued_fds -= len(seg[1])
        return seg[0], seg[1]

    def drop_output(self) -> list[int]:
        """Forget everything queued and not yet taken (the channel is going):
        the fds it carried, which the frontend closes if they are its own.
        Frames held back until authentication count too."""
        fds = [fd for seg in self._out for fd in seg[1]]
        if self._held is not None:
            fds += [fd for seg in self._held for fd in seg[1]]
            self._held.clear()
        self._out.clear()
        self._pending.clear()
        self._out_size = 0
        self.queued_fds = 0
        self._hrun = None
        return fds

    def queued_segments(self) -> int:
        """How many segments :meth:`take_output` has yet to return (what is
        being batched is framed first, so the count is exact)."""
        if self._pending:
            self._seal_pending()
        return len(self._out)

    @property
    def output_size(self) -> int:
        """Bytes queued and not yet taken by :meth:`take_output`."""
        return self._out_size + len(self._pending)

    def has_output(self) -> bool:
        return bool(self._out or self._pending)

    @property
    def releases_pending(self) -> bool:
        """Handle messages sent with a release token are not all acknowledged."""
        return bool(self._unacked)  # (a withdrawn placeholder costs one needless read)

    def withdraw_release(self, token: Any) -> None:
        """Forget ``token`` (by identity): the ``send`` that queued it failed,
        so the handles it names stay the caller's, not ours to close."""
        for i, t in enumerate(self._unacked):
            if t is token:
                # Keep the frame's place: an ACK may still count it.
                self._unacked[i] = None
                return

    def take_unreleased(self) -> list[Any]:
        """Remove and return the release tokens of handle messages the peer
        never acknowledged (the frontend closes them when the channel goes)."""
        tokens = [t for t in self._unacked if t is not None]
        self._unacked.clear()
        return tokens

    def close_sending(self) -> None:
        """No more messages will be sent (the frontend is closing)."""
        self._closed_for_sending = True

    # --------------------------------------------------------------- receiving

    def receive_data(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Feed bytes read from the transport, with the fds that came with
        them (in order). ``b""`` means EOF. Parsing happens here; errors are
        raised from :meth:`next_event`, in stream order."""
        if not fds:
            message = self.lone_message(data)
            if message is not None:
                self._events.append(message)
                return
        self.feed(data, fds)

    def _new_one(self) -> Any:
        # The decoder of lone_message (msgpack only), with the codec's options.
        self._one_told = 0
        return msgpack.Unpacker(strict_map_key=False, max_buffer_size=ONE_UNPACKER_MAX)

    def lone_message(self, data: bytes | bytearray | memoryview) -> Message | None:
        """The round trip's shortcut: when ``data`` (read with no fds) is
        exactly one plain frame for the application and nothing is buffered
        before it, consume it and return its Message, parsed from the read
        itself without copying it into the buffer. Else None, with nothing
        consumed: feed ``data`` with :meth:`feed` (a value that does not
        decode, or an internal message, is then handled there).

        It touches only the receiving side's state, so a frontend may call
        it holding its reader's lock alone, not the lock its senders take.
        Messages parsed before ``data`` and not yet taken must be taken first.
        """
        if self._buf or self._state is not _OPEN or len(data) <= 8 or self._fds or self._big is not None:
            return None
        length, ftype, nh, reserved = FRAME.unpack_from(data)
        if length + 8 != len(data) or ftype or nh or reserved or length > self.max_message_size:
            return None
        one = self._one
        if one is not None and length <= ONE_UNPACKER_MAX:
            # msgpack: a kept Unpacker decodes one small value in about two
            # thirds of the time of unpackb, which sets one up per call.
            told = self._one_told + length
            try:
                one.feed(data[8:])
                value = one.unpack()
            except Exception:  # msgpack raises several unrelated types
                value = told = -1
            if one.tell() != told:  # bad, cut short or followed by more
                self._one = self._new_one()
                return None
            self._one_told = told
        else:
            try:
                # A slice of a small read costs less than a memoryview (which
                # the decoder then handles more slowly).
                value = self._decode(data[8:] if length < 4096 else memoryview(data)[8:])
            except CodecError:
                return None
        if type(value) is dict:
            cmd = value.get("cmd")
            if type(cmd) is str and cmd.startswith(self._prefixes):
                return None
        self._consumed += length + 8
        return _tuple_new(Message, (value, None))

    def feed(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """:meth:`receive_data` without its :meth:`lone_message` shortcut, for
        a frontend that already tried that shortcut on ``data`` itself."""
        if self._big is not None and data and not self._eof:
            data = self._fill_big(data)
            if not data and not fds:
                return
        if self._eof:
            if data or fds:
                # Nothing can follow EOF; whatever fds came are not ours to keep.
                self._fds.extend((fd, -1) for fd in fds)
            return
        if not data:
            self._eof = True
            if fds:
                self._fds.extend((fd, -1) for fd in fds)
        else:
            self._buf += data
            if fds:
                end = self._consumed + len(self._buf)
                self._fds.extend((fd, end) for fd in fds)
        if self._error is None:
            try:
                self._parse()
            except (ProtocolError, HandleError, CodecError) as exc:
                self._fail(exc)

    def receive_buffer(self) -> memoryview | None:
        """Where the next bytes from the transport may be read directly: the
        rest of a large frame's payload, or None (use :meth:`receive_data`).
        After reading into it, call :meth:`received_into`."""
        if self._big is None or self._error is not None:
            return None
        return self._big[self._big_filled :]

    def received_into(self, nbytes: int, fds: Sequence[int] = ()) -> None:
        """``nbytes`` were read into the buffer :meth:`receive_buffer`
        returned, with ``fds`` (0 bytes: EOF)."""
        if not nbytes:
            self.receive_data(b"", fds)
            return
        self._big_filled += nbytes
        self._consumed += nbytes
        if fds:
            # No frame can claim them (a plain frame was being read): the
            # next parse reports them.
            self._fds.extend((fd, self._consumed) for fd in fds)
        if self._big_filled == len(self._big or b""):
            self._finish_big()
            if self._error is None:
                try:
                    self._check_unclaimed()
                except HandleError as exc:
                    self._fail(exc)

    def _fill_big(self, data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
        # Bytes of a large frame's payload arrived through receive_data:
        # copy them in; return what follows the frame.
        big = self._big
        assert big is not None
        filled = self._big_filled
        take = min(len(data), len(big) - filled)
        view = memoryview(data)
        big[filled : filled + take] = view[:take]
        self._big_filled = filled + take
        self._consumed += take
        if self._big_filled == len(big):
            self._finish_big()
        return view[take:] if take < len(data) else b""

    def _finish_big(self) -> None:
        big = self._big
        self._big = None
        self._big_filled = 0
        if self._error is None:
            message = self._plain_message(big)
            if message is not None:
                self._events.append(message)

    def _plain_message(self, payload: bytes | bytearray | memoryview) -> Message | None:
        # A large frame's whole payload, outside _parse's loop: its Message,
        # or None when it was internal (routed to the events) or did not
        # decode (the connection failed, as in _parse).
        try:
            value = self.codec.decode(payload)
        except CodecError as exc:
            self._fail(exc)
            return None
        if type(value) is dict:
            cmd = value.get("cmd")
            if type(cmd) is str and cmd.startswith(self._prefixes):
                self._events.append(self._internal(value, [], False))
                return None
        return _tuple_new(Message, (value, None))

    def next_event(self) -> Any:
        """The next event, or NEED_DATA. Raises the channel's error (sticky)
        once every event that came before it has been returned."""
        events = self._events
        while True:
            if self._lazy is not None:
                try:
                    for message in self._lazy:
                        return message
                except Exception as exc:  # msgpack raises several unrelated types
                    self.batch_failed(exc)
                else:
                    self._end_lazy()
                continue
            if not events:
                break
            ev = events.popleft()
            if type(ev) is not _LazyBatch:
                return ev
            self._start_lazy(ev)
        if self._error is not None:
            raise self._error
        if self._state == _EOF:
            return _CLOSED
        return NEED_DATA

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self._state = _ERROR

    def fail_locally(self, exc: BaseException) -> None:
        """Put the connection in the error state (a frontend saw a fault)."""
        self._lazy = self._lazy_batch = None  # nobody will ask for the rest
        if self._error is None:
            self._fail(exc)

    def _start_lazy(self, batch: _LazyBatch) -> None:
        self._lazy_batch = batch
        self._lazy = messages(batch.values)

    def _end_lazy(self) -> None:
        # Every value of the batch was delivered (one cut short by the end of
        # the batch is an error of the iterator's, not an end).
        self._lazy = self._lazy_batch = None

    def batch_failed(self, exc: BaseException) -> None:
        """A value of the batch being delivered did not decode (a frontend
        reading ``_lazy`` itself reports it here): the channel fails there."""
        size = self._lazy_batch.size if self._lazy_batch is not None else 0
        self._lazy = self._lazy_batch = None
        self._batch_error(CodecError(f"undecodable msgpack batch ({size} bytes): {exc}"))

    def _batch_error(self, exc: CodecError) -> None:
        # The stream is broken inside the batch: what was parsed after it
        # never happened, except acknowledgements of our own handles (their
        # release is due whatever follows). Fds it carried are closed.
        kept = []
        for ev in self._events:
            if type(ev) is HandlesReleased:
                kept.append(ev)
            elif type(ev) is RawMessage or type(ev) is InternalMessage:
                self._orphans.extend(fd for _, fd in ev.handles)
        self._events.clear()
        self._events.extend(kept)
        self._fail(exc)

    def unclaimed_fds(self) -> list[int]:
        """Remove and return every received fd no frame has claimed; the
        frontend closes them (on close, or after an error)."""
        fds = self._orphans + [fd for fd, _ in self._fds]
        self._fds.clear()
        self._orphans = []
        return fds

    def _parse(self) -> None:
        if self._state == _HELLO and self._eof and not self._buf:
            # The peer went away without a word: a close, not a bad hello.
            self._check_unclaimed()
            self._state = _EOF
            return
        if self._state == _HELLO and not self._parse_hello():
            return self._check_unclaimed()
        if self._state == _AUTH and not self._parse_auth():
            return self._check_unclaimed()
        buf = self._buf
        pos = 0
        total = len(buf)
        events = self._events
        unpack = FRAME.unpack_from
        maxsize = self.max_message_size
        decode = self.codec.decode
        prefixes = self._prefixes
        view = memoryview(buf)
        try:
            while total - pos >= 8:
                length, ftype, nh, reserved = unpack(buf, pos)
                if length > maxsize:
                    raise ProtocolError(
                        f"frame of {length} bytes exceeds max_message_size {maxsize}"
                    )
                end = pos + 8 + length
                if end > total:
                    if length >= BIG_FRAME and not (ftype or nh or reserved or self._fds):
                        # A large plain frame: its payload is gathered in a
                        # buffer of its own, which the frontend may read
                        # into directly (receive_buffer), not by growing
                        # and shifting this one.
                        if not length <= len(self._spare) <= 2 * length:
                            self._spare = bytearray(length if length <= SPARE_MAX else 0)
                        big = memoryview(self._spare)[:length] if self._spare else memoryview(bytearray(length))
                        have = total - pos - 8
                        big[:have] = view[pos + 8 : total]
                        self._big = big
                        self._big_filled = have
                        pos = total
                    break
                if nh == 0 and ftype == FRAME_DATA and not reserved:
                    if self._fds:
                        self._check_fd_offsets(self._consumed + pos)
                    value = decode(view[pos + 8 : end])
                    if type(value) is dict:
                        cmd = value.get("cmd")
                        if type(cmd) is str and cmd.startswith(prefixes):
                            events.append(self._internal(value, [], False))
                            pos = end
                            continue
                    events.append(_tuple_new(Message, (value, None)))
                elif nh == 1 and ftype == FRAME_DATA and not reserved and length > 5 and self._fds and (
                    (claim := self._fds[0])[1] > self._consumed + pos or claim[1] == self._run_end
                ) and view[pos + 8] <= _HANDLE_FLAGS and self.max_handles:
                    # The common handle frame (one fd, claimed in order),
                    # inline; anything unusual takes _parse_other's path.
                    self._fds.popleft()
                    self._run_end = claim[1]
                    flags = view[pos + 8]
                    if flags & HANDLES_ACK:
                        self._acks_due += 1
                    try:
                        value = decode(view[pos + 13 : end])
                    except CodecError:
                        self._orphans.append(claim[0])
                        raise
                    handles = [(bytes(view[pos + 9 : pos + 13]), claim[0])]
                    if type(value) is dict:
                        cmd = value.get("cmd")
                        if type(cmd) is str and cmd.startswith(prefixes):
                            events.append(self._internal(value, handles, bool(flags & HANDLES_LIST)))
                            pos = end
                            continue
                    events.append(_tuple_new(RawMessage, (value, handles, bool(flags & HANDLES_LIST))))
                else:
                    self._parse_other(view, pos, length, ftype, nh, reserved)
                pos = end
        finally:
            view.release()
            if pos:
                try:
                    del buf[:pos]
                except BufferError:
                    # A decoder's exception (its traceback) still holds a
                    # slice of the buffer, which then cannot be resized.
                    buf = self._buf = buf[pos:]
                self._consumed += pos
        if self._acks_due:
            self._send_control({"cmd": CONTROL_ACK, "n": self._acks_due})
            self._acks_due = 0
        if self._eof:
            if buf or self._big is not None:
                raise ProtocolError(
                    f"truncated frame: EOF after {len(buf) + self._big_filled + (8 if self._big is not None else 0)}"
                    " bytes of an incomplete frame"
                )
            self._check_unclaimed()
            self._state = _EOF
        else:
            self._check_unclaimed()

    def _check_fd_offsets(self, frame_start: int) -> None:
        # Called for a frame without handles while fds are queued. An fd
        # rides with the first byte of its frame (or of the run of handle
        # frames it belongs to), so an fd whose chunk ended at or before
        # this frame's start was claimed by no frame. This frame also ends
        # any run of handle frames.
        self._run_end = -2
        if self._fds[0][1] <= frame_start:
            stray = [fd for fd, end in self._fds if end <= frame_start]
            raise HandleError(f"{len(stray)} fd(s) arrived with no frame claiming them")

    def _check_unclaimed(self) -> None:
        if not self._fds:
            return
        if self._eof:
            raise HandleError(f"{len(self._fds)} fd(s) arrived with no frame claiming them")
        if not self._buf and self._fds[0][1] != self._run_end:
            # (Fds left from a run of handle frames wait for the rest of the
            # run: the kernel may have split its sendmsg between frames.)
            self._check_fd_offsets(self._consumed)

    def _parse_other(
        self, view: memoryview, pos: int, length: int, ftype: int, nh: int, reserved: int
    ) -> None:
        if reserved:
            raise ProtocolError(f"reserved header field is {reserved:#x}, must be 0")
        start = pos + 8
        end = start + length
        handles = []
        multi = False
        if nh:
            if ftype != FRAME_DATA:
                raise ProtocolError(f"frame type {ftype} cannot carry handles")
            if nh > self.max_handles:
                raise HandleError(f"frame carries {nh} handles; the limit is {self.max_handles}")
            fds = self._claim(nh, self._consumed + pos)
            meta = 1 + nh * HANDLE_DESCRIPTOR_SIZE
            if length < meta:
                self._orphans.extend(fds)
                raise ProtocolError(f"frame of {length} bytes too short for {nh} handle descriptors")
            flags = view[start]
            if flags > _HANDLE_FLAGS:
                self._orphans.extend(fds)
                raise ProtocolError(f"handle block flags {flags:#04x}: only bits 0 and 1 are defined")
            multi = bool(flags & HANDLES_LIST)
            descs = bytes(view[start + 1 : start + meta])
            handles = [
                (descs[i * 4 : i * 4 + 4], fd) for i, fd in enumerate(fds)
            ]
            start += meta
            if flags & HANDLES_ACK:
                self._acks_due += 1
        elif self._fds:
            self._check_fd_offsets(self._consumed + pos)
        if ftype == FRAME_DATA:
            try:
                value = self.codec.decode(view[start:end])
            except CodecError:
                self._orphans.extend(fd for _, fd in handles)
                raise
            cmd = value.get("cmd") if type(value) is dict else None
            if type(cmd) is str and cmd.startswith(self._prefixes):
                self._events.append(self._internal(value, handles, multi))
            elif handles:
                self._events.append(RawMessage(value, handles, multi))
            else:
                self._events.append(_tuple_new(Message, (value, None)))
        elif ftype == FRAME_BATCH:
            # (The scan reads the buffer in place: a slice would copy it.)
            self._parse_batch(view[start:end], self._msgpack and self._buf.find(b"cmd", start, end) < 0)
        elif ftype == FRAME_CONTROL:
            self._control(view[start:end])
        elif ftype == FRAME_AUTH:
            raise ProtocolError("authentication frame after the handshake")
        else:
            raise ProtocolError(f"unknown frame type {ftype}")

    def _parse_batch(self, payload: memoryview, no_cmd: bool) -> None:
        # no_cmd: a msgpack batch whose bytes do not contain b"cmd".
        if self._decode_batch is None:
            raise ProtocolError(f"batch frame, but the {self.codec.name} codec cannot batch")
        if no_cmd:
            # No value in this batch can have a "cmd" key (however msgpack
            # encodes it, the key's bytes appear), so none is internal: its
            # values are decoded as they are asked for, so that a batch's
            # worth of objects never lives at once (the cyclic GC would
            # walk them over and over). The decoder takes a copy of the payload.
            batch = _LazyBatch(MsgpackCodec._batch_values(payload), len(payload))
            if self._lazy is None and not self._events:
                self._start_lazy(batch)
            else:
                self._events.append(batch)
            return
        values = self._decode_batch(payload)
        append = self._events.append
        prefixes = self._prefixes
        new = tuple.__new__
        for value in values:
            if type(value) is dict:
                cmd = value.get("cmd")
                if type(cmd) is str and cmd.startswith(prefixes):
                    append(self._internal(value, [], False))
                    continue
            append(new(Message, (value, None)))

    def _claim(self, n: int, frame_start: int) -> list[int]:
        # The frame must start inside the chunk its first fd came with, or
        # continue the run of handle frames that claimed that chunk's fds
        # before it (PROTOCOL.md §4.1).
        fds = self._fds
        if fds and fds[0][1] <= frame_start and fds[0][1] != self._run_end:
            self._check_fd_offsets(frame_start)
        if len(fds) < n:
            raise HandleError(
                f"frame declares {n} handle(s) but {len(fds)} fd(s) arrived with it"
            )
        popleft = fds.popleft
        claimed = [popleft() for _ in range(n)]
        self._run_end = claimed[-1][1]
        return [fd for fd, _ in claimed]

    def _internal(self, value: dict[str, Any], handles: list[tuple[bytes, int]], multi: bool) -> Any:
        cmd = value["cmd"]
        for prefix in self._prefixes:
            if cmd.startswith(prefix):
                return InternalMessage(prefix, value, handles, multi)
        raise AssertionError("unreachable")  # pragma: no cover

    def _control(self, payload: memoryview) -> None:
        try:
            message = msgpack.unpackb(payload, raw=False)
        except Exception as exc:
            raise ProtocolError(f"undecodable control frame ({len(payload)} bytes): {exc}") from exc
        cmd = message.get("cmd") if type(message) is dict else None
        if cmd == CONTROL_ACK:
            n = message.get("n")
            if type(n) is not int or not 0 < n <= len(self._unacked):
                raise ProtocolError(
                    f"acknowledgement of {n!r} handle message(s); {len(self._unacked)} in flight"
                )
            tokens = [self._unacked.popleft() for _ in range(n)]
            tokens = [t for t in tokens if t is not None]
            if tokens:
                self._events.append(HandlesReleased(tokens))
        elif cmd == CONTROL_PING:
            if not self._closed_for_sending:
                self._send_control({"cmd": CONTROL_PONG})
        elif cmd == CONTROL_PONG:
            pass  # any frame is proof of life; the frontend times the gaps
        else:
            # Control commands this version does not know are ignored, so a
            # newer peer can add some without breaking the channel.
            pass

    # ------------------------------------------------------------- handshake

    def _parse_hello(self) -> bool:
        buf = self._buf
        head = bytes(buf[:4])
        if not MAGIC.startswith(head):
            raise HandshakeError(f"bad magic {head!r}: this side speaks {MAGIC!r} (ipcbus)")
        if len(buf) < HELLO.size:
            if self._eof:
                raise HandshakeError(f"EOF after {len(buf)} bytes of the peer's hello")
            return False
        _magic, version, flags, body_len, pid = HELLO.unpack_from(buf, 0)
        if version != VERSION:
            raise HandshakeError(f"protocol version: this side {VERSION}, peer {version}")
        if body_len > MAX_HELLO_BODY:
            raise HandshakeError(f"hello body of {body_len} bytes (limit {MAX_HELLO_BODY})")
        if len(buf) < HELLO.size + body_len:
            if self._eof:
                raise HandshakeError(f"EOF inside the peer's hello ({len(buf)} bytes)")
            return False
        body = bytes(buf[HELLO.size : HELLO.size + body_len])
        try:
            n = body[0]
            peer_codec = body[1 : 1 + n].decode("ascii")
            (peer_max,) = struct.unpack_from(">I", body, 1 + n)
            m = body[5 + n]
            nonce = body[6 + n : 6 + n + m]
            if len(nonce) != m or 6 + n + m != body_len:
                raise ValueError("lengths do not add up")
        except (IndexError, ValueError, struct.error) as exc:
            raise HandshakeError(f"malformed hello body ({body_len} bytes): {exc}") from exc
        if peer_codec != self.codec.name:
            raise HandshakeError(f"codec: this side {self.codec.name!r}, peer {peer_codec!r}")
        peer_auth = bool(flags & HELLO_FLAG_AUTH)
        if peer_auth != (self._authkey is not None):
            mine = "requires" if self._authkey is not None else "does not use"
            theirs = "requires" if peer_auth else "does not use"
            raise AuthenticationError(f"authentication: this side {mine} a key, peer {theirs} one")
        if peer_auth and m != NONCE_SIZE:
            raise AuthenticationError(f"authentication nonce of {m} bytes, expected {NONCE_SIZE}")
        if peer_auth and hmac.compare_digest(nonce, self._nonce):
            # A peer that echoes our nonce could reflect our own proof back
            # to us (two "peer" ends compute the same HMAC): refuse it.
            raise AuthenticationError("authentication failed: the peer echoed this side's nonce")
        del buf[: HELLO.size + body_len]
        self._consumed += HELLO.size + body_len
        self._peer_hello = (pid, nonce)
        peer = HandshakeComplete(
            peer_pid=pid,
            peer_codec=peer_codec,
            peer_can_carry_handles=bool(flags & HELLO_FLAG_HANDLES),
            peer_max_message_size=peer_max,
            authenticated=peer_auth,
        )
        if self._authkey is not None:
            self.peer = peer
            self._send_limit = peer_max
            self._state = _AUTH
            self._queue_frame(FRAME_AUTH, self._proof(self._role, nonce, self._nonce), (), False, None)
        else:
            self._open(peer)
        return True

    def _proof(self, role: bytes, verifier_nonce: bytes, prover_nonce: bytes) -> bytes:
        assert self._authkey is not None
        msg = AUTH_LABEL + bytes([len(role)]) + role + verifier_nonce + prover_nonce
        return hmac.new(self._authkey, msg, hashlib.sha256).digest()

    def _parse_auth(self) -> bool:
        buf = self._buf
        if len(buf) < FRAME.size:
            if self._eof:
                raise AuthenticationError("authentication failed: EOF before the peer's proof")
            return False
        length, ftype, nh, reserved = FRAME.unpack_from(buf, 0)
        if ftype != FRAME_AUTH or nh or reserved or length != 32:
            raise AuthenticationError("authentication failed: peer did not send a proof")
        if len(buf) < FRAME.size + 32:
            if self._eof:
                raise AuthenticationError("authentication failed: EOF inside the peer's proof")
            return False
        proof = bytes(buf[FRAME.size : FRAME.size + 32])
        assert self._peer_hello is not None
        peer_role = b"server" if self._role == b"client" else b"client"
        if self._role == b"peer":
            peer_role = b"peer"
        expected = self._proof(peer_role, self._nonce, self._peer_hello[1])
        if not hmac.compare_digest(proof, expected):
            raise AuthenticationError("authentication failed: the peer does not know the key")
        del buf[: FRAME.size + 32]
        self._consumed += FRAME.size + 32
        assert self.peer is not None
        self._open(self.peer)
        return True

    def _open(self, peer: HandshakeComplete) -> None:
        self.peer = peer
        self._state = _OPEN
        self._send_limit = peer.peer_max_message_size
        if self._held is not None:
            for seg in self._held:
                self._out.append(seg)
                self._out_size += len(seg[0])
                self.queued_fds += len(seg[1])
            self._held = None
            self.pending_limit = BATCH_MESSAGE_MAX if self._batchable else -1
        self._events.append(peer)

