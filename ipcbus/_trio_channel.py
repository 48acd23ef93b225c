"""The trio frontend: :class:`AsyncChannel`, :class:`AsyncListener`, ``pair``,
``listen`` and ``connect``.

The same sans-IO core as the blocking frontend, driven by trio:

- ``recv`` reads with ``stream.receive`` when the core needs data, in the
  task that calls it (one task reads at a time; others wait for its result).
- Sending only queues into the core's output buffer. One writer task per
  channel (a trio *system* task, so that ``pair()`` can stay synchronous and
  an unclosed channel never keeps the run alive) writes whatever is queued.
  A message sent while the writer is idle is written on the next scheduling
  round; while the writer is busy, sends pile up and leave together, so a
  burst goes out in few writes without any timer.
- The output buffer is bounded (:data:`HIGH_WATER`): ``send`` waits for room,
  ``send_nowait`` raises ``trio.WouldBlock``. That is the backpressure a peer
  that stops reading exerts.

Every ``async def`` here is a checkpoint, also on its fast paths (trio's
rule). A trio checkpoint costs several microseconds, so per-message
``await`` caps throughput near 10^5 messages a second; ``send_nowait`` and
``recv_nowait`` are the bulk path.
"""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from types import TracebackType
from typing import Any

import trio

from . import _heartbeat
from ._errors import ChannelClosed, HandshakeError, HandshakeTimeout, HeartbeatTimeout, IPCError, TransportError
from ._fastpath import burst_send, lazy_recv
from ._frontend import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    QUICK_MAX,
    RECV_MANY_MAX,
    RECV_SIZE,
    TRIO_QUICK_COUNT,
    FrontendState,
    check_authentication,
    check_max_count,
    duplicate_fds,
    encode_all,
    encode_error,
    fast_encoder,
    log_auth_failure,
    make_core,
    split_options,
)
from ._handles import close_fds
from ._message import Message
from ._protocol import (
    NEED_DATA,
    SCM_MAX_FD,
    Closed,
    Connection,
    HandlesReleased,
    HandshakeComplete,
    InternalMessage,
    RawMessage,
)
from .codecs import Codec
from .transports import AsyncListener as TransportAsyncListener
from .transports import AsyncStream, get_transport, split_url
from .transports._fd import socketpair_sockets
from .transports._sockets import AsyncSocketStream

__all__ = ["AsyncChannel", "AsyncListener", "connect", "listen", "pair"]

log = logging.getLogger("ipcbus")

#: Bytes a channel buffers for writing before ``send`` waits and
#: ``send_nowait`` raises ``trio.WouldBlock``. Large enough for one full
#: segment (the core's SEGMENT_TARGET), so a bulk sender hands the writer
#: whole segments.
HIGH_WATER = 256 * 1024

# While sends keep arriving, the writer waits up to this many scheduling
# rounds (not a timer: each round is one pass of trio's run queue) for the
# buffer to stop growing or to reach COALESCE_BYTES before it writes. A
# lone send never waits: it finds the writer idle and wakes it.
COALESCE_ROUNDS = 16
COALESCE_BYTES = 64 * 1024

_checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
_cancel_shielded_checkpoint = trio.lowlevel.cancel_shielded_checkpoint


