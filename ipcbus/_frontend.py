"""What both frontends (blocking and trio) do around the sans-IO core that is
not I/O: option checking, turning handle-carrying messages into objects,
dispatching internal messages, and releasing handles the peer acknowledged."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from ._errors import CodecError, HandleError
from ._handles import close_fds, describe, restore
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
from .codecs import Codec, get_codec

log = logging.getLogger("ipcbus")

InternalCallback = Callable[[Message], Any]

# Options that belong to the channel; everything else goes to the transport.
CHANNEL_OPTIONS = frozenset(
    {"codec", "max_message_size", "max_handles", "internal_prefix", "authkey", "handshake_timeout"}
)
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
RECV_SIZE = 256 * 1024


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(channel options, transport options)."""
    chan = {k: v for k, v in options.items() if k in CHANNEL_OPTIONS}
    trans = {k: v for k, v in options.items() if k not in CHANNEL_OPTIONS}
    return chan, trans


def make_core(
    *,
    codec: str | Codec,
    trusted: bool,
    can_carry_handles: bool,
    role: str,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    max_handles: int = DEFAULT_MAX_HANDLES,
    internal_prefix: str = DEFAULT_INTERNAL_PREFIX,
    authkey: bytes | str | None = None,
) -> Connection:
    """Build the protocol core for a new channel, refusing pickle on a
    channel whose peer is neither inherited nor authenticated."""
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


class FrontendState:
    """Mixin with the frontend bookkeeping shared by both channel classes.

    Subclasses set ``_core`` and ``_name`` before using these methods.
    """

    _core: Connection
    _name: str

    def _init_frontend(self) -> None:
        self._callbacks: dict[str, InternalCallback] = {}

    # --- sending side --------------------------------------------------------

    def _prepare_handles(
        self, handle: Any, handles: Sequence[Any] | None, keep_open: bool
    ) -> tuple[list[tuple[bytes, int]], bool, Any]:
        if handle is not None and handles is not None:
            raise TypeError("pass handle= or handles=, not both")
        objs = [handle] if handle is not None else list(handles or ())
        if not objs:
            return [], False, None
        if not self._core.handles_allowed:
            raise HandleError(f"the {self._name} transport cannot carry handles")
        described = [describe(obj) for obj in objs]
        release = None if keep_open else objs
        return described, handles is not None, release

    # --- receiving side ------------------------------------------------------

    def _restore(self, ev: RawMessage | InternalMessage) -> Message:
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
