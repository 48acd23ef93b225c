"""The blocking frontend: :class:`Channel`, :class:`Listener`, ``pair``,
``listen`` and ``connect``.

A short loop drives the sans-IO core over a blocking :class:`Stream`: read
when the core needs data, write what it has queued. No thread is needed for
either; one shared background thread (``_flusher``) only writes the tail of
a burst that the sender left buffered.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any

from . import _flusher, _heartbeat
from ._errors import (
    ChannelClosed,
    HandleError,
    HandshakeError,
    HandshakeTimeout,
    HeartbeatTimeout,
    IPCError,
)
from ._fastpath import ROUND_TRIP, burst_send, lazy_recv
from ._frontend import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    QUICK_COUNT,
    QUICK_MAX,
    RECV_MANY_MAX,
    RECV_SIZE,
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
from ._protocol import _OPEN as _CORE_OPEN
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
from .transports import Listener as TransportListener
from .transports import Stream, get_transport, split_url
from .transports._fd import socketpair_sockets
from .transports._sockets import SocketStream

__all__ = ["Channel", "Listener", "connect", "listen", "pair"]

log = logging.getLogger("ipcbus")

# A send into an empty buffer this long after the last write goes out at once
# (a "lone" send: ping-pong, a request); sends closer together than this are
# a burst and are batched. A burst's sends come a microsecond or two apart; a
# round trip between processes takes a few tens of microseconds at least.
LONE_SEND_GAP = 0.000025
# Windows sockets have no sendmsg.
_CAN_GATHER = hasattr(socket.socket, "sendmsg")
# A payload this large is written straight from the codec's bytes.
DIRECT_WRITE = 256 * 1024
# Write at once when this much is buffered, whatever the timing.
FLUSH_AT = 64 * 1024
# A sender that only sends, with keep_open=False handles not yet
# acknowledged, reads the peer's acknowledgements after every this many
# handle messages written one per write (after about 16 times that many when
# they are batched), and after each keep_open=False one.
ACK_PUMP_EVERY = 16
# A burst of handle messages is written once this many fds are queued
# (one sendmsg carries at most SCM_MAX_FD).
HANDLE_FLUSH_AT = 64
# A message with more handles than this is written at once with the caller's
# own fds: it already fills much of a sendmsg, and duplicating each fd would
# cost two system calls per fd. So is a lone handle message (nothing to batch).
DUP_HANDLES_MAX = 4
# Acknowledgements are left for the flusher thread (coalesced) until this
# many bytes of them are queued.
ACK_WRITE_AT = 4096
# While a burst's sender writes from it itself, the flusher looks at it at
# most this many seconds apart (measured from the sender's last write); the
# tail of a long burst is written within about this after the burst ends.
# Each look takes the GIL from the sending thread (two context switches): at
# 2 ms, a long stream's throughput was 3-4% lower.
HOLD_WINDOW = 0.008

_monotonic = time.monotonic


class Channel(FrontendState):
    """A message channel to one peer (blocking API).

    Create channels with :func:`pair`, :func:`connect`, ``Listener.accept()``,
    ``ipcbus.fork()`` or ``ipcbus.parent()``. ``send`` and ``recv`` may be
    used from different threads at once; concurrent calls of the same method
    are serialised. A channel is a context manager that closes on exit.
    """

    def __init__(
        self,
        stream: Stream,
        core: Connection,
        *,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        heartbeat: float | None = None,
    ) -> None:
        self._stream = stream
        self._core = core
        self._name = stream.transport_name
        self._fast_encode = fast_encoder(core.codec)
        # Large payloads skip the output segment where the stream can gather.
        self._send_parts = (
            getattr(stream, "send_parts", None) if type(core) is Connection and _CAN_GATHER else None
        )
        self._lock = threading.Lock()  # the core's state
        self._lock_acquire = self._lock.acquire
        self._lock_release = self._lock.release
        self._wlock = threading.Lock()  # one writer at a time (held while writing)
        self._wlock_acquire = self._wlock.acquire
        self._wlock_release = self._wlock.release
        self._rlock = threading.Lock()  # one reader at a time (held while reading)
        self._rlock_acquire = self._rlock.acquire
        self._rlock_release = self._rlock.release
        self._pid = os.getpid()  # (a forked child's copy must not interrupt the parent's reads)
        # recv's round-trip path: a native core, no heartbeat deadlines.
        self._simple_read = type(core) is Connection and heartbeat is None
        # The C round trip (_fastpath.ROUND_TRIP) reads and writes this fd
        # itself, with the recvmsg/send calls SocketStream makes (-1: never;
        # a subclass may do more per call). Cleared before the stream closes.
        self._rt_fd = (
            stream.fileno()
            if ROUND_TRIP and type(stream) is SocketStream and self._simple_read and self._send_parts is not None
            else -1
        )
        self._partial: tuple[memoryview, list[int]] | None = None
        self._last_write = 0.0
        # Set by a read that returned data, cleared by a write: a send that
        # follows a read is a reply (or the next request) and goes out at
        # once, however soon after the last write it comes.
        self._read_since_write = False
        self._scheduled = False
        self._flush_wait = 0.0
        self._flush_mark = 0.0  # _last_write at the flusher's last look or write
        self._handle_sends = 0
        self._ack_mark = -1  # output_size when only acknowledgements were queued
        self._closed = False
        self._read_eof = False
        self._handshake_deadline = (
            None if handshake_timeout is None else _monotonic() + handshake_timeout
        )
        self._heartbeat = heartbeat
        self._last_rx = _monotonic()
        # Set when a write found the peer gone: sending is over, but what the
        # peer sent before it went is still read (then EOF).
        self._write_error: IPCError | None = None
        # The native core on POSIX sends duplicates of the caller's fds,
        # owned (and closed once written) by the channel: a handle message
        # may then wait in the buffer, so that a burst of them shares one
        # sendmsg. Node's protocol and Windows pipes send the caller's own.
        self._owns_fds = type(core) is Connection and sys.platform != "win32"
        self._borrowed: dict[int, int] = {}  # caller's fds queued by a send still running
        self._init_frontend()
        try:
            self.flush()  # the hello goes out now, so the peer can check it early
        except ChannelClosed:
            pass  # the peer is gone already: recv() reads what it sent, then EOF
        if heartbeat is not None:
            _heartbeat.register(self)

    @classmethod
    def _open(cls, stream: Stream, role: str, **options: Any) -> Channel:
        timeout = options.pop("handshake_timeout", DEFAULT_HANDSHAKE_TIMEOUT)
        heartbeat = options.get("heartbeat")  # make_core checks its value
        try:
            core = make_core(
                trusted=stream.trusted,
                can_carry_handles=stream.can_send_handles,
                role=role,
                **options,
            )
        except BaseException:
            stream.close()
            raise
        return cls(stream, core, handshake_timeout=timeout, heartbeat=heartbeat)

    # --------------------------------------------------------------- properties

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called or the channel failed."""
        return self._closed

    @property
    def stream(self) -> Stream:
        """The transport stream under this channel."""
        return self._stream

    # ------------------------------------------------------------------ sending

    @burst_send(
        full="_quick_full",
        plain="_send_plain",
        count=QUICK_COUNT,
        limit=QUICK_MAX,
        round_trip=True,
    )
    def send(
        self,
        data: Any,
        handle: Any = None,
        *,
        handles: Sequence[Any] | None = None,
        keep_open: bool = True,
    ) -> None:
        """Send ``data``, and optionally handles, to the peer.

        Messages arrive whole and in the order they were sent. A message sent
        after an idle moment, or as the first send after a ``recv`` (a reply,
        the next request), is written at once; messages sent in a burst are
        coalesced into few writes, and any still buffered are written within
        about a millisecond (up to about 10 ms after a burst that lasted
        longer than that), or by the next ``recv``, ``flush`` or ``close``.

        ``handle`` is one socket, file object or :class:`Handle`; ``handles``
        a list of them. The caller may close its copy as soon as ``send``
        returns: on POSIX a native channel queues a duplicate of the fd
        (closed once written), so that a burst of handle messages is
        batched like plain ones; a lone one is written at once. On a
        ``protocol="node"`` channel (and on Windows) messages with handles
        are written before ``send`` returns, and on ``protocol="node"``
        ``send`` also waits for Node's acknowledgement, which every later
        message must wait for. With ``keep_open=True`` (the default) the
        sender keeps its copy; with ``keep_open=False`` ipcbus closes it
        once the peer has acknowledged receipt.

        Raises CodecError (a value the codec refuses, or over the size limit),
        HandleError (an object that is not a handle, or a channel that cannot
        carry handles), ChannelClosed, or the channel's earlier error.
        """
        if handle is None and handles is None:
            try:
                payload = self._fast_encode(data)
            except (TypeError, ValueError, OverflowError) as exc:
                raise encode_error(self._core.codec, data, exc) from exc
            # The burst path: once a burst has begun, a small message only
            # joins the burst's list (list.append needs no lock); the list
            # goes to the core, in order, before anything else is queued or
            # written (_settle).
            quick = self._quick
            if quick and len(payload) <= QUICK_MAX:
                quick.append(payload)
                if len(quick) >= QUICK_COUNT:
                    self._quick_full()
                return
            self._send_plain(payload)  # lone, a reply, a burst's first, large
            return
        if self._closed:
            raise ChannelClosed("send on a closed channel")
        described, multi, release = self._prepare_handles(handle, handles, keep_open)
        owns = self._owns_fds
        if owns and len(described) <= DUP_HANDLES_MAX and (
            self._quick or self._core.output_size or self._partial is not None
            or _monotonic() - self._last_write < LONE_SEND_GAP
        ):
            self._send_owned(data, described, multi, release)
            return
        # Written before send returns: the caller's own fds go out, lent
        # to the channel meanwhile (so that _write_out does not close them).
        borrowed = self._borrowed
        if owns:
            # A closed fd would fail the sendmsg (EBADF), which reads as a
            # closed channel: refuse it here, one fcntl per fd.
            for _, fd in described:
                try:
                    os.get_inheritable(fd)
                except OSError as exc:
                    raise HandleError(f"cannot send fd {fd}: {exc.strerror}") from exc
        with self._lock:
            if owns:
                for _, fd in described:
                    borrowed[fd] = borrowed.get(fd, 0) + 1
        try:
            with self._lock:
                if self._quick:
                    self._settle()
                self._core.send(data, described, multi=multi, release=release)
            self.flush()
            if getattr(self._core, "awaiting_ack", False):
                self._wait_handle_answer()  # (protocol="node")
        except BaseException:
            if release is not None:
                # Not sent: the caller keeps its handles (and may send them
                # on another channel); a later teardown must not close them.
                with self._lock:
                    self._core.withdraw_release(release)
            raise
        finally:
            if owns:
                with self._lock:
                    for _, fd in described:
                        if borrowed[fd] == 1:
                            del borrowed[fd]
                        else:
                            borrowed[fd] -= 1
        self._handle_sends += ACK_PUMP_EVERY
        if release is not None or self._handle_sends >= ACK_PUMP_EVERY * ACK_PUMP_EVERY:
            self._handle_sends = 0
            if self._core.releases_pending:
                self._pump_acks()

    def _send_plain(self, payload: bytes) -> None:
        if self._closed:
            raise ChannelClosed("send on a closed channel")
        if len(payload) >= DIRECT_WRITE and self._send_parts is not None and self._send_direct(payload):
            return
        # A send right after a read is a reply (or the next request), and a
        # send after an idle gap is lone: either goes out at once. Sends
        # closer together than that are a burst, written in batches; so are
        # sends while the kernel took only part of our last write (the peer
        # is behind: a write per message would only meet a full buffer).
        lone = self._partial is None and (
            self._read_since_write or _monotonic() - self._last_write >= LONE_SEND_GAP
        )
        if lone and not self._quick and self._write_lone(payload):
            return
        if not lone and self._quick_ok and len(payload) <= QUICK_MAX:
            self._core.check_can_send()
            self._quick.append(payload)
            self._schedule_flush()
            return
        self._lock_acquire()
        try:
            if self._quick:
                self._settle()
            before = self._core.send_encoded(payload)
        finally:
            self._lock_release()
        if before >= FLUSH_AT:
            self.flush()
        elif lone:
            self._flush_nowait()  # with whatever a finished burst left queued
        else:
            self._schedule_flush()

    def _write_lone(self, payload: bytes) -> bool:
        # Nothing of ours is queued: write header and payload in one
        # non-blocking send, past the core's queue. False (nothing done) if
        # the core has output or holds frames, or another thread is writing.
        if self._send_parts is None or not self._wlock_acquire(False):
            return False
        try:
            if self._partial is not None:
                return False
            # Without the core's lock: direct_header only reads the core and
            # forgets the last handle run. A frame another thread queues
            # meanwhile goes out after ours (sends from two threads have no
            # order), and a run it starts merely ends early.
            header = self._core.direct_header(len(payload))
            if header is None:
                return False
            frame = header + payload
            try:
                n = self._stream.send(frame, (), block=False)
            except IPCError as exc:
                self._write_failed(exc)
                raise
            self._wrote_lone(frame, n)
            return True
        finally:
            self._wlock_release()

    def _wrote_lone(self, frame: bytes, n: int) -> None:
        # After a lone frame's write, under the writer's lock (the C round
        # trip calls this when the kernel took only part of the frame).
        self._last_write = _monotonic()
        self._read_since_write = False
        if n < len(frame):
            # The peer is not reading: the rest is the next write's first
            # job, which the flusher does if nobody else comes first.
            self._partial = (memoryview(frame)[n:], [])
            self._schedule_flush()

    def _quick_full(self) -> None:
        with self._lock:
            self._settle()
            size = self._core.output_size
        if size >= FLUSH_AT:
            self.flush()  # backpressure: the peer is not keeping up
        else:
            self._flush_nowait()

    def send_many(self, values: Iterable[Any]) -> None:
        """Send each of ``values`` as a message of its own, in order: what a
        loop of ``send(value)`` does, in fewer steps (encoded in one pass and
        queued as one burst). Meant for many small messages.

        Every value is encoded before any is queued: if one cannot be (a
        CodecError naming its position, or one over the size limit), none of
        them is sent. What the kernel takes is written before ``send_many``
        returns, the rest like a burst's tail (within about 10 ms, or by the
        next ``recv``, ``flush`` or ``close``); once the output
        buffer is full it waits for the peer (backpressure), as ``send``
        does. Plain messages only: handles go with :meth:`send`.

        Raises CodecError, ChannelClosed, or the channel's earlier error.
        """
        if self._closed:
            raise ChannelClosed("send on a closed channel")
        payloads = encode_all(self._core.codec, self._fast_encode, values)
        if not payloads:
            return
        with self._lock:
            if self._quick:
                self._settle()
            self._core.send_encoded_many(payloads)
            size = self._core.output_size
        if size >= FLUSH_AT:
            self.flush()  # backpressure
        else:
            self._flush_nowait()

    def _send_owned(self, data: Any, described: list[tuple[bytes, int]], multi: bool, release: Any) -> None:
        # The caller may close its copies as soon as send returns, so the
        # queued message carries duplicates; _write_out closes them once
        # they are written, _teardown if they never are.
        dups = duplicate_fds(described)
        core = self._core
        self._lock_acquire()
        try:
            if self._quick:
                self._settle()
            before = core.output_size
            core.send(data, dups, multi=multi, release=release)
            queued_fds = core.queued_fds
        except BaseException:
            close_fds([fd for _, fd in dups])  # the core refused the message: not queued
            raise
        finally:
            self._lock_release()
        if (
            queued_fds >= HANDLE_FLUSH_AT
            or (before == 0 and _monotonic() - self._last_write >= LONE_SEND_GAP)
            or before >= FLUSH_AT
        ):
            self.flush()  # a lone handle message goes out now, a burst in runs
            weight = ACK_PUMP_EVERY
        else:
            weight = 1
            self._schedule_flush()
        if release is not None or core.releases_pending:
            # A write draws about one acknowledgement, however many messages
            # it carried: weigh writes, not messages.
            self._handle_sends += weight
            if release is not None or self._handle_sends >= ACK_PUMP_EVERY * ACK_PUMP_EVERY:
                self._handle_sends = 0
                self._pump_acks()

    def _close_owned(self, fds: list[int]) -> None:
        if fds and self._owns_fds:  # (POSIX only: plain os.close)
            borrowed = self._borrowed
            if borrowed:
                fds = [fd for fd in fds if fd not in borrowed]
            it = iter(fds)
            while True:
                try:
                    for fd in it:  # (a burst's worth of fds: keep the loop tight)
                        os.close(fd)
                    return
                except OSError:
                    pass  # that fd is gone either way: close the rest

    def _wait_handle_answer(self) -> None:
        # Node's protocol holds every later message until the peer answers a
        # handle (ACK or NACK). A blocking channel has no background reader,
        # so read here until the answer came; whatever else arrives waits in
        # the core for recv(). Another thread already in recv() may be the
        # one that reads it: poll the lock rather than queue behind it.
        core = self._core
        while core.awaiting_ack:
            if core.state == "EOF":
                raise ChannelClosed(f"{self._name}: the peer closed before acknowledging the handle")
            if core.state != "OPEN" or self._closed:
                return  # the channel's error is raised by the next call
            if self._rlock.acquire(timeout=0.05):
                try:
                    if core.awaiting_ack and core.state == "OPEN":
                        self._read(None)
                finally:
                    self._rlock.release()

    def _pump_acks(self) -> None:
        # A sender that never calls recv() must still see the peer's handle
        # acknowledgements: they release keep_open=False handles, and unread
        # they would fill the socket buffer back to us. Read what is there
        # without waiting; messages stay queued for recv().
        if self._closed or not self._rlock.acquire(blocking=False):
            return  # a thread in recv() is reading them
        try:
            try:
                data, fds = self._stream.receive(RECV_SIZE, SCM_MAX_FD, 0)
            except TimeoutError:
                return
            except ChannelClosed:
                data, fds = b"", []
            except IPCError as exc:
                self._fail(exc)
                return
            self._last_rx = _monotonic()
            with self._lock:
                self._core.receive_data(data, fds)
                events = self._core._events
                released = [ev for ev in events if type(ev) is HandlesReleased]
                for ev in released:
                    events.remove(ev)
        finally:
            self._rlock.release()
        for ev in released:
            self._release(ev)

    def flush(self, timeout: float | None = None) -> None:
        """Write everything sent so far, waiting for the peer as needed.

        TimeoutError if it could not all be written within ``timeout``.
        """
        deadline = None if timeout is None else _monotonic() + timeout
        with self._wlock:
            self._write_out(deadline)

    def _send_direct(self, payload: bytes) -> bool:
        # A large payload goes out as [header, payload] in one sendmsg, after
        # everything queued before it: never copied into an output segment.
        # False: the core wants it queued instead (frames held, say).
        with self._wlock:
            self._write_out(None)
            with self._lock:
                if self._quick:
                    self._settle()
                header = self._core.direct_header(len(payload))
            if header is None:
                return False
            parts = [memoryview(header), memoryview(payload)]
            try:
                while parts:
                    n = self._send_parts(parts)
                    while n:
                        if n >= len(parts[0]):
                            n -= len(parts.pop(0))
                        else:
                            parts[0] = parts[0][n:]
                            n = 0
            except IPCError as exc:
                self._write_failed(exc)
                raise
            self._last_write = _monotonic()
            self._read_since_write = False
        return True

    def _write_some(self) -> bool:
        # Write what the kernel takes, without waiting; True when nothing is
        # left. False too when another thread holds the writer lock: it may
        # already have looked at the queue for the last time.
        if not self._wlock.acquire(blocking=False):
            return False
        try:
            return self._write_out(None, block=False)
        finally:
            self._wlock.release()

    def _flush_nowait(self) -> None:
        # A send only blocks (backpressure) once FLUSH_AT bytes are waiting,
        # so what the kernel does not take now goes to the flusher.
        if not self._write_some():
            self._schedule_flush()

    def _write_out(self, deadline: float | None, *, block: bool = True) -> bool:
        # Called with _wlock held. Returns True when everything was written.
        stream = self._stream
        while True:
            if self._partial is None:
                with self._lock:
                    if self._quick:
                        self._settle()
                    seg = self._core.take_output()
                if seg is None:
                    return True
                view, fds = memoryview(seg[0]), seg[1]
            else:
                view, fds = self._partial
                self._partial = None
            while view:
                waiting = deadline is not None or not block
                try:
                    n = stream.send(view, fds, block=not waiting)
                except IPCError as exc:
                    self._close_owned(fds)
                    self._write_failed(exc)
                    raise
                if n == 0:
                    self._partial = (view, fds)
                    if not block:
                        return False
                    assert deadline is not None
                    remaining = deadline - _monotonic()
                    if remaining <= 0 or not stream.wait_writable(remaining):
                        raise TimeoutError(f"{self._name}: peer did not read within the timeout")
                    # We keep writing this view ourselves: a stale _partial
                    # would be written a second time once it is done.
                    if self._partial is None:
                        # Torn down meanwhile (its fds closed with it).
                        raise ChannelClosed(f"{self._name}: the channel was closed")
                    self._partial = None
                    continue
                if fds:
                    self._close_owned(fds)  # they rode on this write
                fds = []
                view = view[n:]
                self._last_write = _monotonic()
                self._read_since_write = False

    def _write_failed(self, exc: IPCError) -> None:
        if isinstance(exc, ChannelClosed):
            self._sending_failed(exc)
        else:
            self._fail(exc)

    def _sending_failed(self, exc: ChannelClosed) -> None:
        # The peer stopped reading (EPIPE, reset). Later sends raise
        # ChannelClosed; the stream stays open so that recv() still gets
        # the messages the peer sent before it closed.
        self._write_error = exc
        with self._lock:
            self._core.close_sending()
            self._drop_output()

    def _drop_output(self) -> None:
        # Called with _lock held: nothing queued will be written; close the
        # duplicated fds it carries.
        self._quick.clear()
        self._close_owned(self._core.drop_output())
        partial, self._partial = self._partial, None
        if partial is not None:
            self._close_owned(partial[1])

    def _schedule_flush(self) -> None:
        # Something is queued that no write of ours will take soon: the
        # flusher writes it (a burst's tail, a partial write, acknowledgements)
        # if recv, flush, close or the burst's own size do not come first.
        if not self._scheduled:
            self._scheduled = True
            self._flush_wait = _flusher.DELAY
            self._flush_mark = self._last_write
            _flusher.schedule(self)

    def _background_flush(self) -> float | None:
        if self._closed:
            self._scheduled = False
            return None
        # A burst whose sender has written from it since the last visit is
        # being written in full batches by the sender itself: leave it, and
        # look again later (the longer the burst lasts, the later, up to
        # HOLD_WINDOW). Writing parts of it from here, or waking every DELAY,
        # hands the GIL back and forth with the sending thread: a quarter of
        # a handle burst's throughput.
        last = self._last_write
        if last != self._flush_mark:
            self._flush_mark = last
            self._flush_wait = wait = min(self._flush_wait * 2, HOLD_WINDOW)
            # Due `wait` after that write, not after now: a burst that ended
            # just after the last look is written `wait` after its end, not
            # twice that.
            return max(last + wait - _monotonic(), _flusher.DELAY)
        self._scheduled = False
        try:
            done = self._write_some()
        except (IPCError, TimeoutError):
            return None
        self._flush_mark = self._last_write  # (our own write is not the sender's)
        return None if done else _flusher.DELAY  # the peer is slow: again soon

    def _exit_flush(self) -> None:
        if not self._closed:
            try:
                self.flush(timeout=2.0)
            except (IPCError, TimeoutError):
                pass

    def _heartbeat_tick(self, now: float) -> bool:
        # Called from the heartbeat thread; must never block on the peer.
        if self._closed:
            return False
        heartbeat = self._heartbeat
        assert heartbeat is not None
        if now - self._last_write < heartbeat / _heartbeat.PINGS_PER_PERIOD:
            return True
        with self._lock:
            core = self._core
            # Before the handshake a ping would sit between the peer's hello
            # and its proof; with output still unwritten, a ping adds nothing.
            if not core.established or self._quick or core.has_output() or self._partial is not None:
                return True
            try:
                core.send_ping()
            except IPCError:
                return False
        self._schedule_flush()
        return True

    # ---------------------------------------------------------------- receiving

    @lazy_recv(failed="_lazy_failed", round_trip=True)
    def recv(self, timeout: float | None = None) -> Message:
        """The next message: ``data, handle = channel.recv()``.

        Internal messages (the library's own, and prefixes claimed with
        :meth:`on_internal`) never come out here; claimed ones go to their
        callback from inside this call. Raises ChannelClosed when the peer
        has closed the channel and every message before that was received,
        TimeoutError past ``timeout`` seconds (the channel stays usable), and
        a ProtocolError / HandleError / CodecError when the peer sent
        something invalid (the channel is then closed).
        """
        core = self._core
        lazy = core._lazy
        if lazy is not None:
            # Fast path: the next value of a batch being delivered (one step
            # of C iterators; the core ends the batch in next_event below).
            try:
                for message in lazy:
                    return message
            except Exception as exc:  # the decoder's own exception types
                self._lazy_failed(exc)
        elif core._events:
            message = self._take_parsed()
            if message is not None:
                return message
        elif (
            timeout is None and self._simple_read and core._state is _CORE_OPEN and not self._closed
            and self._rlock_acquire(False)
        ):
            # The round-trip path: nothing parsed is waiting and nothing of
            # ours is queued, so one read, parsed, is the answer.
            try:
                if not (
                    self._quick or self._partial is not None or core._out or core._pending or core._events
                    or core._big is not None
                ):
                    try:
                        data, fds = self._stream.receive(RECV_SIZE, SCM_MAX_FD, None)
                    except ChannelClosed:
                        data, fds = b"", []  # a reset is an end of stream
                    except IPCError as exc:
                        if self._closed:
                            self._closed_under_read([])
                        self._fail(exc)
                        raise
                    message = self._read_done(data, fds)
                    if message is not None:
                        return message
            finally:
                self._rlock_release()
        deadline = None if timeout is None else _monotonic() + timeout
        lock = self._lock
        with self._rlock:
            if core._lazy is None and not core._events and core.state == "OPEN":
                self._read(deadline)  # nothing parsed is waiting: read first
            while True:
                try:
                    with lock:
                        ev = core.next_event()
                except IPCError as exc:
                    self._fail(exc)  # outside the lock: _fail takes it
                    raise
                if type(ev) is Message:
                    return ev
                if ev is NEED_DATA:
                    self._read(deadline)
                    continue
                result = self._handle_event(ev)
                if result is not None:
                    return result

    def _read_done(self, data: bytes, fds: list[int], lone_tried: bool = False) -> Message | None:
        # The round trip's read is in (the reader's lock held): its message,
        # or None for recv's general path. The C round trip calls this for
        # every read it does not parse itself, with the fds SocketStream
        # would have returned (a read that failed there is done again here),
        # and lone_tried when it already tried lone_message's shortcut.
        if self._closed:
            self._closed_under_read(fds)
        self._read_since_write = True
        core = self._core
        if not fds and not lone_tried:
            # Exactly one plain frame (the answer)? Parsed under the reader's
            # lock alone (lone_message touches no state that senders do).
            message = core.lone_message(data)
            if message is not None:
                return message
        self._lock_acquire()
        try:
            core.feed(data, fds)  # (the shortcut was tried above)
        finally:
            self._lock_release()
        if core._out or core._pending:
            self._answer(0, True)
        if core._events and core._lazy is None:
            return self._take_parsed()
        return None

    def _read_done_ancillary(self, data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int) -> Message | None:
        # _read_done for the C round trip's read that carried control data
        # (or was truncated): its fds as SocketStream.receive makes them.
        try:
            fds = self._stream.fds_received(ancdata, flags)
        except IPCError as exc:
            self._fail(exc)
            raise
        return self._read_done(data, fds)

    def _closed_under_read(self, fds: list[int]) -> None:
        # close() ran (in another thread) while this thread was reading: what
        # the read brought is dropped, as close drops what was not received.
        close_fds(fds)
        raise ChannelClosed("recv on a closed channel (closed while it waited)")

    def recv_many(self, max_count: int = RECV_MANY_MAX, timeout: float | None = None) -> list[Message]:
        """The next message, waited for as :meth:`recv` does, and after it
        those that have already arrived, without waiting: a list of 1 to
        ``max_count`` messages, in order. Cheaper per message than ``recv``
        for a reader that handles messages in chunks. (A chunk's messages
        live at once: much larger chunks cost the cyclic GC more than the
        calls they save.)

        Takes what was already read and parsed; it never waits for more once
        it has one message. Errors as :meth:`recv`; a fault found after the
        first message (a bad value, the peer's EOF) is raised by the next
        call, after the messages before it are returned.
        """
        check_max_count(max_count)
        out = [self.recv() if timeout is None else self.recv(timeout)]  # (recv() has the fast path)
        self._take_ready(out, max_count, self._lock)
        return out

    def _lazy_failed(self, exc: Exception) -> None:
        # A value of the batch being delivered did not decode: the core
        # queues the error where the batch broke (the caller then asks it).
        with self._lock:
            self._core.batch_failed(exc)

    def _take_parsed(self) -> Message | None:
        # A message already parsed, taken without the locks: deque.popleft
        # is atomic, and the error (if any) is queued behind the events
        # before it. None: the next event is something else (or none).
        events = self._core._events
        try:
            ev = events.popleft()
        except IndexError:
            return None
        if type(ev) is Message:
            return ev
        if type(ev) is RawMessage:
            try:  # ours now: restore it without the locks
                return self._restore(ev)
            except IPCError as exc:
                self._fail(exc)
                raise
        events.appendleft(ev)
        return None

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

    def _read(self, deadline: float | None) -> None:
        if self._closed:
            raise ChannelClosed("recv on a closed channel")
        core = self._core
        if self._quick or self._partial is not None or core.has_output():
            self._flush_before_read(deadline)
        hs_limited = hb_limited = False
        if deadline is None and self._heartbeat is None and core.established:
            timeout = None  # the common case: wait as long as it takes
        else:
            hs_deadline = None if core.established else self._handshake_deadline
            timeout = None if deadline is None else max(0.0, deadline - _monotonic())
            if hs_deadline is not None:
                hs_left = max(0.0, hs_deadline - _monotonic())
                if timeout is None or hs_left < timeout:
                    timeout, hs_limited = hs_left, True
            elif self._heartbeat is not None:
                # Data already waiting in the kernel counts: a timeout of 0
                # still reads it, so a late recv() does not mistake its own
                # delay for a silent peer.
                hb_left = max(0.0, self._last_rx + self._heartbeat - _monotonic())
                if timeout is None or hb_left < timeout:
                    timeout, hb_limited = hb_left, True
        # The rest of a large frame is read straight into its buffer.
        target = core.receive_buffer() if type(core) is Connection else None
        try:
            if target is not None:
                nbytes, fds = self._stream.receive_into(target, SCM_MAX_FD, timeout)
                data = None
            else:
                data, fds = self._stream.receive(RECV_SIZE, SCM_MAX_FD, timeout)
        except TimeoutError:
            if hs_limited or hb_limited:
                if hs_limited:
                    exc: IPCError = HandshakeTimeout(
                        f"{self._name}: the peer did not complete the handshake in time"
                    )
                else:
                    exc = HeartbeatTimeout(
                        f"{self._name}: nothing from the peer for {self._heartbeat:g} s (heartbeat); "
                        "it is dead, stopped or unreachable"
                    )
                self._fail(exc)
                raise exc from None
            raise
        except ChannelClosed:
            data, fds = b"", []  # a reset is an end of stream, read as such
        except IPCError as exc:
            if self._closed:
                self._closed_under_read([])
            self._fail(exc)
            raise
        if self._closed:
            self._closed_under_read(fds)
        if self._heartbeat is not None:
            self._last_rx = _monotonic()
        self._read_since_write = True
        with self._lock:
            if self._quick:
                self._settle()
            before = core.output_size
            was_open = core.state == "OPEN"
            if data is None:
                core.received_into(nbytes, fds)
            else:
                core.receive_data(data, fds)
            if not core.has_output():
                return  # nothing to answer (no acknowledgement, pong, hello)
        self._answer(before, was_open)

    def _answer(self, before: int, was_open: bool) -> None:
        # A read left output in the core: acknowledgements, a pong, or the
        # handshake's reply. ``before``: bytes queued before that read.
        after = self._core.output_size
        acks_only = not before or before == self._ack_mark
        if was_open and acks_only and self._partial is None and after < ACK_WRITE_AT:
            # Only acknowledgements (and pongs) are queued: leave them for the
            # flusher (a millisecond or a few), so that a stream of handle
            # messages is acknowledged in a few writes, not one per message;
            # each write would wake the sender, which steals the CPU from us.
            self._ack_mark = after
            self._schedule_flush()
        else:
            # Handshake replies go out now, without waiting.
            try:
                self._write_some()
            except (IPCError, TimeoutError):
                pass

    def _flush_before_read(self, deadline: float | None) -> None:
        core = self._core
        pending = (
            bool(self._quick)
            or (core.has_output() and core.output_size != self._ack_mark)
            or self._partial is not None
        )
        if pending and self._write_error is None:
            # A request must be out before we wait for its answer (queued
            # acknowledgements alone can wait for the flusher).
            hs_deadline = None if core.established else self._handshake_deadline
            until = deadline if hs_deadline is None else min(deadline or hs_deadline, hs_deadline)
            self._drain_output(until)

    def _drain_output(self, until: float | None) -> None:
        # Write what is queued without ever blocking on a peer that may itself
        # be blocked writing to us (its send buffer full of handle frames, ours
        # of their acknowledgements): wait for "writable or readable" and
        # return as soon as there is something to read.
        fileno = getattr(self._stream, "fileno", None)
        if fileno is None or not hasattr(select, "poll"):
            self.flush()
            return
        if not self._wlock.acquire(blocking=False):
            return  # another thread is writing; it finishes the job
        try:
            while not self._write_out(None, block=False):
                timeout = None if until is None else until - _monotonic()
                if timeout is not None and timeout <= 0:
                    return
                poller = select.poll()
                poller.register(fileno(), select.POLLIN | select.POLLOUT)
                ready = poller.poll(None if timeout is None else timeout * 1000)
                if any(mask & (select.POLLIN | select.POLLHUP | select.POLLERR) for _, mask in ready):
                    return
        finally:
            self._wlock.release()

    def wait_handshake(self, timeout: float | None = None) -> None:
        """Block until the peer's hello (and proof, with a key) was accepted.

        ``connect()`` does this before returning; a listener's channels do it
        lazily on their first ``recv``. Raises HandshakeError,
        HandshakeTimeout or ChannelClosed.
        """
        deadline = None if timeout is None else _monotonic() + timeout
        with self._rlock:
            # EOF counts as "established" in the core; a peer that closed
            # before its hello is a failed handshake, not a connected channel.
            while not self._core.established or self._core.peer is None:
                with self._lock:
                    state = self._core.state
                if state == "ERROR":
                    try:
                        with self._lock:
                            self._core.next_event()  # raises the error
                    except IPCError as exc:
                        self._fail(exc)
                        raise
                if state == "EOF":
                    raise HandshakeError(f"{self._name}: the peer closed before the handshake")
                try:
                    self._read(deadline)
                except IPCError as exc:
                    self._fail(exc)
                    raise

    def __iter__(self) -> Iterator[Message]:
        """Messages until the peer closes the channel (then the loop ends)."""
        core = self._core
        recv = self.recv
        while True:
            lazy = core._lazy
            if lazy is not None:
                # A batch being delivered: straight from its C iterator.
                try:
                    yield from lazy
                except Exception as exc:  # the decoder's own exception types
                    self._lazy_failed(exc)
            try:
                yield recv()
            except ChannelClosed:
                if self._closed and not self._read_eof:
                    raise
                return

    # ------------------------------------------------------------------ closing

    def _fail(self, exc: BaseException) -> None:
        # A fault on this channel ends it; the error stays (sticky).
        if not self._closed:
            log_auth_failure(exc, self._stream)
        with self._lock:
            self._core.fail_locally(exc)
        self._teardown()

    def _teardown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._rt_fd = -1  # before the fd is closed (and its number reused)
        self._core.close_sending()
        try:
            if self._rlock.locked() and self._pid == os.getpid():
                # A thread may be blocked in recv(): closing the fd would not
                # wake it. Its read now ends, and it raises ChannelClosed.
                # (Not in a forked copy: its socket is the parent's too.)
                self._stream.interrupt_reads()
            self._stream.close()
        finally:
            with self._lock:
                self._discard_pending()
                self._drop_output()

    def close(self, timeout: float | None = None) -> None:
        """Flush what was sent, then close. Idempotent.

        A thread blocked in ``recv`` (or a ``for`` loop) on this channel is
        woken, and raises ChannelClosed; a forked child's copy of the
        channel closes only its own descriptor. Handles received in
        messages never taken by ``recv`` are closed, and
        so are ``keep_open=False`` handles the peer never acknowledged. With
        ``timeout``, gives up flushing after that many seconds (TimeoutError,
        the channel closed anyway).
        """
        if self._closed:
            return
        try:
            self.flush(timeout)
        except (IPCError, OSError):
            pass  # the peer is gone: nothing more can be delivered
        finally:
            self._teardown()

    def __enter__(self) -> Channel:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else self._core.state.lower()
        return f"<ipcbus.Channel {self._name} codec={self._core.codec.name} {state}>"


