"""One client connection: the trio shell around the sans-I/O pieces.

At most two tasks per live connection, both in the connection's nursery:

* the **reader** owns the input side. On a socket it mostly sleeps: the
  server's :class:`~relay.server.reactor.Reactor` watches the socket and,
  in its turn, reads the bytes, feeds the fast-path :class:`FrameParser`,
  hands binary messages to the :class:`Session` and serves every event that
  needs no waiting (ACK, SEND with a free slot and queue room, SIGNAL,
  errors) without waking the task (:meth:`Connection.on_readable`). What
  must wait (REQ, AUTH, READ, SEND_GROUP, a SEND without room, replies
  piled up) wakes the reader, which serves it and gives the socket back to
  the reactor;
* the **delivery pump** finishes what a direct write left: it sends what
  the socket did not take, then everything queued after it, and the close
  frame. It is started by the first such write, so a connection whose
  socket always keeps up never has one.

Output is written at the end of a reactor turn: each connection with new
output gathers queued replies (READY, SENT, RES, ERROR), ephemeral signals
and, within the flow window, inbox entries read from the store, and writes
them as few WebSocket messages as possible with one non-blocking send
(:mod:`relay.server.flush`). Output queued inside a turn (SENT, MSG and
RECEIPT from commit callbacks, errors from served input) is written at the
end of that turn, output queued outside one (the reader's replies) at the
end of the next. Only while the pump is not writing; what the socket does
not take is left to the pump, which sends it first.

Nothing about a message lives only here: entries are read from the inbox
every time, so a cut connection loses nothing. Memory per connection is
bounded: replies by ``MAX_QUEUED_REPLIES`` (the reader stops reading when
they pile up), SENDs in flight by ``max_unacked_sends``, entries by the
window, signals by ``MAX_QUEUED_SIGNALS`` (dropped beyond, they are
ephemeral).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import outcome
import trio

from relay.errors import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_REPLACED,
    CLOSE_UNSUPPORTED_DATA,
    FORBIDDEN,
    INTERNAL,
    NOT_FOUND,
    RATE_LIMITED,
    FrameError,
    StoreFullError,
)
from relay.protocol import frames
from relay.protocol.handshake import ServerHandshake
from relay.protocol.limits import TokenBucket
from relay.protocol.session import Session
from relay.protocol.window import DeliveryWindow
from relay.server import auth
from relay.server.clock import now_ms
from relay.server.context import ServerContext
from relay.server.groups import Groups
from relay.server.parking import ParkedConnection, ParkingLot
from relay.server.requests import RequestHandler
from relay.server.wire_errors import wire_error
from relay.store.base import (
    ENTRY_MSG,
    ENTRY_MSG_REF,
    Appended,
    AppendEntries,
    DeleteUpTo,
    InboxEntry,
    Store,
    Stored,
    StoreMessage,
    group_of_body,
)

log = logging.getLogger(__name__)

# What a reader serves in order: WebSocket messages (opcode, payload) and
# the client events and errors a binary message decodes to.
_Work = tuple[int, bytes] | frames.ClientEvent | FrameError


class _Timer(enum.Enum):
    """What the reader's wait for input gets when the timer sweep woke it instead."""

    FIRED = enum.auto()


# Where a live connection reads without a cancel scope (see _read_loop).
_NO_SCOPE = contextlib.nullcontext()

RECEIVE_BYTES = 65536
MAX_QUEUED_REPLIES = 4096
MAX_QUEUED_SIGNALS = 64
CLOSE_TIMEOUT_S = 2.0


def _valid_close_code(code: int) -> bool:
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011) or 3000 <= code <= 4999


@dataclass(frozen=True, slots=True)
class Handlers:
    """What connections hand events to, above the context, and the connections
    being served; one per server."""

    requests: RequestHandler
    groups: Groups
    parking: ParkingLot
    # Connections being served (parked ones are the parking lot's): the
    # server's timer sweep and its shutdown go through them.
    live: set[Connection] = field(default_factory=set)