class AsyncChannel(FrontendState):
    """A message channel to one peer (trio API).

    Create channels with :func:`pair`, :func:`connect`,
    ``AsyncListener.accept()`` or ``ipcbus.trio.fork()``. One task may send
    while another receives. Use ``async with channel:`` or
    ``await channel.aclose()``; a channel that is garbage collected unclosed
    closes its stream and its writer task ends.

    Errors are those of the blocking :class:`ipcbus.Channel`: a peer's bad
    input raises ProtocolError / HandleError / CodecError from ``recv`` and
    closes the channel (the error is sticky); use after close raises
    ChannelClosed. trio's own resource errors never escape.
    """

    def __init__(
        self,
        stream: AsyncStream,
        core: Connection,
        *,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        heartbeat: float | None = None,
    ) -> None:
        self._stream = stream
        self._core = core
        self._name = stream.transport_name
        self._encode = core.codec.encode
        self._fast_encode = fast_encoder(core.codec)
        self._high_water = HIGH_WATER
        self._closed = False
        self._read_eof = False
        self._reading = False
        # A write failure that ends sending but not receiving (the peer
        # stopped reading): what it sent before may still be read.
        self._send_error: BaseException | None = None
        # The segment the writer is writing: (rest of it, its fds).
        self._partial: tuple[memoryview, list[int]] | None = None
        self._partial_len = 0
        # Set by a read that returned data, cleared by a write: the next send
        # is a reply (or the next request) and is written at once (native
        # core only: direct_header).
        self._read_since_write = False
        self._lone_ok = type(core) is Connection
        # POSIX native channels queue handle messages with duplicated fds
        # (duplicate_fds): send returns at once and a burst of them is
        # batched; the writer closes each duplicate once it went out.
        self._owns_fds = type(core) is Connection and sys.platform != "win32"
        self._segs_taken = 0  # segments taken from the core by the writer
        self._segs_done = 0  # ... and completely written
        self._written = 0  # bytes written
        self._hello_len = core.output_size  # queued so far: our hello
        self._wake = trio.lowlevel.ParkingLot()  # the idle writer parks here
        self._progress = trio.lowlevel.ParkingLot()  # tasks waiting for writes
        self._read_done = trio.lowlevel.ParkingLot()  # tasks waiting for the reader
        self._hs_deadline = (
            None if handshake_timeout is None else trio.current_time() + handshake_timeout
        )
        self._heartbeat = heartbeat
        self._last_rx = trio.current_time()
        self._last_ping = 0.0  # time.monotonic() of the heartbeat thread
        self._trio_token = trio.lowlevel.current_trio_token()
        self._init_frontend()
        self._finalizer = weakref.finalize(
            self, _abandon, stream, core, self._name, self._wake, trio.lowlevel.current_trio_token()
        )
        self._finalizer.atexit = False  # at exit the run is over and the OS closes the fds
        # The hello is queued already: the writer sends it on its first round.
        trio.lowlevel.spawn_system_task(
            _writer_task, weakref.ref(self), self._wake, name=f"ipcbus-writer ({self._name})"
        )
        if heartbeat is not None:
            _heartbeat.register(self)

    @classmethod
    def _open(cls, stream: AsyncStream, role: str, **options: Any) -> AsyncChannel:
        """A channel over ``stream`` (which it then owns). Must be called
        inside a trio run. ``options`` are channel options (``codec``,
        ``max_message_size``, ``handshake_timeout``...); ``role`` is
        ``"client"``, ``"server"`` or ``"peer"``."""
        timeout = options.pop("handshake_timeout", DEFAULT_HANDSHAKE_TIMEOUT)
        heartbeat = options.get("heartbeat")  # make_core checks its value
        try:
            core = make_core(
                trusted=stream.trusted,
                can_carry_handles=stream.can_send_handles,
                role=role,
                **options,
            )
            return cls(stream, core, handshake_timeout=timeout, heartbeat=heartbeat)
        except BaseException:
            stream.close_nowait()
            raise

    # --------------------------------------------------------------- properties

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` was called or the channel failed."""
        return self._closed

    @property
    def stream(self) -> AsyncStream:
        """The transport stream under this channel."""
        return self._stream

    # ------------------------------------------------------------------ sending

    def _check_send(self) -> None:
        if self._closed:
            raise ChannelClosed("send on a closed channel")
        if self._send_error is not None:
            raise self._send_error

    def _buffered(self) -> int:
        self._settle()
        return self._core.output_size + self._partial_len

    def _queued_segments(self) -> int:
        self._settle()
        return self._core.queued_segments()

    def _kick(self) -> None:
        if self._wake:
            self._wake.unpark_all()

    def _queue(self, data: Any, handle: Any, handles: Sequence[Any] | None, keep_open: bool) -> Any:
        # Synchronous: a message is queued whole or (on an exception) not at
        # all. Returns its release token (keep_open=False handles) or None.
        self._settle()
        release = None
        if handle is None and handles is None:
            self._core.send_encoded(self._encode(data))
        else:
            described, multi, release = self._prepare_handles(handle, handles, keep_open)
            if self._owns_fds and described:
                dups = duplicate_fds(described)
                try:
                    self._core.send(data, dups, multi=multi, release=release)
                except BaseException:
                    close_fds([fd for _, fd in dups])  # refused: not queued
                    raise
            else:
                self._core.send(data, described, multi=multi, release=release)
        if self._wake:
            self._wake.unpark_all()
        return release

    @burst_send(
        full="_settle",
        plain="_send_plain",
        count=TRIO_QUICK_COUNT,
        limit=QUICK_MAX,
    )
    def send_nowait(
        self,
        data: Any,
        handle: Any = None,
        *,
        handles: Sequence[Any] | None = None,
        keep_open: bool = True,
    ) -> None:
        """Queue a message without waiting (the bulk path).

        Raises ``trio.WouldBlock`` (nothing queued) while the output buffer
        holds :data:`HIGH_WATER` bytes or more; ``await send(...)`` or
        ``await flush()`` then waits for the peer. The message is written by
        the channel's writer task once the caller reaches a checkpoint (the
        first one after a read, a reply, is written at once). A
        handle sent this way may be closed at once on a POSIX native channel
        (as with :meth:`send`); elsewhere it must stay open until
        ``flush()`` returned. Other errors as :meth:`send`.
        """
        if self._closed or self._send_error is not None:
            self._check_send()
        if handle is None and handles is None:
            try:
                payload = self._fast_encode(data)
            except (TypeError, ValueError, OverflowError) as exc:
                raise encode_error(self._core.codec, data, exc) from exc
            quick = self._quick
            if quick and len(payload) <= QUICK_MAX:
                # A burst in progress: the message joins its list (the
                # high-water mark is checked when the list goes to the core).
                # _teardown and _drop_output empty the list, so a closed or
                # failed channel never gets here.
                quick.append(payload)
                if len(quick) >= TRIO_QUICK_COUNT:
                    self._settle()
                return
            self._send_plain(payload)
            return
        if self._core.output_size + self._partial_len >= self._high_water:
            self._kick()
            raise trio.WouldBlock
        self._queue(data, handle, handles, keep_open)

    def _send_plain(self, payload: bytes) -> None:
        # send_nowait of an encoded plain message that does not join a burst
        # in progress: the first of a burst, a reply, or a large one.
        if self._closed or self._send_error is not None:
            self._check_send()  # (the C send_nowait comes here directly)
        quick = self._quick
        if quick:
            self._settle()
        core = self._core
        if core.output_size + self._partial_len >= self._high_water:
            self._kick()
            raise trio.WouldBlock
        if self._read_since_write and not quick and self._partial is None:
            self._send_lone(payload)  # a reply: written at once (see send)
            return
        if self._quick_ok and len(payload) <= QUICK_MAX:
            quick.append(payload)
        else:
            core.send_encoded(payload)
        if self._wake:
            self._wake.unpark_all()

    async def send(
        self,
        data: Any,
        handle: Any = None,
        *,
        handles: Sequence[Any] | None = None,
        keep_open: bool = True,
    ) -> None:
        """Send ``data``, and optionally handles, to the peer.

        Messages arrive whole and in the order they were sent. Waits while
        the output buffer is full (the peer is not reading), then queues the
        message; a lone message is written at once, messages sent in a burst
        leave together. A cancelled ``send`` queued its message whole or not
        at all.

        ``handle`` is one socket, file object or :class:`ipcbus.Handle`;
        ``handles`` a list of them. The caller may close its copy as soon as
        ``send`` returns: on POSIX a native channel queues a duplicate of
        each fd (closed once written), so that a burst of handle messages is
        batched like plain ones. On a ``protocol="node"`` channel (and on
        Windows) a message with handles has been written when ``send``
        returns (unless the send was cancelled: then it may still be queued,
        and the handle must stay open until :meth:`flush` or
        :meth:`aclose`). With ``keep_open=False`` ipcbus closes the handle
        once the peer acknowledged receipt.

        Raises CodecError (a value the codec refuses, or over the size
        limit), HandleError (not a handle, or a channel that cannot carry
        handles), ChannelClosed (closed channel, or the peer stopped
        reading), or the channel's earlier error.
        """
        await _checkpoint_if_cancelled()
        yielded = False
        try:
            self._check_send()
            if self._buffered() >= self._high_water:
                yielded = True
                await self._wait_room()
            plain = handle is None and handles is None
            if plain and self._read_since_write and not self._quick and self._partial is None:
                # The first send after a read (a reply, the next request),
                # with nothing of ours queued or being written: written now,
                # not by the writer task a scheduling round later. (Every
                # send writing at once would cost a burst a write per
                # message, and the socket buffer a kernel buffer each.)
                self._send_lone(self._encode(data))
                return
            if plain or self._owns_fds:
                # (The queued message carries our own duplicates of the fds.)
                self._queue(data, handle, handles, keep_open)
                return
            if getattr(self._core, "_held", None) is not None:
                # Frames wait for the peer's proof (authkey): the fds must not
                # be taken from the caller before they can be written.
                yielded = True
                await self.wait_handshake()
            release = self._queue(data, handle, handles, keep_open)
            target = self._segs_taken + self._queued_segments()
            yielded = True
            try:
                await self._wait_written(target)
                if getattr(self._core, "awaiting_ack", False):
                    await self._wait_handle_answer()
            except IPCError:
                if release is not None:
                    # Not sent: the caller keeps its handles; a later
                    # teardown must not close them.
                    self._core.withdraw_release(release)
                raise
        finally:
            if not yielded:
                # The message is queued: this round lets the writer send it.
                await _cancel_shielded_checkpoint()

    async def send_many(self, values: Iterable[Any]) -> None:
        """Send each of ``values`` as a message of its own, in order: what a
        loop of ``await send(value)`` does, in far fewer steps (encoded in
        one pass, queued as one burst, one checkpoint). Meant for many small
        messages.

        Every value is encoded before any is queued: if one cannot be (a
        CodecError naming its position, or one over the size limit), none of
        them is sent. Waits while the output buffer is full, then queues all
        of them; a cancelled ``send_many`` queued all or nothing. The
        channel's writer task writes them. Plain messages only: handles go
        with :meth:`send`. Errors as :meth:`send`.
        """
        await _checkpoint_if_cancelled()
        yielded = False
        try:
            self._check_send()
            payloads = encode_all(self._core.codec, self._fast_encode, values)
            if self._buffered() >= self._high_water:
                yielded = True
                await self._wait_room()
            if payloads:
                self._settle()
                self._core.send_encoded_many(payloads)
                self._kick()
        finally:
            if not yielded:
                await _cancel_shielded_checkpoint()

    async def _wait_room(self) -> None:
        while self._buffered() >= self._high_water:
            self._check_send()
            self._kick()
            await self._progress.park()
        self._check_send()

    async def _wait_written(self, target: int) -> None:
        # Wait until the writer finished the target-th segment it took.
        while self._segs_done < target:
            self._check_send()
            self._kick()
            await self._progress.park()

    async def flush(self) -> None:
        """Wait until everything sent so far was written to the transport.

        Raises ChannelClosed (closed, or the peer stopped reading) or the
        channel's earlier error.
        """
        await _checkpoint_if_cancelled()
        yielded = False
        try:
            self._check_send()
            target = self._segs_taken + self._queued_segments()
            if self._segs_done < target:
                yielded = True
                await self._wait_written(target)
            while getattr(self._core, "awaiting_ack", False):
                # protocol="node": what was sent after a handle is held until
                # the peer answers it; then it is written like the rest.
                yielded = True
                await self._wait_handle_answer()
                await self._wait_written(self._segs_taken + self._queued_segments())
        finally:
            if not yielded:
                await _cancel_shielded_checkpoint()

    async def _wait_handle_answer(self) -> None:
        # Node's protocol holds every later message until the peer answers a
        # handle (ACK or NACK), and only a read sees that answer: read here
        # (or wait for the task that is reading). Other messages read on the
        # way wait in the core for recv().
        core = self._core
        while core.awaiting_ack:
            if core.state == "EOF":
                raise ChannelClosed(f"{self._name}: the peer closed before acknowledging the handle")
            if core.state != "OPEN":
                return  # the channel's error is raised by the next call
            self._check_send()
            await self._read_some()

    async def _drain(self) -> None:
        """Write until the core has nothing left (the writer task's body)."""
        core = self._core
        stream = self._stream
        wrote = False
        while not self._closed:
            partial = self._partial
            if partial is None:
                self._settle()
                if not core.has_output():
                    return
                if wrote and core.output_size < COALESCE_BYTES:
                    # Sends arrived while we were writing: a burst. Let it
                    # grow while it keeps growing, then write it in one go.
                    # trio runs a round's tasks in random order, so one round
                    # without growth may be chance: stop after two.
                    still = 0
                    for _ in range(COALESCE_ROUNDS):
                        size = core.output_size
                        await _cancel_shielded_checkpoint()
                        if self._closed:
                            return
                        self._settle()
                        if core.output_size >= COALESCE_BYTES:
                            break
                        if core.output_size == size:
                            still += 1
                            if still == 2:
                                break
                        else:
                            still = 0
                self._settle()
                seg = core.take_output()
                if seg is None:
                    return
                self._segs_taken += 1
                view, fds = memoryview(seg[0]), seg[1]
                self._partial = (view, fds)
                self._partial_len = len(view)
            else:
                view, fds = partial
            n = await stream.send(view, fds)
            wrote = True
            self._read_since_write = False
            self._written += n
            if fds and self._owns_fds:
                close_fds(fds)  # our duplicates rode on this write
            if self._closed:
                return
            view = view[n:]
            if view:
                self._partial = (view, [])  # the fds rode on the first byte
                self._partial_len = len(view)
            else:
                self._partial = None
                self._partial_len = 0
                self._segs_done += 1
            if self._progress:
                self._progress.unpark_all()

    def _send_lone(self, payload: bytes) -> None:
        # Write header and payload with one non-blocking send; what the
        # kernel does not take goes to the writer task.
        core = self._core
        header = core.direct_header(len(payload))
        if header is None:  # something is queued or held: keep the order
            core.send_encoded(payload)
            self._kick()
            return
        frame = header + payload
        self._read_since_write = False
        try:
            n = self._stream.send_nowait(frame)
        except IPCError as exc:
            self._write_failed(exc)
            self._check_send()
            raise
        if not n:
            core.send_encoded(payload)
            self._kick()
            return
        self._written += n
        if n < len(frame):
            # The rest is the writer's first job (a segment of its own).
            self._partial = (memoryview(frame)[n:], [])
            self._partial_len = len(frame) - n
            self._segs_taken += 1
            self._kick()

    def _drop_output(self) -> None:
        # Nothing queued will be written: close the duplicated fds it carries.
        self._quick.clear()
        fds = self._core.drop_output()
        if self._partial is not None:
            fds += self._partial[1]
        self._partial = None
        self._partial_len = 0
        if self._owns_fds:
            close_fds(fds)

    def _write_failed(self, exc: BaseException) -> None:
        if self._closed:
            return
        if isinstance(exc, ChannelClosed):
            # The peer stopped reading (EPIPE): sending is over, but what the
            # peer sent before it left may still be waiting to be read.
            self._send_error = exc
            self._core.close_sending()
            self._drop_output()
            self._progress.unpark_all()
        else:
            self._fail(exc)

    # ---------------------------------------------------------------- receiving

    @lazy_recv(failed="_lazy_failed")
    def recv_nowait(self) -> Message:
        """The next message if one was already read and parsed, else
        ``trio.WouldBlock``. Never reads from the transport (``await recv()``
        does). Internal messages are dispatched on the way, as in ``recv``.
        Raises ChannelClosed at the peer's EOF and the errors of ``recv``.
        """
        core = self._core
        lazy = core._lazy
        if lazy is not None:
            # The next value of a batch being delivered (see Channel.recv).
            try:
                for message in lazy:
                    return message
            except Exception as exc:  # the decoder's own exception types
                self._lazy_failed(exc)
        while True:
            try:
                ev = core.next_event()
            except IPCError as exc:
                self._fail(exc)
                raise
            if type(ev) is Message:
                return ev
            if ev is NEED_DATA:
                if self._closed:
                    raise ChannelClosed("recv on a closed channel")
                raise trio.WouldBlock
            result = self._handle_event(ev)
            if result is not None:
                return result

    async def recv_many(self, max_count: int = RECV_MANY_MAX) -> list[Message]:
        """What :meth:`ipcbus.Channel.recv_many` does, awaited: the next
        message (waited for as :meth:`recv` does) and up to ``max_count - 1``
        more that were already read, in order, for one checkpoint. A fault
        found after the first message is raised by the next call.
        """
        check_max_count(max_count)
        out = [await self.recv()]
        self._take_ready(out, max_count, nullcontext())
        return out

    def _lazy_failed(self, exc: Exception) -> None:
        # A value of the batch being delivered did not decode: the core
        # queues the error where the batch broke (the caller then asks it).
        self._core.batch_failed(exc)

    async def recv(self) -> Message:
        """The next message: ``data, handle = await channel.recv()``.

        Internal messages (the library's own, and prefixes claimed with
        :meth:`on_internal`) never come out here; claimed ones go to their
        callback from inside this call. Cancelling ``recv`` loses nothing.
        Raises ChannelClosed when the peer closed the channel and every
        message before that was received (or this side closed it), and a
        ProtocolError / HandleError / CodecError when the peer sent something
        invalid (the channel is then closed). HandshakeTimeout if the peer's
        hello does not come within the handshake timeout.
        """
        await _checkpoint_if_cancelled()
        core = self._core
        yielded = False
        try:
            while True:
                try:
                    ev = core.next_event()
                except IPCError as exc:
                    self._fail(exc)
                    raise
                if type(ev) is Message:
                    return ev
                if ev is NEED_DATA:
                    yielded = True
                    await self._read_some()
                    continue
                result = self._handle_event(ev)
                if result is not None:
                    return result
        finally:
            if not yielded:
                await _cancel_shielded_checkpoint()

    def _handle_event(self, ev: Any) -> Message | None:
        if isinstance(ev, RawMessage):
            try:
                return self._restore(ev)
            except IPCError as exc:
                self._fail(exc)
                raise
        if isinstance(ev, InternalMessage):
            self._dispatch_internal(ev)
        elif isinstance(ev, HandlesReleased):
            self._release(ev)
        elif isinstance(ev, Closed):
            self._read_eof = True
            raise ChannelClosed(f"{self._name}: the peer closed the channel")
        elif isinstance(ev, HandshakeComplete):
            pass
        return None

    async def _read_some(self) -> None:
        """One read into the core, or (if another task is reading) wait for
        that task's read. Either way the caller looks at the core again."""
        if self._closed:
            raise ChannelClosed("recv on a closed channel")
        if self._written < self._hello_len and self._send_error is None:
            # Our hello goes out before we read: a peer that we are about to
            # reject (or that rejects us) must still see our side's values.
            self._kick()
            await self._progress.park()
            return
        if self._reading:
            await self._read_done.park()
            return
        self._reading = True
        try:
            data, fds = await self._receive()
            if self._closed:
                close_fds(fds)
                raise ChannelClosed("recv on a closed channel")
            self._read_since_write = self._lone_ok
            core = self._core
            core.receive_data(data, fds)
            if core.has_output() and self._wake:
                # Acknowledgements and pongs go out now.
                self._wake.unpark_all()
        finally:
            self._reading = False
            if self._read_done:
                self._read_done.unpark_all()

    async def _receive(self) -> tuple[bytes, list[int]]:
        stream = self._stream
        deadline = None if self._core.established else self._hs_deadline
        heartbeat = self._heartbeat if deadline is None else None
        if heartbeat is not None:
            # A read that starts late (the task was busy) gets a moment to
            # find what is already buffered before the peer counts as silent.
            deadline = max(self._last_rx + heartbeat, trio.current_time() + heartbeat / 4)
        try:
            if deadline is None:
                result = await stream.receive(RECV_SIZE, SCM_MAX_FD)
                self._last_rx = trio.current_time()
                return result
            with trio.move_on_at(deadline):
                result = await stream.receive(RECV_SIZE, SCM_MAX_FD)
                self._last_rx = trio.current_time()
                return result
        except ChannelClosed:
            if self._closed:
                raise ChannelClosed("recv on a closed channel") from None
            return b"", []  # a reset is an end of stream, read as such
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ChannelClosed("recv on a closed channel") from None
        except IPCError as exc:
            self._fail(exc)
            raise
        if heartbeat is not None:
            exc: IPCError = HeartbeatTimeout(
                f"{self._name}: nothing from the peer for {heartbeat:g} s (heartbeat); "
                "it is dead, stopped or unreachable"
            )
        else:
            exc = HandshakeTimeout(f"{self._name}: the peer did not complete the handshake in time")
        self._fail(exc)
        raise exc

    def _heartbeat_tick(self, now: float) -> bool:
        # Called from the heartbeat thread: the ping is queued in trio's thread.
        if self._closed:
            return False
        assert self._heartbeat is not None
        if now - self._last_ping < self._heartbeat / _heartbeat.PINGS_PER_PERIOD:
            return True
        self._last_ping = now
        try:
            self._trio_token.run_sync_soon(self._heartbeat_ping)
        except trio.RunFinishedError:
            return False
        return True

    def _heartbeat_ping(self) -> None:
        core = self._core
        # Before the handshake a ping would sit between the peer's hello and
        # its proof; with output still unwritten, a ping adds nothing.
        if self._closed or not core.established or self._quick or core.has_output() or self._partial is not None:
            return
        try:
            core.send_ping()
        except IPCError:
            return
        self._wake.unpark_all()

    async def wait_handshake(self) -> None:
        """Wait until the peer's hello (and proof, with a key) was accepted.

        ``connect()`` does this before returning; a listener's channels do it
        lazily on their first ``recv``. Raises HandshakeError,
        HandshakeTimeout or ChannelClosed.
        """
        await _checkpoint_if_cancelled()
        core = self._core
        yielded = False
        try:
            # EOF counts as "established" in the core; a peer that closed
            # before its hello is a failed handshake, not a connected channel.
            while not core.established or core.peer is None:
                state = core.state
                if state == "ERROR":
                    try:
                        core.next_event()  # raises the error
                    except IPCError as exc:
                        self._fail(exc)
                        raise
                if state == "EOF":
                    raise HandshakeError(f"{self._name}: the peer closed before the handshake")
                yielded = True
                await self._read_some()
        finally:
            if not yielded:
                await _cancel_shielded_checkpoint()

    def __aiter__(self) -> AsyncChannel:
        return self

    async def __anext__(self) -> Message:
        """Messages until the peer closes the channel (then the loop ends)."""
        try:
            return await self.recv()
        except ChannelClosed:
            if self._closed and not self._read_eof:
                raise
            raise StopAsyncIteration from None

    # ------------------------------------------------------------------ closing

    def _fail(self, exc: BaseException) -> None:
        # A fault on this channel ends it; the error stays (sticky).
        if not self._closed:
            log_auth_failure(exc, self._stream)
        self._core.fail_locally(exc)
        self._teardown()

    def _teardown(self) -> None:
        self._quick.clear()
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        self._core.close_sending()
        try:
            # Wakes a task blocked reading or writing this stream (trio's
            # notify_closing): they see ChannelClosed.
            self._stream.close_nowait()
        finally:
            self._discard_pending()
            self._drop_output()
            for lot in (self._wake, self._progress, self._read_done):
                lot.unpark_all()

    async def aclose(self) -> None:
        """Flush what was sent, then close. Idempotent.

        The flush waits for the peer as long as needed: bound it with a
        cancel scope (``with trio.move_on_after(5): await ch.aclose()``);
        the channel is closed when ``aclose`` returns or raises. Handles
        received in messages never taken by ``recv`` are closed, and so are
        ``keep_open=False`` handles the peer never acknowledged.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        try:
            await _checkpoint_if_cancelled()
            if self._send_error is None:
                target = self._segs_taken + self._queued_segments()
                await self._wait_written(target)
        except IPCError:
            pass  # the peer is gone: nothing more can be delivered
        finally:
            self._teardown()
            with trio.CancelScope(shield=True):
                await self._stream.aclose()

    async def __aenter__(self) -> AsyncChannel:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else self._core.state.lower()
        return f"<ipcbus.trio.AsyncChannel {self._name} codec={self._core.codec.name} {state}>"


class _Leftovers(FrontendState):
    """The core of a channel that was garbage collected, for cleanup."""

    def __init__(self, core: Connection, name: str) -> None:
        self._core = core
        self._name = name


def _abandon(
    stream: AsyncStream, core: Connection, name: str, wake: trio.lowlevel.ParkingLot, token: trio.lowlevel.TrioToken
) -> None:
    # weakref.finalize of an unclosed channel: no reference to the channel
    # remains, only to what it owned.
    core.close_sending()
    try:
        stream.close_nowait()
    except Exception:  # outside the trio thread; the socket closes itself when collected
        pass
    _Leftovers(core, name)._discard_pending()
    fds = core.drop_output()
    if type(core) is Connection and sys.platform != "win32":
        close_fds(fds)  # the channel's duplicates (AsyncChannel._owns_fds)
    try:
        token.run_sync_soon(wake.unpark_all)  # the writer task notices and ends
    except trio.RunFinishedError:
        pass


async def _writer_task(ref: weakref.ref[AsyncChannel], wake: trio.lowlevel.ParkingLot) -> None:
    # A system task: it must never raise anything but Cancelled, and it holds
    # the channel only while writing, so an abandoned channel can be collected.
    while True:
        ch = ref()
        if ch is None or ch._closed:
            return
        try:
            await ch._drain()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            if not ch._closed:
                ch._write_failed(ChannelClosed(f"{ch._name}: the stream was closed"))
        except IPCError as exc:
            ch._write_failed(exc)
        except Exception as exc:
            log.exception("%s: the writer task failed", ch._name)
            err = TransportError(f"{ch._name}: writing failed: {exc!r}")
            err.__cause__ = exc
            ch._write_failed(err)
        if ch._closed or ch._send_error is not None:
            return
        del ch
        await wake.park()


class AsyncListener:
    """Accepts channels on a transport address (trio API).

    ``accept()`` returns as soon as a peer is admitted (credential checks are
    done); the peer's hello is checked on the channel's first use, so one
    slow or hostile peer never stalls the accept loop.
    """

    def __init__(self, listener: TransportAsyncListener, options: dict[str, Any]) -> None:
        self._listener = listener
        self._options = options

    @property
    def address(self) -> str:
        """The URL peers connect to, with the real path or port."""
        return self._listener.address

    async def accept(self) -> AsyncChannel:
        """The next channel. TransportError if the listener failed."""
        stream = await self._listener.accept()
        return AsyncChannel._open(stream, "server", **self._options)

    async def aclose(self) -> None:
        """Stop listening and remove the socket file it created."""
        await self._listener.aclose()

    async def __aenter__(self) -> AsyncListener:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<ipcbus.trio.AsyncListener {self.address}>"


def pair(codec: str | Codec = "msgpack", **options: Any) -> tuple[AsyncChannel, AsyncChannel]:
    """Two connected channels over a socketpair (both in this process).

    Call it inside a trio run. Handles can be sent; pickle is allowed (the
    peer is this process or one it starts).
    """
    if sys.platform == "win32":  # Windows: a named-pipe pair (transports/_pipe.py)
        from .transports._pipe import open_channel_pair

        return open_channel_pair(AsyncChannel, codec, options, trio=True)
    a, b = socketpair_sockets()
    ends: list[AsyncChannel] = []
    try:
        for sock in (a, b):
            stream = AsyncSocketStream(sock, name="socketpair", trusted=True)
            ends.append(AsyncChannel._open(stream, "peer", codec=codec, **options))
    except BaseException:
        for ch in ends:
            ch._teardown()
        a.close()
        b.close()
        raise
    return ends[0], ends[1]


async def listen(url: str, **options: Any) -> AsyncListener:
    """Listen on ``url`` (``unix:///path``, ``unix-abstract://name``...).

    Channel options: ``codec``, ``max_message_size``, ``max_handles``,
    ``internal_prefix``, ``authkey``, ``handshake_timeout``. Other keyword
    arguments go to the transport (for unix: ``allowed_uids``, ``backlog``,
    ``mode``); a transport refuses ones it does not know with TypeError.
    """
    await trio.lowlevel.checkpoint()
    allow_unauthenticated = bool(options.pop("allow_unauthenticated", False))
    scheme, address = split_url(url)
    chan_opts, trans_opts = split_options(options)
    check_authentication(get_transport(scheme), scheme, address, chan_opts, allow_unauthenticated)
    # Fail now, not at the first accept, for options the core refuses
    # (pickle without a key, a bad limit).
    make_core(trusted=False, can_carry_handles=False, role="server", **{
        k: v for k, v in chan_opts.items() if k != "handshake_timeout"
    })
    transport = get_transport(scheme)
    return AsyncListener(await transport.listen_async(address, **trans_opts), chan_opts)


async def connect(url: str, **options: Any) -> AsyncChannel:
    """Connect to ``url`` and complete the handshake before returning.

    Takes the same channel options as :func:`listen`, plus the transport's
    own. Raises TransportError (nobody there), HandshakeError (the peer
    disagrees: version, codec, key), HandshakeTimeout.
    """
    allow_unauthenticated = bool(options.pop("allow_unauthenticated", False))
    scheme, address = split_url(url)
    chan_opts, trans_opts = split_options(options)
    transport = get_transport(scheme)
    check_authentication(transport, scheme, address, chan_opts, allow_unauthenticated)
    stream = await transport.connect_async(address, **trans_opts)
    channel = AsyncChannel._open(stream, "client", **chan_opts)
    try:
        await channel.wait_handshake()
    except BaseException:
        channel._teardown()
        raise
    return channel