class Listener:
    """Accepts channels on a transport address (blocking API).

    ``accept()`` returns as soon as a peer is admitted (credential checks are
    done); the peer's hello is checked on the channel's first use, so one
    slow or hostile peer never stalls the accept loop.
    """

    def __init__(self, listener: TransportListener, options: dict[str, Any]) -> None:
        self._listener = listener
        self._options = options
        # Fail at listen time, not at the first accept, for a codec that is
        # refused here (pickle without a key).
        try:
            make_core(trusted=False, can_carry_handles=False, role="server", **{
                k: v for k, v in options.items() if k != "handshake_timeout"
            })
        except BaseException:
            listener.close()  # the bound socket must not outlive the error
            raise

    @property
    def address(self) -> str:
        """The URL peers connect to, with the real path or port."""
        return self._listener.address

    def accept(self, timeout: float | None = None) -> Channel:
        """The next channel. TimeoutError past ``timeout``; TransportError
        if the listener failed."""
        stream = self._listener.accept(timeout)
        return Channel._open(stream, "server", **self._options)

    def close(self) -> None:
        """Stop listening and remove the socket file it created."""
        self._listener.close()

    def __iter__(self) -> Iterator[Channel]:
        while True:
            yield self.accept()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ipcbus.Listener {self.address}>"