class Connection:
    """Serve one accepted stream until it closes; see the module docstring."""

    # A __dict__ of this many attributes is 1.6 KiB per live connection.
    __slots__ = (
        "_aborted", "_close_deadline", "_close_frame", "_close_sent", "_closing", "_control", "_drained",
        "_fd", "_flush_deferred", "_io", "_inbox_dirty", "_last_input", "_offered", "_output_batch", "_parking",
        "_peer_closed", "_pump_due", "_pump_sleeping", "_pump_started", "_pushed", "_read_scope", "_reader",
        "_ready", "_receiving", "_replies", "_request_bucket", "_resume", "_nursery", "_scope", "_sending",
        "_sends_changed", "_sends_in_flight", "_signal_bucket", "_signals", "_sock", "_timer_fired",
        "_unsent", "challenge", "ctx", "dead", "device", "fp", "handlers", "parser", "session", "settings",
        "stream", "user", "window",
    )

    def __init__(
        self, ctx: ServerContext, handlers: Handlers, stream: trio.abc.Stream, resume: ParkedConnection | None = None
    ) -> None:
        self.ctx = ctx
        self.handlers = handlers
        self._resume = resume
        self._parking: ParkedConnection | None = None
        # The pump's wake-up: due, and its task while it sleeps. Not a
        # trio.Event: one per wake-up, its wait() frame and abort closure are
        # 1 KiB that every idle connection kept.
        self._pump_due = False
        self._pump_sleeping: trio.lowlevel.Task | None = None
        # The pump is started by the first output the socket does not take at
        # once (or a close frame); until then there is no task for it.
        self._pump_started = False
        self._last_input = trio.current_time()
        # Input from a socket is read by the reactor (on_readable).
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        # The pump is inside send_all: nobody else may write to the socket.
        self._sending = False
        # Gathered for a direct flush but not taken by the socket: the pump sends it first.
        self._unsent = b""
        self._flush_deferred = False
        self._output_batch = ctx.output_batch
        self.settings = ctx.settings
        self.fp = ctx.fastpath
        self._io = ctx.reactor.io
        self.stream = stream
        # Known from the start for a resumed session: the router files the
        # connection by its device.
        self.user: str | None = None if resume is None else resume.user
        self.device: int | None = None if resume is None else resume.device
        self.session = Session(
            self.settings.max_frames_per_message, self.settings.max_message_bytes, self.fp.decode_sends_and_acks
        )
        self.parser = self.fp.FrameParser(self.settings.max_message_bytes, True)
        self.challenge = os.urandom(32)
        self.window = DeliveryWindow(self.settings.window)
        # Made full by the first REQ or SIGNAL, as full as one made now would
        # be by then; most connections never send either.
        self._request_bucket: TokenBucket | None = None
        self._signal_bucket: TokenBucket | None = None
        # Pushed MSG entries not yet acked: an ACK turns them into receipts
        # without reading the inbox again. At most a window's worth; made by
        # the first push (a deque is 0.7 KiB, and many connections idle).
        self._pushed: deque[InboxEntry] | None = None
        self._replies: list[bytes] = []
        self._signals: list[bytes] = []
        self._control: list[bytes] = []
        # Made by whoever waits on them, and the close frame's by begin_close:
        # most connections never need them, and each trio.Event is 0.3 KiB.
        self._drained: trio.Event | None = None
        self._close_sent: trio.Event | None = None
        self._close_frame: bytes | None = None
        self._closing = False
        self._peer_closed = False
        self._ready = False
        self._inbox_dirty = False
        self._offered: list[InboxEntry] = []
        self._sends_in_flight = 0
        self._sends_changed: trio.Event | None = None
        # The reader's cancel scope, while it reads under one (see _read_loop).
        self._read_scope: trio.CancelScope | None = None
        # When the reader must give up waiting anyway (set by begin_close).
        self._close_deadline = float("inf")
        # The reader waits for input (in _read_loop); the server's timer sweep
        # interrupts it only then, and says so in _timer_fired.
        self._receiving = False
        self._timer_fired = False
        self._scope: trio.CancelScope | None = None
        # The connection's nursery while the reader runs in it; once the reader
        # is done it only winds down, and may close before serve() resumes.
        self._nursery: trio.Nursery | None = None
        # The reader task while it waits for input and the reactor serves the socket.
        self._reader: trio.lowlevel.Task | None = None
        self._aborted = False
        self.dead = False

    # --- called by others (router, writers' callbacks, the server) --------

    def wake(self) -> None:
        """The inbox has new entries (or the window has room): let the pump look."""
        self._inbox_dirty = True
        self._kick()

    def offer(self, entry: InboxEntry) -> None:
        """A committed entry for this device, handed over from memory: the pump
        sends it without reading the inbox when it is the next seq due."""
        offered = self._offered
        # Not kept when the pump would drop it: it reads the store anyway (the
        # inbox is dirty) or the window has no room for it. A sender's receipts
        # from a fan-out come a thousand at a time into a window of 256.
        if self._inbox_dirty or len(offered) >= self.window.capacity():
            self._inbox_dirty = True
        else:
            offered.append(entry)
        self._kick()

    def push_ephemeral(self, frame: bytes) -> bool:
        if self._closing or len(self._signals) >= MAX_QUEUED_SIGNALS:
            return False
        self._signals.append(frame)
        self._kick()
        return True

    def _kick(self) -> None:
        """New output: written at the end of the open output batch, or of the
        next reactor turn's outside one; by the pump for other streams."""
        if self._flush_deferred:
            return
        if self._sock is None:
            self._wake_pump()
        elif self._output_batch.defer(self):
            self._flush_deferred = True
        else:
            # Not in a reactor turn (the reader task replied, a parked session
            # resumed): the next turn writes it, so most connections never
            # need a pump task (1.5 KiB with its frames, per live connection).
            self._flush_deferred = True
            self.ctx.reactor.soon(self._kick_in_turn)

    def _kick_in_turn(self) -> None:
        self._flush_deferred = False
        self._kick()

    def _wake_pump(self) -> None:
        self._pump_due = True
        task = self._pump_sleeping
        if task is not None:
            self._pump_sleeping = None
            trio.lowlevel.reschedule(task)
        elif not self._pump_started and self._nursery is not None:
            self._pump_started = True
            self._nursery.start_soon(self._pump)

    def _abort_pump_sleep(self, _: object) -> trio.lowlevel.Abort:
        self._pump_sleeping = None
        return trio.lowlevel.Abort.SUCCEEDED

    def flush(self) -> bool:
        """Write the queued output now, without the pump, when nothing stands in
        the way (else the pump is woken). False when the socket took only part
        of it: the pump sends the rest, before anything else."""
        self._flush_deferred = False
        if self.dead:
            return True
        if self._sock is None or self._sending or self._unsent or self._close_frame is not None:
            self._wake_pump()
            return True
        data, _ = self._gather()
        if not data:
            return True
        try:
            sent = self._io.write_some(self._fd, data)
        except OSError:
            sent = 0  # the pump's send_all meets the same error and ends the connection
        if sent < len(data):
            self._unsent = data[sent:]
            self._wake_pump()
            return False
        if self._drained is not None:
            self._drained.set()
        return True

    def replace(self) -> None:
        """The same device authenticated again elsewhere (close 4409)."""
        self.begin_close(CLOSE_REPLACED, "connected elsewhere")

    def abort(self) -> None:
        """Drop the TCP connection at once (RST, no close frame): for operators
        and for tests that cut connections the way a network does."""
        self._aborted = True
        if self._scope is not None:
            self._scope.cancel()

    def begin_close(self, code: int, reason: str = "") -> None:
        """Send a close frame after what is queued; the reader then waits for the peer's."""
        if self._closing:
            return
        self._closing = True
        self._close_frame = self.ctx.close_frame(code, reason)
        self._close_sent = trio.Event()
        self._wake_pump()
        self._close_deadline = min(self._close_deadline, trio.current_time() + CLOSE_TIMEOUT_S + 1)
        if self._read_scope is not None:
            self._read_scope.deadline = self._close_deadline
        else:
            # At the end of the turn (on_readable may be about to wake the
            # reader itself), a reader still waiting goes on under a scope.
            self.ctx.reactor.soon(self._scope_reader)

    def _scope_reader(self) -> None:
        if self._read_scope is None and self._reader is not None:
            self._interrupt_reader()

    def _queue_reply(self, frame: bytes) -> None:
        if not self.dead:
            self._replies.append(frame)
            self._kick()

    def queue_sent(self, msg_id: bytes, ts: int) -> None:
        self._queue_reply(frames.encode_sent(msg_id, ts))

    def queue_error(self, error: FrameError) -> None:
        if error.req_id is not None:
            reply = frames.encode_res(error.req_id, False, {"code": error.code, "reason": error.reason})
        else:
            reply = frames.encode_error(error.ref, error.code, error.reason)
        self._queue_reply(reply)
        if error.close is not None:
            self.begin_close(error.close, error.reason[:100])

    # --- the connection's life ----------------------------------------------

    async def serve(self) -> None:
        self.handlers.live.add(self)
        try:
            if self._resume is not None:
                self._resume_session(self._resume)
                trailing = b""
            else:
                handshaken = await self._handshake()
                if handshaken is None:
                    return
                trailing = handshaken
                self._queue_reply(frames.encode_hello(self.settings.server_name, self.challenge, now_ms()))
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                self._nursery = nursery
                if self._pump_due:
                    # Output the socket did not take before the nursery was open.
                    self._wake_pump()
                try:
                    await self._read_loop(trailing)
                finally:
                    self._nursery = None
                if self._parking is not None:
                    nursery.cancel_scope.cancel()
                elif self._close_sent is not None:
                    # Closing (begin_close): let the pump send the close frame.
                    with trio.move_on_after(CLOSE_TIMEOUT_S):
                        await self._close_sent.wait()
                nursery.cancel_scope.cancel()
        except Exception as exc:
            # The peer going away mid-write is how connections end, not a failure.
            failure: BaseException | None = exc
            if isinstance(exc, BaseExceptionGroup):
                failure = exc.split((trio.BrokenResourceError, trio.ClosedResourceError))[1]
            elif isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError):
                failure = None
            if failure is not None:
                log.error("connection failed", exc_info=failure)
        finally:
            self.dead = True
            parking = self._parking
            try:
                if parking is not None and isinstance(self.stream, trio.SocketStream) and not self._closing:
                    # Hand the socket over without closing it: the session goes on parked.
                    self.handlers.parking.park(parking, self.stream.socket.detach())
                else:
                    await self._close(parking)
            finally:
                self.handlers.live.discard(self)

    async def _close(self, parking: ParkedConnection | None) -> None:
        if self.user is not None and self.device is not None:
            self.ctx.router.detach(self, self.user, self.device)
        if parking is not None:
            self.ctx.router.detach(parking, parking.user or "", parking.device or 0)
        if self._aborted and isinstance(self.stream, trio.SocketStream):
            # Linger 0: close() sends RST, like a cut network.
            with contextlib.suppress(OSError):
                self.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await self.stream.aclose()

    async def _handshake(self) -> bytes | None:
        handshake = ServerHandshake()
        with trio.move_on_after(self.settings.handshake_timeout_s):
            while True:
                data = bytes(await self.stream.receive_some(RECEIVE_BYTES))
                outcome = handshake.receive_data(data)
                if outcome is None:
                    continue
                await self.stream.send_all(outcome.response)
                return outcome.trailing if outcome.accepted else None
        return None

    def _resume_session(self, parked: ParkedConnection) -> None:
        """Continue a parked session on this new Connection: READY, window after ``acked``."""
        assert parked.user is not None and parked.device is not None
        self.session.authenticated(parked.user, parked.device)
        self.window.start_at(parked.acked)
        self._last_input = parked.idle_deadline - self.settings.idle_timeout_s
        self._ready = True
        self.wake()

    def _parkable(self) -> bool:
        """Nothing read, written, committed or pushed is pending on this connection."""
        return (
            self._ready
            and not self._pump_due
            and (self._pump_sleeping is not None or not self._pump_started)
            and not self._flush_deferred
            and not self._unsent
            and not self._closing
            and not self._replies
            and not self._signals
            and not self._control
            and not self._offered
            and self._sends_in_flight == 0
            and self.window.in_flight() == 0
            and self.parser.buffered() == 0
            and isinstance(self.stream, trio.SocketStream)
        )

    async def _read_loop(self, data: bytes) -> None:
        # No timeout around each read: a cancel scope per wait cost more than
        # a third of a message at 10k msg/s. The server's timer sweep
        # (check_timers) wakes a reader that has waited long enough; it goes
        # on, or the connection parks or closes. On a socket a reader needs no
        # cancel scope for that (a scope is 0.7 KiB of every live connection),
        # only once the connection is closing: the close deadline then ends
        # whatever the reader waits for. Other streams read under one always.
        idle = self.settings.idle_timeout_s
        while True:
            self._timer_fired = False
            scoped = self._closing or self._sock is None
            self._read_scope = trio.CancelScope(deadline=self._close_deadline) if scoped else None
            with self._read_scope or _NO_SCOPE:
                while True:
                    if data:
                        self._last_input = trio.current_time()
                        if await self._handle_bytes(data):
                            return
                    if self._closing and not scoped:
                        self._timer_fired = True
                        break  # read on under a scope with the close deadline
                    # Wait for input. On a socket the reactor reads it and serves
                    # what needs no waiting (on_readable) while this task sleeps;
                    # it hands back what is left for the task: a deque of work,
                    # b"" at EOF, or None when the input ended the connection; or
                    # the timer sweep wakes it with _Timer.FIRED. (Not a method:
                    # its frame would be one more for every live connection.)
                    self._receiving = True
                    try:
                        if self._sock is None:
                            got: bytes | deque[_Work] | _Timer | None = bytes(
                                await self.stream.receive_some(RECEIVE_BYTES)
                            )
                        else:
                            self._reader = trio.lowlevel.current_task()
                            self.ctx.reactor.watch(self._fd, self.on_readable)
                            got = await trio.lowlevel.wait_task_rescheduled(self._abort_receive)
                    finally:
                        self._receiving = False
                    data = b""
                    if got is _Timer.FIRED:
                        break
                    if isinstance(got, deque):
                        # The reactor served what it could; the rest needs this task.
                        over = await self._serve_work(got)
                        # Else the next wait would keep the deque (0.7 KiB) for
                        # as long as the connection is idle.
                        got = None
                        if over:
                            return
                        continue
                    if got is None:
                        return  # the reactor served the input that ended the connection
                    if not got:
                        self._peer_closed = True
                        return
                    data = got
            if not self._timer_fired:
                return  # the close deadline passed
            data = b""
            idle_deadline = self._last_input + idle
            if trio.current_time() >= idle_deadline:
                if not self._closing:
                    self.begin_close(CLOSE_GOING_AWAY, "idle timeout")
            elif self._parkable():
                assert self.user is not None and self.device is not None
                self._parking = self.handlers.parking.reserve(self.user, self.device, self.window.acked, idle_deadline)
                return

    def check_timers(self, now: float) -> None:
        """From the server's timer sweep: stop a reader that has waited for
        input past the idle timeout, or past ``park_after_s`` with nothing
        pending (it parks)."""
        if not self._receiving or self._timer_fired:
            return
        quiet = now - self._last_input
        park_after = self.settings.park_after_s
        if quiet >= self.settings.idle_timeout_s or (
            park_after > 0 and quiet >= park_after and not self._closing and self._parkable()
        ):
            self._interrupt_reader()

    def _interrupt_reader(self) -> None:
        """Make the reader waiting for input look at its timers."""
        if self._reader is not None:
            self._timer_fired = True
            self._wake_reader(self._reader, outcome.Value(_Timer.FIRED))
        elif self._read_scope is not None:
            self._timer_fired = True
            self._read_scope.cancel()

    def _abort_receive(self, _: object) -> trio.lowlevel.Abort:
        # A method, not a closure per wait: the closure and its cell outlived
        # every idle reader's wait (0.2 KiB each).
        self._reader = None
        self.ctx.reactor.unwatch(self._fd)
        return trio.lowlevel.Abort.SUCCEEDED

    def on_readable(self) -> None:
        """In a reactor turn: read the socket and serve what needs no await.

        The reader task sleeps in :meth:`_read_loop` meanwhile; it is woken only
        when something needs it (a REQ, a SEND without a free slot, EOF, an
        error, the end of the connection)."""
        task = self._reader
        if task is None:
            return
        try:
            data = self._io.read_some(self._fd, RECEIVE_BYTES)
        except (ConnectionResetError, TimeoutError):
            data = b""
        except OSError as exc:
            self._wake_reader(task, outcome.Error(trio.BrokenResourceError(f"read failed: {exc}")))
            return
        if data is None:
            return
        if not data:
            self._wake_reader(task, outcome.Value(b""))
            return
        self._last_input = trio.current_time()
        fp = self.fp
        try:
            messages = self.parser.feed(data)
        except fp.WebSocketError as exc:
            self.begin_close(exc.close_code, exc.reason)
            self._wake_reader(task, outcome.Value(None))
            return
        if not messages:
            return
        work: deque[_Work] = deque(messages)
        try:
            over = self._serve_now(work)
        except Exception as exc:
            self._wake_reader(task, outcome.Error(exc))
            return
        if over is None:
            self._wake_reader(task, outcome.Value(work))
        elif over:
            self._wake_reader(task, outcome.Value(None))

    def _wake_reader(
        self, task: trio.lowlevel.Task, result: outcome.Outcome[bytes | deque[_Work] | _Timer | None]
    ) -> None:
        self._reader = None
        self.ctx.reactor.unwatch(self._fd)
        trio.lowlevel.reschedule(task, result)

    async def _handle_bytes(self, data: bytes) -> bool:
        """Serve what ``data`` completes; True when the connection is over."""
        fp = self.fp
        try:
            messages = self.parser.feed(data)
        except fp.WebSocketError as exc:
            self.begin_close(exc.close_code, exc.reason)
            return True
        if not messages:
            return False
        return await self._serve_work(deque(messages))

    def _serve_now(self, work: deque[_Work]) -> bool | None:
        """Serve from the front of ``work`` what needs no await.

        ``work`` holds WebSocket messages (opcode, payload) from the parser
        and the client events a binary one decodes to, in order. Returns True
        when the connection is over, False when all of it is served, None
        when the front needs the reader task: an event that may wait, or
        replies piled up (a client that does not read its replies stops
        being read)."""
        fp = self.fp
        binary = fp.OP_BINARY
        while work:
            unit = work[0]
            if isinstance(unit, tuple):
                opcode, payload = unit
                if opcode == binary and not self._closing and len(self._replies) >= MAX_QUEUED_REPLIES:
                    return None
                work.popleft()
                if opcode == fp.OP_CLOSE:
                    self._peer_closed = True
                    if not self._closing:
                        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else CLOSE_NORMAL
                        if len(payload) == 1 or not _valid_close_code(code):
                            code = CLOSE_PROTOCOL_ERROR
                        self.begin_close(code)
                    return True
                if self._closing:
                    continue
                if opcode == binary:
                    work.extendleft(reversed(self.session.receive_message(payload)))
                elif opcode == fp.OP_TEXT:
                    self.begin_close(CLOSE_UNSUPPORTED_DATA, "binary messages only")
                elif opcode == fp.OP_PING:
                    self._control.append(fp.encode_frame(fp.OP_PONG, payload))
                    self._kick()
                continue
            if self._closing:
                work.popleft()
                continue
            if isinstance(unit, frames.Ack):
                work.popleft()
                self._serve_ack(unit.seq)
            elif isinstance(unit, frames.Send):
                if not self._submit_send_nowait(unit):
                    return None
                work.popleft()
            elif isinstance(unit, frames.Signal):
                work.popleft()
                try:
                    self._serve_signal(unit)
                except FrameError as error:
                    self.queue_error(error)
            elif isinstance(unit, FrameError):
                work.popleft()
                self.queue_error(unit)
            else:
                return None
        return False

    async def _serve_work(self, work: deque[_Work]) -> bool:
        """Serve all of ``work``: what needs no await at once, the rest awaited
        one at a time. True when the connection is over."""
        while True:
            over = self._serve_now(work)
            if over is not None:
                return over
            unit = work.popleft()
            if isinstance(unit, tuple):
                work.appendleft(unit)
                while len(self._replies) >= MAX_QUEUED_REPLIES and not self._closing:
                    self._drained = drained = trio.Event()
                    await drained.wait()
                continue
            if isinstance(unit, FrameError):
                self.queue_error(unit)
                continue
            await self._serve_slow(unit)

    async def _serve_slow(self, event: frames.ClientEvent) -> None:
        try:
            await self._serve_event(event)
        except FrameError as error:
            self.queue_error(error)
        except StoreFullError as exc:
            self.queue_error(wire_error(exc, ref=_ref_of(event)))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            if self.ctx.shutting_down:
                self.begin_close(CLOSE_GOING_AWAY, "shutting down")
                return
            raise

    async def _serve_event(self, event: frames.ClientEvent) -> None:
        if isinstance(event, frames.Send):
            await self._serve_send(event)
        elif isinstance(event, frames.Ack):
            self._serve_ack(event.seq)
        elif isinstance(event, frames.Read):
            await self._serve_read(event)
        elif isinstance(event, frames.Request):
            await self._serve_request(event)
        elif isinstance(event, frames.Signal):
            self._serve_signal(event)
        elif isinstance(event, frames.SendGroup):
            await self._serve_send_group(event)
        elif isinstance(event, frames.Auth):
            await self._serve_auth(event)
        elif isinstance(event, frames.Register):
            await self._serve_register(event)

    # --- authentication -------------------------------------------------------

    async def _serve_auth(self, event: frames.Auth) -> None:
        self._attach(*auth.check_auth(self.ctx, self.challenge, event))

    async def _serve_register(self, event: frames.Register) -> None:
        self._attach(*await auth.register(self.ctx, self.challenge, event))

    def _attach(self, user: str, device: int) -> None:
        self.user, self.device = user, device
        old = self.ctx.router.attach(self, user, device)
        if old is not None and old is not self:
            old.replace()
        self.session.authenticated(user, device)
        store = self.ctx.store
        pending = store.pending(user, device)
        floor = self.ctx.ack_floors.get((user, device), 0)
        if floor:
            self.window.start_at(floor)
            pending -= _count_up_to(store, user, device, floor)
        self._queue_reply(frames.encode_ready(user, device, max(0, pending)))
        self._ready = True
        self.wake()

    # --- messaging ------------------------------------------------------------

    async def _serve_send(self, event: frames.Send) -> None:
        await self._wait_send_slot()
        op, committed = self._send_op(event)
        self._sends_in_flight += 1
        try:
            await self.ctx.writer_for(event.to).submit(op, committed)
        except BaseException:
            self._sends_in_flight -= 1
            raise

    def _submit_send_nowait(self, event: frames.Send) -> bool:
        """The usual SEND: a slot and queue room, so no await at all. False: use
        :meth:`_serve_send`, which waits for them."""
        if self._sends_in_flight >= self.settings.max_unacked_sends:
            return False
        op, committed = self._send_op(event)
        try:
            self.ctx.writer_for(event.to).submit_nowait(op, committed)
        except (trio.WouldBlock, trio.ClosedResourceError):
            return False  # the reader task waits for room, or meets the closed writer
        self._sends_in_flight += 1
        return True

    def _send_op(self, event: frames.Send) -> tuple[StoreMessage, Callable[[object], None]]:
        assert self.user is not None and self.device is not None
        op = StoreMessage(self.user, self.device, event.msg_id, event.to, event.payloads, now_ms())
        to = event.to

        def committed(result: object) -> None:
            self._send_finished()
            if isinstance(result, Stored):
                self.queue_sent(event.msg_id, result.ts)
                if not result.duplicate:
                    self.ctx.router.deliver(to, result.entries)
            else:
                error = wire_error(result, ref=event.msg_id, detail=False)
                if error.code == INTERNAL:
                    log.error("SEND failed: %r", result)
                self.queue_error(error)

        return op, committed

    async def _wait_send_slot(self) -> None:
        while self._sends_in_flight >= self.settings.max_unacked_sends:
            self._sends_changed = changed = trio.Event()
            await changed.wait()

    def _send_finished(self) -> None:
        self._sends_in_flight -= 1
        if self._sends_changed is not None:
            self._sends_changed.set()

    async def _serve_send_group(self, event: frames.SendGroup) -> None:
        await self._wait_send_slot()
        self._sends_in_flight += 1
        try:
            await self.handlers.groups.send(self, event, now_ms(), self._send_finished)
        except BaseException:
            self._sends_in_flight -= 1
            raise

    def _serve_ack(self, seq: int) -> None:
        assert self.user is not None and self.device is not None
        acked = self.window.ack(seq)
        if acked is None:
            return
        if self._inbox_dirty:
            # Entries wait in the store for the room this ACK made. Otherwise
            # every committed entry reaches the pump through offer(), so an
            # ACK alone has nothing for it (no wake-up, no inbox read).
            self._kick()
        user, device, ctx = self.user, self.device, self.ctx
        floors = ctx.ack_floors
        floor_key = (user, device)
        floors[floor_key] = max(acked, floors.get(floor_key, 0))
        pushed = self._pushed
        now = now_ms()
        receipt_tails: dict[str, list[bytes]] = {}
        bodies: dict[bytes, int] = {}
        msg_sender, receipt_tail = self.fp.msg_sender, self.fp.receipt_tail
        while pushed and pushed[0].seq <= acked:
            entry = pushed.popleft()
            if entry.body_key is not None:
                bodies[entry.body_key] = bodies.get(entry.body_key, 0) + 1
            if entry.type == frames.MSG:
                msg_id, from_user = msg_sender(entry.tail)
                tail = receipt_tail(msg_id, user, device, frames.RECEIPT_DELIVERED, now)
                receipt_tails.setdefault(from_user, []).append(tail)
        # Group-body references acked, by the group whose shard holds the body.
        released: dict[str, dict[bytes, int]] = {}
        for body, count in bodies.items():
            released.setdefault(group_of_body(body), {})[body] = count
        delete = DeleteUpTo(user, device, acked)

        def deleted(result: object) -> None:
            if floors.get(floor_key) == acked:
                del floors[floor_key]
            # References gone: release the group bodies they pointed to.
            if isinstance(result, int):
                for group, counts in released.items():
                    ctx.writer_for(group).submit_release(counts)

        delete_writer = ctx.writer_for(user)
        if not receipt_tails:
            delete_writer.submit_delete(delete, deleted)
            return
        # Receipts are committed before the acked entries are deleted, so a
        # crash in between repeats a receipt rather than losing one.
        remaining = len(receipt_tails)

        def receipts_stored(result: object) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                delete_writer.submit_delete(delete, deleted)

        # Receipts skip the writers' queue limit like other follow-ups: an ACK
        # covers at most a window of pushed entries, each admitted earlier
        # through a SEND's backpressure, so they are bounded by what caused them.
        # The writer merges them per sender and delivers them once stored.
        for sender, tails in receipt_tails.items():
            skip = device if sender == user else None
            ctx.writer_for(sender).submit_receipts(sender, skip, tails, now, receipts_stored)

    async def _serve_read(self, event: frames.Read) -> None:
        assert self.user is not None and self.device is not None
        ctx = self.ctx
        if ctx.store.get_user(event.sender) is None:
            raise FrameError(NOT_FOUND, f"no such user {event.sender}", ref=frames.READ)
        now = now_ms()
        skip = self.device if event.sender == self.user else None
        writer = ctx.writer_for(event.sender)

        def done(result: object) -> None:
            if isinstance(result, Appended):
                ctx.router.deliver(event.sender, result.entries)

        receipt_tail = self.fp.receipt_tail
        tails = [receipt_tail(m, self.user, self.device, frames.RECEIPT_READ, now) for m in event.msg_ids]
        if tails:
            await writer.submit(AppendEntries(event.sender, frames.RECEIPT, frames.RECEIPT_FIELDS, tails, now, skip_device=skip), done)

    def _serve_signal(self, event: frames.Signal) -> None:
        assert self.user is not None
        now = trio.current_time()
        bucket = self._signal_bucket
        if bucket is None:
            bucket = self._signal_bucket = TokenBucket(self.settings.signals_per_s, self.settings.signals_burst, now)
        if not bucket.take(now):
            raise FrameError(RATE_LIMITED, "too many signals", ref=frames.SIGNAL)
        router = self.ctx.router
        frame = frames.encode_signaled(self.user, event.to, event.kind)
        if frames.is_group(event.to):
            info = self.ctx.store.get_group(event.to)
            if info is None or self.user not in info.members:
                raise FrameError(FORBIDDEN, "not a member of that group", ref=frames.SIGNAL)
            targets = [conn for user in info.members for conn in router.devices_online(user)]
        else:
            targets = router.devices_online(event.to)
        for conn in targets:
            if conn is not self:
                conn.push_ephemeral(frame)

    async def _serve_request(self, event: frames.Request) -> None:
        now = trio.current_time()
        bucket = self._request_bucket
        if bucket is None:
            bucket = self._request_bucket = TokenBucket(self.settings.requests_per_s, self.settings.requests_burst, now)
        if not bucket.take(now):
            reason = {"code": RATE_LIMITED, "reason": "too many requests"}
            self._queue_reply(frames.encode_res(event.req_id, False, reason))
            return
        try:
            result = await self.handlers.requests.serve(self, event.op, event.args)
        except (FrameError, StoreFullError) as exc:
            error = wire_error(exc)
            self._queue_reply(frames.encode_res(event.req_id, False, {"code": error.code, "reason": error.reason}))
            return
        self._queue_reply(frames.encode_res(event.req_id, True, result))

    # --- the delivery pump ------------------------------------------------------

    async def _pump(self) -> None:
        stream = self.stream
        while True:
            if not self._pump_due:
                self._pump_sleeping = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._abort_pump_sleep)
            self._pump_due = False
            while True:
                data, close_now = self._gather()
                if not data:
                    break
                self._sending = True
                try:
                    await stream.send_all(data)
                finally:
                    self._sending = False
                if self._drained is not None:
                    self._drained.set()
                if close_now:
                    assert self._close_sent is not None
                    self._close_sent.set()
                    return

    def _gather(self) -> tuple[bytes, bool]:
        """Everything due on the socket, encoded: unsent bytes first, then control
        frames, then replies, signals and inbox entries within the window (as
        few WebSocket messages as the limits allow), then a close frame. True
        with the bytes when they end in the close frame."""
        fp = self.fp
        window = self.window
        out: list[bytes] = []
        if self._unsent:
            out.append(self._unsent)
            self._unsent = b""
        if self._control:
            out.extend(self._control)
            self._control = []
        batch = self._replies
        self._replies = []
        if self._signals:
            batch.extend(self._signals)
            self._signals = []
        entries: list[InboxEntry] = []
        if self._offered:
            offered = self._offered
            self._offered = []
            if self._ready and not self._inbox_dirty and not self._closing:
                # Live entries skip the read when they follow on from
                # what was pushed; anything else falls back to a read.
                room = window.capacity()
                for entry in offered:
                    if entry.seq <= window.last_pushed:
                        continue
                    if entry.seq != window.last_pushed + 1 + len(entries) or len(entries) >= room:
                        self._inbox_dirty = True
                        break
                    entries.append(entry)
        if self._ready and self._inbox_dirty and not self._closing:
            room = window.capacity() - len(entries)
            if room > 0:
                self._inbox_dirty = False
                assert self.user is not None and self.device is not None
                after = entries[-1].seq if entries else window.last_pushed
                more = self.ctx.store.read_inbox(self.user, self.device, after, room)
                if len(more) == room:
                    self._inbox_dirty = True
                entries.extend(more)
        if entries:
            pushed = self._pushed
            if pushed is None:
                pushed = self._pushed = deque()
            pack_entry = fp.pack_entry
            for entry in entries:
                # A reference whose body expired has nothing to send;
                # it counts as pushed so a later ACK covers it.
                if entry.type != ENTRY_MSG_REF:
                    batch.append(pack_entry(entry.type, entry.seq, entry.count, entry.tail))
                if entry.type == ENTRY_MSG or entry.body_key is not None:
                    pushed.append(entry)
                window.pushed(entry.seq)
        if batch:
            # Several frames per WebSocket message, within the limits
            # a client must accept (one frame alone may be larger).
            encode_frame = fp.encode_frame
            binary = fp.OP_BINARY
            max_bytes = self.settings.max_message_bytes
            max_frames = self.settings.max_frames_per_message
            start = 0
            size = 0
            for i, frame in enumerate(batch):
                if i > start and (size + len(frame) > max_bytes or i - start >= max_frames):
                    out.append(encode_frame(binary, b"".join(batch[start:i])))
                    start, size = i, 0
                size += len(frame)
            out.append(encode_frame(binary, b"".join(batch[start:])))
        close_sent = self._close_sent
        close_now = close_sent is not None and not close_sent.is_set()
        if close_now:
            assert self._close_frame is not None
            out.append(self._close_frame)
        if not out:
            return b"", False
        return (out[0] if len(out) == 1 else b"".join(out)), close_now


def _count_up_to(store: Store, user: str, device: int, seq: int) -> int:
    """Entries of (user, device) with seq <= ``seq`` still in the store."""
    count = after = 0
    while True:
        chunk = store.read_inbox(user, device, after, 1024)
        for entry in chunk:
            if entry.seq > seq:
                return count
            count += 1
        if len(chunk) < 1024:
            return count
        after = chunk[-1].seq


def _ref_of(event: frames.ClientEvent) -> object:
    if isinstance(event, frames.Send | frames.SendGroup):
        return event.msg_id
    return {
        frames.Auth: frames.AUTH,
        frames.Register: frames.REGISTER,
        frames.Ack: frames.ACK,
        frames.Read: frames.READ,
        frames.Request: frames.REQ,
        frames.Signal: frames.SIGNAL,
    }.get(type(event))
