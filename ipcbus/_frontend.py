"""What both frontends (blocking and trio) do around the sans-IO core that is
not I/O: option checking, turning handle-carrying messages into objects,
dispatching internal messages, and releasing handles the peer acknowledged."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from functools import partial
from itertools import islice
from typing import Any

from ._errors import AuthenticationError, CodecError, HandleError, IPCError, TransportError
from ._fastpath import FrontSlots
from ._handles import KIND_FD, Handle, close_fds, describe, restore
from ._message import Message
from ._protocol import (
    DEFAULT_INTERNAL_PREFIX,
    DEFAULT_MAX_HANDLES,
    DEFAULT_MAX_MESSAGE_SIZE,
    NEED_DATA,
    NONCE_SIZE,
    Closed,
    Connection,
    HandlesReleased,
    InternalMessage,
    RawMessage,
)
from .codecs import Codec, MsgpackCodec, get_codec

log = logging.getLogger("ipcbus")

InternalCallback = Callable[[Message], Any]
_new_message = partial(tuple.__new__, Message)

# Options that belong to the channel; everything else goes to the transport.
CHANNEL_OPTIONS = frozenset(
    {
        "codec",
        "max_message_size",
        "max_handles",
        "internal_prefix",
        "authkey",
        "handshake_timeout",
        "heartbeat",
        "protocol",
    }
)
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
RECV_SIZE = 256 * 1024
# A burst's messages of at most QUICK_MAX bytes are collected in a list and
# go to the core QUICK_COUNT at a time: one BATCH frame (<= 64 KiB), one write.
QUICK_MAX = 256
QUICK_COUNT = 1024
# recv_many's default chunk: the messages of a chunk live at once, and past
# a few dozen the cyclic GC's walks over them cost more than the calls saved.
RECV_MANY_MAX = 64
# The trio writer task coalesces on its own: smaller lists keep its rounds short.
TRIO_QUICK_COUNT = 256


def fast_encoder(codec: Codec) -> Callable[[Any], bytes]:
    """The encoder the send hot path calls: the codec's ``encode``, or for the
    built-in msgpack codec its bare encoder (``_pack``: the C MsgpackPack, or
    msgpack's ``Packer.pack``), whose TypeError/ValueError/OverflowError the
    caller turns into CodecError with :func:`encode_error`."""
    if type(codec) is MsgpackCodec:
        return codec._pack
    return codec.encode


def encode_error(codec: Codec, value: Any, exc: BaseException) -> CodecError:
    return CodecError(f"{codec.name} cannot encode {type(value).__name__}: {exc}")


def encode_all(codec: Codec, encode: Callable[[Any], bytes], values: Iterable[Any]) -> list[bytes]:
    """Every one of ``values`` encoded (``send_many``), or a CodecError that
    names the first that cannot be; then none of them is sent."""
    items = values if type(values) is list else list(values)
    try:
        return list(map(encode, items))  # one C loop for the built-in msgpack
    except (TypeError, ValueError, OverflowError, CodecError):
        pass
    payloads = []
    for i, value in enumerate(items):  # which one?
        try:
            payloads.append(encode(value))
        except (TypeError, ValueError, OverflowError) as exc:
            raise CodecError(f"send_many: value {i}: {encode_error(codec, value, exc)}") from exc
        except CodecError as exc:
            raise CodecError(f"send_many: value {i}: {exc}") from exc
    return payloads  # (an encoder that failed only once)


def check_max_count(max_count: int) -> None:
    """recv_many's argument: at least one message."""
    if max_count < 1:
        raise ValueError(f"max_count must be at least 1, not {max_count}")


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(channel options, transport options)."""
    chan = {k: v for k, v in options.items() if k in CHANNEL_OPTIONS}
    trans = {k: v for k, v in options.items() if k not in CHANNEL_OPTIONS}
    return chan, trans


def make_core(
    *,
    codec: str | Codec | None = None,
    trusted: bool,
    can_carry_handles: bool,
    role: str,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    max_handles: int = DEFAULT_MAX_HANDLES,
    internal_prefix: str = DEFAULT_INTERNAL_PREFIX,
    authkey: bytes | str | None = None,
    heartbeat: float | None = None,
    protocol: str = "native",
) -> Connection:
    """Build the protocol core for a new channel, refusing pickle on a
    channel whose peer is neither inherited nor authenticated.

    ``protocol="node"`` builds a core for Node.js's own IPC protocol
    (:class:`~ipcbus._node_protocol.NodeConnection`) instead: its codec is
    always Node's JSON, and options that protocol has no room for (another
    codec, a key, a heartbeat, another internal prefix) are a ValueError.

    ``heartbeat`` is only checked here (a positive number of seconds, or
    None): the frontend runs it, the core just answers pings."""
    if heartbeat is not None and not (isinstance(heartbeat, (int, float)) and heartbeat > 0):
        raise ValueError(f"heartbeat must be a positive number of seconds or None, not {heartbeat!r}")
    if protocol == "node":
        return _make_node_core(
            codec, can_carry_handles, max_message_size, internal_prefix, authkey, heartbeat
        )
    if protocol != "native":
        raise ValueError(f"protocol must be 'native' or 'node', not {protocol!r}")
    if codec is None:
        codec = "msgpack"
    codec_obj = get_codec(codec)
    if isinstance(authkey, str):
        authkey = authkey.encode()
    if authkey is not None and not authkey:
        raise ValueError("authkey must not be empty")
    if getattr(codec_obj, "requires_trust", False) and not trusted and authkey is None:
        raise CodecError(
            f"the {codec_obj.name} codec can run code when decoding: it is allowed only on "
            "pair(), inherited channels and authenticated channels (pass authkey=)"
        )
    return Connection(
        codec_obj,
        pid=os.getpid(),
        can_carry_handles=can_carry_handles,
        max_message_size=max_message_size,
        max_handles=max_handles,
        internal_prefix=internal_prefix,
        authkey=authkey,
        nonce=os.urandom(NONCE_SIZE) if authkey is not None else None,
        role=role,
    )


def _make_node_core(
    codec: str | Codec | None,
    can_carry_handles: bool,
    max_message_size: int,
    internal_prefix: str,
    authkey: bytes | str | None,
    heartbeat: float | None,
) -> Any:
    from ._node_protocol import NODE_PREFIX, NodeConnection

    name = codec if isinstance(codec, str) or codec is None else getattr(codec, "name", None)
    if name not in (None, "json"):
        raise ValueError(f"protocol='node' always uses Node's JSON; codec={name!r} cannot be used")
    if authkey is not None:
        raise ValueError("protocol='node' has no authentication (authkey)")
    if heartbeat is not None:
        raise ValueError("protocol='node' has no heartbeat (Node does not answer pings)")
    if internal_prefix not in (DEFAULT_INTERNAL_PREFIX, NODE_PREFIX):
        raise ValueError(f"protocol='node' has the fixed internal prefix {NODE_PREFIX!r}")
    return NodeConnection(can_carry_handles=can_carry_handles, max_message_size=max_message_size)


def check_authentication(
    transport: Any, scheme: str, address: str, chan_opts: dict[str, Any], allow_unauthenticated: bool
) -> None:
    """Refuse to open a channel without ``authkey`` on a transport that
    declares ``requires_auth`` (TCP), unless the caller opted out with
    ``allow_unauthenticated=True`` on an address the transport confirms is
    loopback-only (``transport.is_loopback(address)``). TransportError
    otherwise, saying what to pass."""
    if not getattr(transport, "requires_auth", False) or chan_opts.get("authkey") is not None:
        return
    url = f"{scheme}://{address}"
    if not allow_unauthenticated:
        raise TransportError(
            f"{url}: {scheme} channels need a shared key (authkey=...); to go without one on a "
            "loopback address, pass allow_unauthenticated=True"
        )
    is_loopback = getattr(transport, "is_loopback", None)
    if is_loopback is None or not is_loopback(address):
        raise TransportError(
            f"{url}: allow_unauthenticated=True is allowed only on loopback addresses "
            "(127.0.0.0/8, ::1); anything else needs authkey=..."
        )


def log_auth_failure(exc: BaseException, stream: Any) -> None:
    """Log a failed authentication with the peer's address (logger
    ``ipcbus``); call it before the stream is closed. Other errors are not
    logged here: they are raised to the application."""
    if isinstance(exc, AuthenticationError):
        try:
            peer = stream.describe_peer()
        except Exception:
            peer = getattr(stream, "transport_name", "?")
        log.warning("authentication failed with %s: %s", peer, exc)


def duplicate_fds(described: list[tuple[bytes, int]]) -> list[tuple[bytes, int]]:
    """``described`` with each fd replaced by a duplicate the channel owns.

    A channel queues a handle message with duplicates, so that the caller may
    close its copies as soon as ``send`` returns while the message waits to
    be batched with others; whoever writes it closes them (POSIX only).
    Raises HandleError, with nothing left open, for an fd that is not open.
    """
    if len(described) == 1:  # (the common case, in fewer steps)
        desc, fd = described[0]
        try:
            return [(desc, os.dup(fd))]
        except OSError as exc:
            raise HandleError(f"cannot send fd {fd}: {exc.strerror}") from exc
    dups: list[tuple[bytes, int]] = []
    try:
        for desc, fd in described:
            dups.append((desc, os.dup(fd)))
    except OSError as exc:
        close_fds([fd for _, fd in dups])
        raise HandleError(f"cannot send fd {described[len(dups)][1]}: {exc.strerror}") from exc
    return dups


class FrontendState(FrontSlots):
    """Base with the frontend bookkeeping shared by both channel classes.

    Subclasses set ``_core`` and ``_name`` before using these methods.
    (``_core``, ``_quick`` and ``_fast_encode`` are FrontSlots's fields,
    which the C ``send`` and ``recv`` read.)
    """

    _core: Connection
    _name: str

    @property
    def codec(self) -> Codec:
        """The codec both ends agreed on."""
        return self._core.codec

    @property
    def transport(self) -> str:
        """The name of the transport (``"unix"``, ``"socketpair"``...)."""
        return self._name

    @property
    def can_send_handles(self) -> bool:
        """Whether ``send(..., handle=...)`` can work on this channel."""
        return self._core.handles_allowed

    @property
    def peer_pid(self) -> int | None:
        """The peer's pid from its hello (None until the hello has arrived)."""
        peer = self._core.peer
        return peer.peer_pid if peer else None

    @property
    def authenticated(self) -> bool:
        """True when both ends proved knowledge of the shared key."""
        return bool(self._core.peer and self._core.peer.authenticated and self._core.established)

    def _init_frontend(self) -> None:
        self._callbacks: dict[str, InternalCallback] = {}
        # A burst's small encoded messages, appended by send without the
        # core; they go to the core in order (_settle) before anything else
        # is queued or written, and whenever the list is full.
        self._quick: list[bytes] = []
        self._quick_ok = hasattr(self._core, "send_encoded_many")
        # Windows pipes send handles into the peer's process: they take its
        # pid from the handshake, through the core.
        bind_core = getattr(getattr(self, "_stream", None), "bind_core", None)
        if bind_core is not None:
            bind_core(self._core)

    # --- sending side --------------------------------------------------------

    def _settle(self) -> None:
        # Hand the burst list to the core (the blocking frontend holds its
        # core lock). Taken with a copy and a slice deletion, each one step
        # under the GIL, so that a send appending meanwhile from another
        # thread is kept.
        quick = self._quick
        if quick:
            items = quick[:]
            del quick[: len(items)]
            try:
                self._core.send_encoded_many(items, QUICK_MAX)
            except IPCError:
                pass  # the channel failed: the next send raises its error

    def _prepare_handles(
        self, handle: Any, handles: Sequence[Any] | None, keep_open: bool
    ) -> tuple[list[tuple[bytes, int]], bool, Any]:
        if handles is None:
            # One handle= (the common case), in fewer steps.
            if not self._core.handles_allowed:
                raise HandleError(f"the {self._name} transport cannot carry handles")
            return [describe(handle)], False, None if keep_open else [handle]
        if handle is not None:
            raise TypeError("pass handle= or handles=, not both")
        objs = list(handles)
        if not objs:
            return [], False, None
        if not self._core.handles_allowed:
            raise HandleError(f"the {self._name} transport cannot carry handles")
        described = [describe(obj) for obj in objs]
        release = None if keep_open else objs
        return described, handles is not None, release

    # --- receiving side ------------------------------------------------------

    def _take_ready(self, out: list[Message], max_count: int, lock: AbstractContextManager[Any]) -> None:
        # recv_many after its first message: plain messages already parsed,
        # without reading, until out holds max_count. Anything else (an
        # internal message, one with handles, the end, an error) stays for
        # the next call, so that what out holds is never lost to it.
        core = self._core
        while len(out) < max_count:
            lazy = core._lazy
            if lazy is not None:
                try:
                    out.extend(islice(lazy, max_count - len(out)))
                except Exception as exc:  # the decoder's own exception types
                    self._lazy_failed(exc)  # the next call raises it
                    return
                if len(out) >= max_count:
                    return
            with lock:
                if core._lazy is None and not core._events:
                    return
                try:
                    ev = core.next_event()  # ends the batch; the next one starts
                except IPCError:
                    return  # (sticky: the next call raises it)
                if type(ev) is not Message:
                    if ev is not NEED_DATA and type(ev) is not Closed:
                        core._events.appendleft(ev)
                    return
            out.append(ev)

    def _lazy_failed(self, exc: Exception) -> None:
        """A value of the batch being delivered did not decode (each
        frontend reports it to the core, under its own locking)."""
        raise NotImplementedError

    def _restore(self, ev: RawMessage | InternalMessage) -> Message:
        handles = ev.handles
        if not ev.multi and len(handles) == 1 and type(self._core) is Connection:
            # One handle= on the native core (the common case), in fewer
            # steps; restore() closes the fd itself when it refuses it.
            desc, fd = handles[0]
            if desc[0] == KIND_FD:
                return _new_message((ev.data, Handle(fd)))  # a bare fd claims nothing to check
            return _new_message((ev.data, restore(desc, fd)))
        objs: list[Any] = []
        try:
            for desc, fd in ev.handles:
                objs.append(restore(desc, fd))
        except HandleError:
            # restore() closed the bad fd; close the others of this message.
            close_fds([fd for _, fd in ev.handles[len(objs) + 1 :]])
            for obj in objs:
                obj.close()
            raise
        on_restored = getattr(self._core, "on_restored", None)
        if on_restored is not None:
            # The node core tracks received sockets for Node's socket lists.
            on_restored(ev, objs)
        if ev.multi:
            return Message(ev.data, tuple(objs))
        return Message(ev.data, objs[0] if objs else None)

    def _dispatch_internal(self, ev: InternalMessage) -> None:
        callback = self._callbacks.get(ev.prefix)
        msg = self._restore(ev) if ev.handles else Message(ev.data, None)
        if callback is None:
            log.debug("%s: dropped internal message %r", self._name, ev.data.get("cmd"))
            for h in msg.handles:
                h.close()
            return
        callback(msg)

    @staticmethod
    def _release(ev: HandlesReleased) -> None:
        for objs in ev.tokens:
            for obj in objs:
                try:
                    obj.close()
                except OSError:
                    pass

    def on_internal(self, prefix: str, callback: InternalCallback) -> None:
        """Claim ``prefix``: messages whose ``cmd`` starts with it go to
        ``callback(message)`` and never to ``recv()``.

        Callbacks run in whichever call is receiving (``recv``, iteration) when
        the message is read, in order with the other messages. The library's
        own prefix (``IPCBUS_`` by default) cannot be claimed.
        """
        if not isinstance(prefix, str) or not prefix:
            raise ValueError("prefix must be a non-empty string")
        if prefix == self._core.internal_prefix:
            raise ValueError(f"{prefix!r} is the library's own internal prefix")
        self._callbacks[prefix] = callback
        self._core.claim_prefix(prefix)

    def _discard_pending(self) -> None:
        """Close every fd the channel still holds that nobody will own."""
        while True:
            try:
                ev = self._core.next_event()
            except Exception:
                break
            if isinstance(ev, (RawMessage, InternalMessage)):
                close_fds([fd for _, fd in ev.handles])
            elif isinstance(ev, HandlesReleased):
                self._release(ev)
            elif ev is NEED_DATA or isinstance(ev, Closed):
                break
        close_fds(self._core.unclaimed_fds())
        for objs in self._core.take_unreleased():
            for obj in objs:
                try:
                    obj.close()
                except OSError:
                    pass