def pair(codec: str | Codec = "msgpack", **options: Any) -> tuple[Channel, Channel]:
    """Two connected channels over a socketpair (both in this process).

    Pass one end to a child process, or use both ends from two threads.
    Handles can be sent; pickle is allowed (the peer is this process or one
    it starts).
    """
    if sys.platform == "win32":  # Windows: a named-pipe pair (transports/_pipe.py)
        from .transports._pipe import open_channel_pair

        return open_channel_pair(Channel, codec, options)
    a, b = socketpair_sockets()
    ends = []
    try:
        for sock in (a, b):
            stream = SocketStream(sock, name="socketpair", trusted=True)
            ends.append(Channel._open(stream, "peer", codec=codec, **options))
    except BaseException:
        a.close()
        b.close()
        raise
    return ends[0], ends[1]


def listen(url: str, **options: Any) -> Listener:
    """Listen on ``url`` (``unix:///path``, ``unix-abstract://name``,
    ``tcp://host:port``...).

    Channel options: ``codec``, ``max_message_size``, ``max_handles``,
    ``internal_prefix``, ``authkey``, ``handshake_timeout``, ``heartbeat``
    (seconds: ``recv`` raises HeartbeatTimeout when nothing arrived from the
    peer for that long, and idle channels send pings; set it on both ends).
    Other keyword arguments go to the transport (for unix: ``allowed_uids``,
    ``backlog``, ``mode``; for tcp: ``ssl_context``, ``backlog``...); a
    transport refuses ones it does not know with TypeError.

    A transport that crosses machines (tcp) needs ``authkey``; without one,
    listen and connect raise TransportError unless
    ``allow_unauthenticated=True`` is passed and the address is loopback.
    """
    allow_unauthenticated = bool(options.pop("allow_unauthenticated", False))
    scheme, address = split_url(url)
    chan_opts, trans_opts = split_options(options)
    transport = get_transport(scheme)
    check_authentication(transport, scheme, address, chan_opts, allow_unauthenticated)
    return Listener(transport.listen(address, **trans_opts), chan_opts)


def connect(url: str, **options: Any) -> Channel:
    """Connect to ``url`` and complete the handshake before returning.

    Takes the same channel options as :func:`listen`, plus the transport's
    own. Raises TransportError (nobody there), HandshakeError (the peer
    disagrees: version, codec; AuthenticationError for a wrong key),
    HandshakeTimeout.
    """
    allow_unauthenticated = bool(options.pop("allow_unauthenticated", False))
    scheme, address = split_url(url)
    chan_opts, trans_opts = split_options(options)
    transport = get_transport(scheme)
    check_authentication(transport, scheme, address, chan_opts, allow_unauthenticated)
    stream = transport.connect(address, **trans_opts)
    channel = Channel._open(stream, "client", **chan_opts)
    try:
        channel.wait_handshake()
    except BaseException:
        channel.close()
        raise
    return channel

