"""The trio client: one device's connection to a relay, kept alive.

This is the transport: it moves payload bytes as they are given. The
end-to-end layer on top (:mod:`relay.client.secure`, what
:func:`relay.client.open_client` gives) plugs in through :class:`EndToEnd`.

:func:`open_transport` connects, authenticates (or registers) and
hands back a :class:`RelayClient` once READY arrived::

    async with open_transport(DeviceIdentity.load(state_dir)) as client:
        msg_id, ts = await client.send("bob", b"hi")
        async for entry in client.entries():
            ...

Tasks (all in the nursery :func:`open_transport` owns):

- the *supervisor* (``_run``) connects, reconnects with exponential back-off and
  jitter, and on each connection runs a *reader* (frames -> state), a *writer*
  (the only task that writes: ACK, READ, REQ, SIGNAL, SEND frames, batched) and
  a *keepalive* (WebSocket ping; a missing pong drops the connection);
- short *device lookups* (``devices.list``) for recipients not yet cached.

Everything the writer sends is computed by the pure classes in
:mod:`relay.client.bookkeeping`; the tasks here only move bytes and wake each
other. Errors are in :mod:`relay.client.errors`.
"""

from __future__ import annotations

import logging
import math
import random
import re
import secrets
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

import msgpack
import trio
import trio_websocket

from .bookkeeping import DeviceDirectory, InboxCursor, Outbox, OutgoingSend, ReadQueue, Seal
from .errors import AuthError, ClientError, ConnectionClosed, RequestError, SendError
from .identity import DeviceIdentity, valid_user
from .types import Entry, Event, GroupInfo, Message, Receipt, Signal

__all__ = ["EndToEnd", "RelayClient", "open_transport"]

log = logging.getLogger("relay.client")

SUBPROTOCOL = "relay.v1"
#: The relay's default limit for client->relay messages.
MAX_OUT_MESSAGE = 1024 * 1024
#: Relay->client messages may exceed it by the frame overhead.
MAX_IN_MESSAGE = MAX_OUT_MESSAGE + 4096
#: Frames per WebSocket message we write (the relay accepts up to 1024).
MAX_FRAMES_PER_MESSAGE = 256
#: msg_ids per READ frame.
READ_IDS_PER_FRAME = 1000

HELLO, AUTH, REGISTER, READY, ERROR = 0, 1, 2, 3, 4
SEND, SEND_GROUP, SENT, MSG, ACK, RECEIPT, READ = 10, 11, 12, 13, 14, 15, 16
REQ, RES, EVENT = 20, 21, 22
SIGNAL, SIGNALED = 30, 31

CLOSE_CONNECTED_ELSEWHERE = 4409
#: ERROR codes before READY that no retry can fix.
_AUTH_FATAL = frozenset({400, 401, 403, 409})
#: devices.list failures worth another try.
_LOOKUP_RETRY = frozenset({408, 429, 500, 503})
_GROUP_RE = re.compile(r"g\.[A-Za-z0-9_-]{22}")
_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 5.0
#: A session that lived this long resets the back-off.
_STABLE_SESSION = 10.0
#: Completed send results kept for a late wait_sent().
_RESULTS_KEPT = 10_000


class EndToEnd(Protocol):
    """What the transport asks of an end-to-end layer (``relay.client.secure``).

    The transport moves bytes; this layer seals each SEND per device, sets up
    sessions it lacks, opens each received entry before it can be acked, and
    saves its state before anything that depends on it goes on the wire.
    """

    @property
    def dirty(self) -> bool:
        """True when state changed since the last :meth:`persist`."""
        ...

    def seal(self, to: str, device: int, payload: bytes) -> bytes | None:
        """``payload`` encrypted for one device, or None without a session
        (see :data:`relay.client.bookkeeping.Seal`)."""
        ...

    async def persist(self) -> None:
        """Save the state durably (called before frames that depend on it are written)."""
        ...

    async def start_sessions(self, user: str, devices: set[int]) -> None:
        """Set up sessions with these devices of ``user``; raise
        :class:`ClientError` when that cannot be done."""
        ...

    def on_devices(self, user: str, devices: list[dict[str, Any]]) -> None:
        """A fresh ``devices.list`` answer for ``user`` (identity keys included)."""
        ...

    def ready(self) -> Entry | None:
        """An entry the layer has ready on its own, already acked (a group
        message held until its sender key arrived), or None."""
        ...

    def handed_out(self, entry: Entry) -> None:
        """``entry`` (from :meth:`open`) is handed to the application now: a
        redelivery of it is to be swallowed (saved before the ACK)."""
        ...

    async def open(self, entry: Message | Receipt | Event) -> Entry | None:
        """The entry to hand to the application (a message decrypted), or None
        to swallow it (a control message, or one handed out before a
        restart). Its state is saved before it returns."""
        ...


class _Lost(Exception):
    """Internal: the connection is gone (maybe worth reconnecting)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    @classmethod
    def from_close(cls, exc: trio_websocket.ConnectionClosed) -> _Lost:
        reason = exc.reason
        if reason is None:
            return cls(0, "connection closed")
        text = reason.reason or reason.name
        return cls(reason.code, f"closed by the relay: {reason.code} {text}")


class _Wakeup:
    """A level-triggered flag for one waiter (the writer)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()


class _Broadcast:
    """Wakes every task waiting right now."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class _SendWaiter:
    __slots__ = ("done", "error", "ts")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.ts: int | None = None
        self.error: ClientError | None = None


@dataclass(eq=False)
class _PendingRequest:
    req_id: int
    op: str
    frame: bytes
    retry: bool
    connection: int = 0  # connection it was written on (0: not yet)
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: ClientError | None = None


def _copy_error(exc: ClientError) -> ClientError:
    """A fresh instance, so that one error raised in many tasks keeps sane tracebacks."""
    return type(exc)(exc.code, exc.reason)


def _pack(frame: list[Any]) -> bytes:
    data: bytes = msgpack.packb(frame, use_bin_type=True)
    return data


def decode_frames(data: bytes) -> list[list[Any]]:
    """Split one WebSocket message into its msgpack frames.

    Frames that are not arrays starting with an int are dropped (logged); a
    message that stops being valid msgpack keeps the frames before the fault."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    frames: list[list[Any]] = []
    try:
        for obj in unpacker:
            if isinstance(obj, list) and obj and isinstance(obj[0], int):
                frames.append(obj)
            else:
                log.warning("relay sent a frame that is not [type, ...]: %.80r", obj)
    except Exception as exc:  # msgpack raises several unrelated types
        log.warning("relay sent undecodable msgpack (%s); rest of message dropped", exc)
    return frames


def pack_messages(frames: Iterable[bytes]) -> list[bytes]:
    """Join encoded frames into WebSocket messages within the relay's limits."""
    messages: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for frame in frames:
        if current and (
            len(current) >= MAX_FRAMES_PER_MESSAGE or size + len(frame) > MAX_OUT_MESSAGE
        ):
            messages.append(b"".join(current))
            current, size = [], 0
        current.append(frame)
        size += len(frame)
    if current:
        messages.append(b"".join(current))
    return messages


class _FrameSource:
    """Frames from a connection, one at a time (messages may batch several)."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws
        self._frames: deque[list[Any]] = deque()

    async def next(self) -> list[Any]:
        while not self._frames:
            data = await self._ws.get_message()
            if isinstance(data, str):
                log.warning("relay sent a text message; ignored")
                continue
            self._frames.extend(decode_frames(data))
        return self._frames.popleft()


def _backoff(failures: int) -> float:
    base = min(_BACKOFF_MAX, _BACKOFF_MIN * 2 ** max(0, failures - 1))
    return random.uniform(base / 2, base)


def _check_recipient(to: str, group: bool) -> None:
    if group:
        if not _GROUP_RE.fullmatch(to):
            raise ValueError(f"invalid group id {to!r}")
    elif not valid_user(to):
        raise ValueError(f"invalid user name {to!r}")


def _group_id(group: str) -> str:
    _check_recipient(group, group=True)
    return group


def _user_list(members: Iterable[str]) -> list[str]:
    """``members`` as a list of valid user names (a bare str is refused: it
    would iterate as characters)."""
    if isinstance(members, str):
        raise TypeError("members must be a list of user names, not one string")
    users = list(members)
    for user in users:
        if not valid_user(user):
            raise ValueError(f"invalid user name {user!r}")
    return users


def _as_group_info(op: str, result: Any) -> GroupInfo:
    """The typed info from a ``group.*`` answer; :class:`RequestError` if it is
    not shaped like one."""
    try:
        members, admins = result["members"], result["admins"]
        if not (
            isinstance(result["group"], str)
            and isinstance(result["name"], str)
            and type(result["version"]) is int
            and isinstance(members, list)
            and isinstance(admins, list)
            and all(isinstance(u, str) for u in members + admins)
        ):
            raise TypeError("wrong field types")
        return GroupInfo(
            group=result["group"],
            name=result["name"],
            version=result["version"],
            members=list(members),
            admins=list(admins),
        )
    except (KeyError, TypeError) as exc:
        raise RequestError(0, f"malformed answer to {op!r}: {result!r:.200} ({exc})") from None


class RelayClient:
    """A connected (and reconnecting) device. Make one with :func:`open_transport`.

    Attributes: ``identity``, ``user``, ``device``, ``pending`` (READY's count
    of waiting inbox entries, latest connection), ``connected``.
    """

    def __init__(
        self,
        identity: DeviceIdentity,
        nursery: trio.Nursery,
        *,
        register: bool = False,
        token: str | None = None,
        reconnect: bool = True,
        max_in_flight: int = 256,
        connect_timeout: float = 10.0,
        window: int = 256,
        keepalive: float = 30.0,
        close_timeout: float = 5.0,
        e2e: EndToEnd | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.identity = identity
        self.pending = 0
        self._nursery = nursery
        self._register = register
        self._register_attempts = 0  # REGISTER frames written so far
        self._register_fallback = False
        self._token = token
        self._reconnect = reconnect
        self._max_in_flight = max_in_flight
        self._connect_timeout = connect_timeout
        self._keepalive_interval = keepalive
        self._close_timeout = close_timeout
        self._e2e = e2e
        self._seal: Seal | None = None if e2e is None else e2e.seal
        self._session_setups: set[str] = set()  # users whose sessions are being set up
        # The entry receive() is opening (end-to-end), until it is taken.
        self._opening: tuple[int, int, Entry] | None = None

        self._connection = 0  # number of the current (or last) connection
        self._connections = 0  # connections that reached READY
        self._connected = False
        self._closing = False
        self._fatal: ClientError | None = None
        self._finished = False
        self._done = trio.Event()  # the supervisor has stopped
        self._close_requested = trio.Event()
        self._session_scope: trio.CancelScope | None = None
        self._session_lost: _Lost | None = None

        self._wakeup = _Wakeup()
        self._slot_freed = _Broadcast()
        self._outbox = Outbox(max_frame_bytes=MAX_OUT_MESSAGE)
        self._directory = DeviceDirectory()
        self._inbox = InboxCursor(batch=max(1, window // 2), delay=0.1)
        self._waiters: OrderedDict[bytes, _SendWaiter] = OrderedDict()
        self._results: deque[tuple[bytes, _SendWaiter]] = deque()
        self._requests: dict[int, _PendingRequest] = {}
        self._next_req_id = 1
        # The relay pushes at most `window` un-acked entries per connection and
        # entries are only acked once taken, so this buffer never has to hold
        # more; the slack is for signals.
        self._entry_send, self._entry_recv = trio.open_memory_channel[tuple[int, int, Entry]](
            window + 64
        )
        self._reads = ReadQueue(capacity=256)
        self._read_space = _Broadcast()
        self._signals: deque[bytes] = deque(maxlen=64)

    # ------------------------------------------------------------ properties

    @property
    def user(self) -> str:
        return self.identity.user

    @property
    def device(self) -> int:
        return self.identity.device

    @property
    def connected(self) -> bool:
        """True while a connection is READY (it may drop at any time)."""
        return self._connected

    def statistics(self) -> dict[str, int | bool]:
        """Counters for tests and monitoring."""
        return {
            "connected": self._connected,
            "connections": self._connections,
            "sends_in_flight": len(self._outbox),
            "requests_pending": len(self._requests),
            "entries_buffered": self._entry_recv.statistics().current_buffer_used,
            "duplicates_dropped": self._inbox.duplicates,
            "acked_seq": self._inbox.acks.acked,
            "taken_seq": self._inbox.acks.taken_max,
        }

    # ------------------------------------------------------------- sending

    async def submit(self, to: str, payload: bytes, *, msg_id: bytes | None = None) -> bytes:
        """Queue a SEND of ``payload`` to every device of user ``to``; returns its
        msg_id without waiting for SENT (see :meth:`wait_sent`).

        Blocks while ``max_in_flight`` SENDs are un-answered. Raises
        :class:`ValueError` for a bad name or msg_id (or one already in
        flight), :class:`SendError` 413 for a payload that can never fit, and
        :class:`ConnectionClosed` once the client is closed."""
        return await self._submit(to, payload, msg_id, group=False)

    async def submit_group(
        self, group: str, payload: bytes, *, msg_id: bytes | None = None
    ) -> bytes:
        """Like :meth:`submit` with SEND_GROUP: one payload for all members."""
        return await self._submit(group, payload, msg_id, group=True)

    async def wait_sent(self, msg_id: bytes, *, timeout: float | None = None) -> int:
        """Wait for the SENT of ``msg_id`` (from :meth:`submit`); returns its ts.

        Raises :class:`SendError` when the relay refused it (or 408 after
        ``timeout`` seconds: it may still be sent later),
        :class:`ConnectionClosed` when the client closed first, and
        :class:`ValueError` for an id this client does not know (results are
        kept for the last 10,000 sends)."""
        waiter = self._waiters.get(msg_id)
        if waiter is None:
            raise ValueError(f"unknown msg_id {msg_id.hex()}")
        with trio.move_on_after(math.inf if timeout is None else timeout):
            await waiter.done.wait()
        if not waiter.done.is_set():
            raise SendError(408, f"no SENT for {msg_id.hex()} within {timeout} s")
        if waiter.error is not None:
            raise _copy_error(waiter.error)
        assert waiter.ts is not None
        return waiter.ts

    async def send(
        self, to: str, payload: bytes, *, timeout: float | None = None
    ) -> tuple[bytes, int]:
        """:meth:`submit` then :meth:`wait_sent`: returns ``(msg_id, ts)``."""
        msg_id = await self.submit(to, payload)
        return msg_id, await self.wait_sent(msg_id, timeout=timeout)

    async def send_group(
        self, group: str, payload: bytes, *, timeout: float | None = None
    ) -> tuple[bytes, int]:
        """:meth:`submit_group` then :meth:`wait_sent`: returns ``(msg_id, ts)``."""
        msg_id = await self.submit_group(group, payload)
        return msg_id, await self.wait_sent(msg_id, timeout=timeout)

    async def _submit(self, to: str, payload: bytes, msg_id: bytes | None, *, group: bool) -> bytes:
        _check_recipient(to, group)
        if msg_id is not None and (not isinstance(msg_id, bytes) or len(msg_id) != 16):
            raise ValueError("msg_id must be 16 bytes")
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise TypeError("payload must be bytes")
        payload = bytes(payload)
        if len(payload) + 64 > MAX_OUT_MESSAGE:
            raise SendError(
                413, f"payload of {len(payload)} bytes exceeds the relay's message limit"
            )
        await trio.lowlevel.checkpoint()
        self._check_open()
        while len(self._outbox) >= self._max_in_flight:
            await self._slot_freed.wait()
            self._check_open()
        if msg_id is None:
            msg_id = secrets.token_bytes(16)
        self._outbox.add(OutgoingSend(msg_id, to, payload, group=group))
        self._waiters[msg_id] = _SendWaiter()
        self._waiters.move_to_end(msg_id)
        self._wakeup.set()
        return msg_id

    def _resolve_send(
        self, msg_id: bytes, ts: int | None = None, error: ClientError | None = None
    ) -> None:
        waiter = self._waiters.get(msg_id)
        if waiter is None or waiter.done.is_set():
            return
        waiter.ts, waiter.error = ts, error
        waiter.done.set()
        self._results.append((msg_id, waiter))
        while len(self._results) > _RESULTS_KEPT:
            old_id, old = self._results.popleft()
            if self._waiters.get(old_id) is old:
                del self._waiters[old_id]

    # ------------------------------------------------------------ receiving

    def entries(self) -> AsyncIterator[Entry]:
        """Iterate over :class:`Message`, :class:`Receipt`, :class:`Event` and
        :class:`Signal` as they arrive (across reconnects).

        An entry counts as handled (and is acked) once the iterator hands it
        out. It ends when the client closes; it raises
        :class:`ConnectionClosed` (e.g. 4409) or :class:`AuthError` when the
        client died."""
        return _EntryIterator(self)

    async def receive(self) -> Entry:
        """The next entry (what :meth:`entries` yields).

        Raises :class:`ConnectionClosed` when the client is closed (code 0) or
        the fatal error when it died."""
        while True:
            if self._fatal is not None:
                raise _copy_error(self._fatal)
            if self._e2e is not None:
                ready = self._e2e.ready()
                if ready is not None:
                    self._e2e.handed_out(ready)
                    return ready
            if self._opening is not None:
                # A caller was cancelled (or open() raised) while this entry
                # was being opened: it is not acked, so open it again.
                connection, seq, entry = self._opening
            else:
                try:
                    connection, seq, entry = await self._entry_recv.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    raise _copy_error(self._fatal or ConnectionClosed(0, "client closed")) from None
            if isinstance(entry, Signal):
                return entry
            if connection != self._connection:
                self._opening = None
                continue  # from a lost connection: the relay redelivers it
            key = (
                (entry.from_user, entry.from_device, entry.msg_id)
                if isinstance(entry, Message)
                else None
            )
            opened: Entry | None = entry
            if self._e2e is not None and self._inbox.fresh(seq, key):
                # Decrypt and save before the entry can be acked; open() is
                # idempotent, so an interrupted one is simply run again.
                self._opening = (connection, seq, entry)
                opened = await self._e2e.open(entry)
                self._opening = None
                if connection != self._connection:
                    continue  # redelivered on the new connection; saved state swallows or shows it
            fresh, wake = self._inbox.take(seq, key, trio.current_time())
            if wake:
                self._wakeup.set()
            if fresh and opened is not None:
                if self._e2e is not None:
                    self._e2e.handed_out(opened)
                return opened

    async def mark_read(self, sender: str, msg_ids: Iterable[bytes]) -> None:
        """Send READ: this user has seen these messages from ``sender`` (the
        relay sends read receipts to the sender's devices).

        Written after the ACK of anything taken so far; waits for a
        connection if there is none. READs written within 10 s before a
        connection drops are written again on the next one (the relay does
        not confirm them; a repeat only repeats the read receipt). Blocks only
        while 256 READ frames are already queued."""
        if not valid_user(sender):
            raise ValueError(f"invalid user name {sender!r}")
        ids = [bytes(m) for m in msg_ids]
        if any(len(m) != 16 for m in ids):
            raise ValueError("msg_ids must be 16 bytes each")
        await trio.lowlevel.checkpoint()
        for i in range(0, len(ids), READ_IDS_PER_FRAME):
            self._check_open()
            while self._reads.full():
                await self._read_space.wait()
                self._check_open()
            self._reads.push(_pack([READ, sender, ids[i : i + READ_IDS_PER_FRAME]]))
            self._wakeup.set()

    async def signal(self, to: str, kind: str) -> None:
        """Send an ephemeral SIGNAL (e.g. ``"typing"``) to a user or group.

        Best effort: dropped while disconnected, never retried."""
        _check_recipient(to, group=to.startswith("g.") and bool(_GROUP_RE.fullmatch(to)))
        await trio.lowlevel.checkpoint()
        self._check_open()
        if self._connected:
            self._signals.append(_pack([SIGNAL, to, kind]))
            self._wakeup.set()

    # ------------------------------------------------------------- requests

    async def request(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        *,
        timeout: float | None = 30.0,
        retry: bool = False,
    ) -> Any:
        """REQ ``op`` with ``args``; returns RES's result.

        Raises :class:`RequestError` for ``ok=false`` (the relay's code and
        reason) or 408 after ``timeout`` seconds. A request waits for a
        connection if there is none. If the connection drops after the REQ was
        written, it fails with :class:`ConnectionClosed` (it may or may not
        have been applied), unless ``retry=True`` (for read-only or idempotent
        ops), which writes it again on the next connection."""
        self._check_open()
        req_id = self._next_req_id
        self._next_req_id += 1
        req = _PendingRequest(req_id, op, _pack([REQ, req_id, op, args or {}]), retry)
        self._requests[req_id] = req
        self._wakeup.set()
        try:
            with trio.move_on_after(math.inf if timeout is None else timeout):
                await req.done.wait()
        finally:
            self._requests.pop(req_id, None)
        if not req.done.is_set():
            raise RequestError(408, f"no answer to {op!r} within {timeout} s")
        if req.error is not None:
            raise _copy_error(req.error)
        return req.result

    async def devices(self, user: str) -> list[dict[str, Any]]:
        """``devices.list``: ``[{device, identity_key}, ...]`` of ``user``."""
        result = await self.request("devices.list", {"user": user}, retry=True)
        devices: list[dict[str, Any]] = result["devices"]
        if self._e2e is not None:
            self._e2e.on_devices(user, devices)
        self._directory.set(user, (int(d["device"]) for d in devices))
        return devices

    async def known_devices(self, user: str) -> tuple[int, ...]:
        """The device numbers of ``user``: from the cache SENDs use, else
        ``devices.list`` (:class:`RequestError` 404 for an unknown user)."""
        entry = self._directory.get(user)
        if entry is not None:
            return entry[1]
        await self.devices(user)
        entry = self._directory.get(user)
        return () if entry is None else entry[1]

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn`` in the client's nursery (it ends with the client)."""
        self._nursery.start_soon(fn)

    # --------------------------------------------------------------- groups
    #
    # Thin wrappers over request(): each returns the relay's answer, the
    # group's info after the change. Only group_info is written again after a
    # connection drop; the others raise ConnectionClosed then ("may or may not
    # have been applied"), because re-applying e.g. an add after another admin
    # removed the user meanwhile would undo that removal. Call group_info to
    # see where things stand.

    async def create_group(
        self, name: str, members: Iterable[str] = (), *, timeout: float | None = 30.0
    ) -> GroupInfo:
        """``group.create``: a new group called ``name`` (1-128 chars) with
        ``members``, the *other* users (this user is always the first member
        and first admin). Every member gets EVENT ``group.changed``.

        :class:`RequestError` 404 when a member does not exist, 400 for a bad
        name, 413 past the relay's member limit."""
        return await self._group_op(
            "group.create", {"name": name, "members": _user_list(members)}, timeout
        )

    async def group_info(self, group: str, *, timeout: float | None = 30.0) -> GroupInfo:
        """``group.info``: name, version, members, admins (403 for a non-member,
        404 for an unknown id). Read-only, so it is retried across reconnects."""
        return await self._group_op("group.info", {"group": _group_id(group)}, timeout, retry=True)

    async def add_members(
        self, group: str, members: Iterable[str], *, timeout: float | None = 30.0
    ) -> GroupInfo:
        """``group.add`` (admins only, else 403; 404 for an unknown user).
        Members already in the group are left as they are."""
        return await self._members_op("group.add", group, members, timeout)

    async def remove_members(
        self, group: str, members: Iterable[str], *, timeout: float | None = 30.0
    ) -> GroupInfo:
        """``group.remove`` (admins only). The removed members get the
        ``group.changed`` of their removal too."""
        return await self._members_op("group.remove", group, members, timeout)

    async def promote(
        self, group: str, members: Iterable[str], *, timeout: float | None = 30.0
    ) -> GroupInfo:
        """``group.promote``: make members admins (admins only)."""
        return await self._members_op("group.promote", group, members, timeout)

    async def demote(
        self, group: str, members: Iterable[str], *, timeout: float | None = 30.0
    ) -> GroupInfo:
        """``group.demote``: admins back to plain members (admins only;
        demoting the last admin is 403)."""
        return await self._members_op("group.demote", group, members, timeout)

    async def rename_group(
        self, group: str, name: str, *, timeout: float | None = 30.0
    ) -> GroupInfo:
        """``group.rename`` (admins only; 1-128 chars)."""
        return await self._group_op(
            "group.rename", {"group": _group_id(group), "name": name}, timeout
        )

    async def leave_group(self, group: str, *, timeout: float | None = 30.0) -> GroupInfo:
        """``group.leave``: any member may leave; the result is the info
        without this user (the last admin leaving hands admin to the
        longest-standing member; the last member leaving deletes the group)."""
        return await self._group_op("group.leave", {"group": _group_id(group)}, timeout)

    async def _members_op(
        self, op: str, group: str, members: Iterable[str], timeout: float | None
    ) -> GroupInfo:
        args = {"group": _group_id(group), "members": _user_list(members)}
        return await self._group_op(op, args, timeout)

    async def _group_op(
        self, op: str, args: dict[str, Any], timeout: float | None, *, retry: bool = False
    ) -> GroupInfo:
        result = await self.request(op, args, timeout=timeout, retry=retry)
        return _as_group_info(op, result)

    async def _fetch_devices(self, user: str) -> None:
        """Fill the device cache for ``user``; on a lasting failure fail the SENDs to it."""
        delay = 0.2
        last: ClientError = SendError(0, "lookup did not run")
        try:
            for _attempt in range(5):
                try:
                    result = await self.request("devices.list", {"user": user}, retry=True)
                    devices = [int(d["device"]) for d in result["devices"]]
                    if self._e2e is not None:
                        self._e2e.on_devices(user, result["devices"])
                except RequestError as exc:
                    last = exc
                    if exc.code in _LOOKUP_RETRY:
                        await trio.sleep(delay)
                        delay *= 2
                        continue
                    break
                except (KeyError, TypeError, ValueError) as exc:
                    last = SendError(0, f"malformed devices.list answer: {exc!r}")
                    break
                except ClientError:
                    return  # closed or dead: the sends fail with that
                else:
                    self._directory.set(user, devices)
                    return
            self._fail_user(user, SendError(last.code, f"cannot look up the devices of {user!r}: {last.reason}"))
        finally:
            self._directory.fetch_failed(user)  # no-op after a successful set()
            self._wakeup.set()

    async def _set_up_sessions(self, user: str, devices: set[int]) -> None:
        """Have the end-to-end layer set up sessions with ``devices`` of
        ``user``; on failure fail the SENDs to that user."""
        assert self._e2e is not None
        delay = 0.2
        try:
            for attempt in range(5):
                try:
                    await self._e2e.start_sessions(user, devices)
                    return
                except RequestError as exc:
                    if exc.code in _LOOKUP_RETRY and attempt < 4:
                        await trio.sleep(delay)  # 429 (keys.fetch rate) or an overloaded relay
                        delay *= 2
                        continue
                    raise SendError(exc.code, f"cannot set up a session with {user!r}: {exc.reason}") from None
        except SendError as exc:
            self._fail_user(user, exc)
        except ClientError:
            return  # closed or dead: the sends fail with that
        finally:
            self._session_setups.discard(user)
            self._wakeup.set()

    def _fail_user(self, user: str, error: ClientError) -> None:
        for item in self._outbox.fail_user(user):
            self._resolve_send(item.msg_id, error=error)
        self._slot_freed.fire()

    # ------------------------------------------------------------ lifecycle

    def _check_open(self) -> None:
        if self._fatal is not None:
            raise _copy_error(self._fatal)
        if self._closing or self._finished:
            raise ConnectionClosed(0, "client closed")

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Supervisor: connect, run a session, reconnect; see the module docstring."""
        started = False
        failures = 0
        ready_at = 0.0
        give_up_at = trio.current_time() + self._connect_timeout

        def on_ready() -> None:
            nonlocal started, ready_at
            ready_at = trio.current_time()
            if not started:
                started = True
                task_status.started()

        def fail(exc: ClientError) -> None:
            if not started:
                raise exc from None
            log.warning("relay client stopped: %s", exc)
            self._die(exc)

        try:
            while not self._closing:
                try:
                    await self._session(on_ready)
                    return
                except AuthError as exc:
                    if exc.code == 409 and self._register and self._register_attempts > 1:
                        # An earlier REGISTER may have worked and only its READY
                        # was lost: try our key as device 1 before giving up.
                        self._register = False
                        self._register_fallback = True
                        self.identity.device = 1
                        continue
                    if self._register_fallback and exc.code == 401:
                        exc = AuthError(409, "user name is already taken")
                    fail(exc)
                    return
                except ClientError as exc:
                    fail(exc)
                    return
                except _Lost as lost:
                    if self._closing:
                        return
                    if lost.code == CLOSE_CONNECTED_ELSEWHERE:
                        fail(
                            ConnectionClosed(
                                lost.code, "this device connected again elsewhere (4409)"
                            )
                        )
                        return
                    if not self._reconnect:
                        fail(ConnectionClosed(lost.code, f"connection lost: {lost.reason}"))
                        return
                    now = trio.current_time()
                    if not started and now >= give_up_at:
                        url = self.identity.server_url
                        fail(ConnectionClosed(lost.code, f"cannot connect to {url}: {lost.reason}"))
                        return
                    if started and now - ready_at > _STABLE_SESSION:
                        failures = 0
                    failures += 1
                    delay = _backoff(failures)
                    if not started:
                        delay = min(delay, max(0.0, give_up_at - now))
                    log.info(
                        "relay connection lost (%s); reconnecting in %.2f s", lost.reason, delay
                    )
                    with trio.move_on_after(delay):
                        await self._close_requested.wait()
        finally:
            self._done.set()

    async def _session(self, on_ready: Callable[[], None]) -> None:
        """One connection: handshake, then reader/writer/keepalive until it ends.

        Returns when the user closed; raises :class:`_Lost` when the connection
        dropped, :class:`AuthError` when refused."""
        url = self.identity.server_url
        self._session_lost = None
        try:
            async with trio_websocket.open_websocket_url(
                url,
                subprotocols=[SUBPROTOCOL],
                max_message_size=MAX_IN_MESSAGE,
                connect_timeout=self._connect_timeout,
                disconnect_timeout=self._close_timeout,
            ) as ws:
                frames = _FrameSource(ws)
                with trio.fail_after(self._connect_timeout):
                    await self._handshake(ws, frames)
                self._connection += 1
                self._connections += 1
                connection = self._connection
                self._connected = True
                self._inbox.acks.new_connection()
                on_ready()
                self._wakeup.set()
                try:
                    async with trio.open_nursery() as nursery:
                        self._session_scope = nursery.cancel_scope
                        nursery.start_soon(self._writer, ws, connection)
                        nursery.start_soon(self._keepalive, ws)
                        nursery.start_soon(self._reader, frames, connection)
                finally:
                    self._connected = False
                    self._session_scope = None
                    self._connection_ended(connection)
                if self._session_lost is not None:
                    raise self._session_lost
                if not self._closing:
                    raise _Lost(0, "session ended")
        except trio_websocket.ConnectionClosed as exc:
            raise _Lost.from_close(exc) from None
        except trio_websocket.ConnectionRejected as exc:
            raise _Lost(
                exc.status_code, f"relay refused the WebSocket handshake: HTTP {exc.status_code}"
            ) from None
        except trio_websocket.HandshakeError as exc:
            cause = exc.__cause__ or exc
            raise _Lost(0, f"{type(cause).__name__}: {cause}".rstrip(": ")) from None
        except OSError as exc:
            raise _Lost(0, f"{type(exc).__name__}: {exc}") from None
        except trio.TooSlowError:
            raise _Lost(0, "timed out waiting for HELLO/READY") from None

    async def _handshake(
        self, ws: trio_websocket.WebSocketConnection, frames: _FrameSource
    ) -> None:
        hello = await frames.next()
        if hello[0] != HELLO or len(hello) < 4:
            raise _Lost(0, f"expected HELLO, got frame type {hello[0]}")
        version, server_name, challenge = hello[1], hello[2], hello[3]
        if version != 1:
            raise ConnectionClosed(0, f"relay speaks protocol version {version!r}, not 1")
        if not isinstance(server_name, str) or not isinstance(challenge, bytes):
            raise _Lost(0, "malformed HELLO")
        identity = self.identity
        sig = identity.sign_challenge(server_name, challenge)
        if self._register:
            frame: list[Any] = [REGISTER, identity.user, identity.identity_key, sig, self._token]
        else:
            frame = [AUTH, identity.user, identity.device, sig]
        await ws.send_message(_pack(frame))
        if self._register:
            self._register_attempts += 1
        reply = await frames.next()
        if reply[0] == ERROR and len(reply) >= 4:
            code, reason = int(reply[2]), str(reply[3])
            if code in _AUTH_FATAL:
                raise AuthError(code, reason)
            raise _Lost(code, f"relay refused the session: {code} {reason}")
        if reply[0] != READY or len(reply) < 4:
            raise _Lost(0, f"expected READY, got frame type {reply[0]}")
        _, user, device, pending = reply[:4]
        if user != identity.user:
            raise ConnectionClosed(0, f"relay authenticated {user!r}, not {identity.user!r}")
        if self._register:
            identity.device = int(device)
            self._register = False
        self.pending = int(pending)

    def _end_session(self, lost: _Lost | None) -> None:
        if lost is not None and self._session_lost is None:
            self._session_lost = lost
        if self._session_scope is not None:
            self._session_scope.cancel()

    def _connection_ended(self, connection: int) -> None:
        for req in list(self._requests.values()):
            if req.connection == connection and not req.retry:
                del self._requests[req.req_id]
                req.error = ConnectionClosed(
                    0,
                    f"connection lost before the answer to {req.op!r}; "
                    "it may or may not have been applied",
                )
                req.done.set()
        self._signals.clear()
        if not self._closing:
            self._reads.connection_lost(trio.current_time())
        # Entries not taken yet are not acked: the relay redelivers them.
        while True:
            try:
                self._entry_recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break

    def _die(self, exc: ClientError) -> None:
        self._fatal = exc
        self._finish(exc)

    def _finish(self, exc: ClientError) -> None:
        """Fail everything still waiting with ``exc``; wake all blocked callers."""
        if self._finished:
            return
        self._finished = True
        for item in self._outbox.clear():
            self._resolve_send(item.msg_id, error=exc)
        for req in self._requests.values():
            req.error = exc
            req.done.set()
        self._requests.clear()
        self._entry_send.close()
        self._slot_freed.fire()
        self._read_space.fire()

    async def _aclose(self) -> None:
        """Graceful close: flush ACK and READs, close the WebSocket (1000)."""
        self._closing = True
        self._close_requested.set()
        self._wakeup.set()
        with trio.move_on_after(self._close_timeout):
            await self._done.wait()
        self._finish(ConnectionClosed(0, "client closed"))

    def _abort(self) -> None:
        self._closing = True
        self._close_requested.set()
        self._finish(ConnectionClosed(0, "client closed"))

    # ------------------------------------------------------ connection tasks

    async def _reader(self, frames: _FrameSource, connection: int) -> None:
        try:
            while True:
                frame = await frames.next()
                try:
                    await self._dispatch(frame, connection)
                except (ValueError, TypeError, IndexError, AttributeError) as exc:
                    log.warning("malformed frame from relay %.120r: %s", frame, exc)
        except trio_websocket.ConnectionClosed as exc:
            self._end_session(None if self._closing else _Lost.from_close(exc))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._end_session(None)  # client finished

    async def _dispatch(self, frame: list[Any], connection: int) -> None:
        kind = frame[0]
        if kind == MSG:
            _, seq, msg_id, from_user, from_device, group, ts, payload = frame[:8]
            entry: Entry = Message(
                int(seq),
                _bin(msg_id),
                str(from_user),
                int(from_device),
                None if group is None else str(group),
                int(ts),
                _bin(payload),
            )
            await self._push_entry(connection, int(seq), entry)
        elif kind == RECEIPT:
            _, seq, msg_id, by_user, by_device, status, ts = frame[:7]
            entry = Receipt(
                int(seq), _bin(msg_id), str(by_user), int(by_device), int(status), int(ts)
            )
            await self._push_entry(connection, int(seq), entry)
        elif kind == EVENT:
            _, seq, ev_kind, body, ts = frame[:5]
            if not isinstance(body, dict):
                raise TypeError("EVENT body is not a map")
            entry = Event(int(seq), str(ev_kind), body, int(ts))
            await self._push_entry(connection, int(seq), entry)
        elif kind == SIGNALED:
            _, from_user, to, sig_kind = frame[:4]
            try:
                self._entry_send.send_nowait(
                    (connection, 0, Signal(str(from_user), str(to), str(sig_kind)))
                )
            except trio.WouldBlock:
                log.debug("signal dropped: entry buffer full")
        elif kind == SENT:
            _, msg_id, ts = frame[:3]
            if self._outbox.on_sent(_bin(msg_id)) is not None:
                self._resolve_send(_bin(msg_id), ts=int(ts))
                self._slot_freed.fire()
                self._wakeup.set()
        elif kind == ERROR:
            _, ref, code, reason = frame[:4]
            self._on_error(ref, int(code), str(reason))
        elif kind == RES:
            _, req_id, ok, result = frame[:4]
            self._on_res(req_id, bool(ok), result)
        else:
            log.debug("ignoring frame type %r from relay", kind)

    async def _push_entry(self, connection: int, seq: int, entry: Entry) -> None:
        if self._inbox.acks.seen(seq, trio.current_time()):
            self._wakeup.set()
        await self._entry_send.send((connection, seq, entry))

    def _on_error(self, ref: Any, code: int, reason: str) -> None:
        if isinstance(ref, bytes) and ref in self._outbox:
            verdict = self._outbox.on_error(ref, code, reason, self._directory, trio.current_time())
            assert verdict is not None
            if verdict.final:
                self._resolve_send(ref, error=SendError(code, reason))
                self._slot_freed.fire()
            else:
                log.info("SEND %s refused (%s %s); trying again", ref.hex(), code, reason)
            self._wakeup.set()
        elif isinstance(ref, bytes):
            log.debug("ERROR %s for a SEND no longer pending: %s", code, reason)
        else:
            log.warning("relay reported ERROR %s about frame type %r: %s", code, ref, reason)

    def _on_res(self, req_id: Any, ok: bool, result: Any) -> None:
        req = self._requests.pop(req_id, None) if isinstance(req_id, int) else None
        if req is None:
            log.debug("RES for unknown request %r", req_id)
            return
        if ok:
            req.result = result
        else:
            code, reason = 0, repr(result)
            if isinstance(result, dict):
                code = int(result.get("code") or 0)
                reason = str(result.get("reason", ""))
            req.error = RequestError(code, reason)
        req.done.set()

    async def _writer(self, ws: trio_websocket.WebSocketConnection, connection: int) -> None:
        try:
            while True:
                messages = self._collect(connection)
                if messages and self._e2e is not None and self._e2e.dirty:
                    # Sealing advanced a ratchet, or entries about to be
                    # acked were opened: save that before the bytes leave.
                    await self._e2e.persist()
                for message in messages:
                    await ws.send_message(message)
                if messages:
                    continue
                if self._closing:
                    with trio.move_on_after(self._close_timeout):
                        await ws.aclose(1000, "client closed")
                    self._end_session(None)
                    return
                deadline = min(
                    self._inbox.acks.deadline() or math.inf,
                    self._outbox.next_deadline() or math.inf,
                )
                with trio.move_on_at(deadline):
                    await self._wakeup.wait()
        except trio_websocket.ConnectionClosed as exc:
            self._end_session(None if self._closing else _Lost.from_close(exc))

    def _collect(self, connection: int) -> list[bytes]:
        """Everything due on the wire now, as WebSocket messages: ACK first (a
        READ must follow the ACK of the message it reads), then READs,
        requests, signals and SENDs in order."""
        now = trio.current_time()
        frames = self._reads.take(now, MAX_FRAMES_PER_MESSAGE)
        if frames:
            self._read_space.fire()
        for req in self._requests.values():
            if req.connection != connection:
                req.connection = connection
                frames.append(req.frame)
        while self._signals:
            frames.append(self._signals.popleft())
        batch = self._outbox.next_batch(
            self._directory,
            connection,
            now,
            sender=(self.identity.user, self.identity.device),
            max_frames=4 * MAX_FRAMES_PER_MESSAGE,
            max_bytes=4 * MAX_OUT_MESSAGE,
            seal=self._seal,
        )
        for user in batch.lookups:
            self._directory.start_fetch(user)
            self._nursery.start_soon(self._fetch_devices, user)
        for user, devices in batch.sessions.items():
            if user not in self._session_setups:
                self._session_setups.add(user)
                self._nursery.start_soon(self._set_up_sessions, user, devices)
        for item, code, reason in batch.failed:
            self._resolve_send(item.msg_id, error=SendError(code, reason))
            self._slot_freed.fire()
        frames.extend(frame for _, frame in batch.frames)
        ack = self._inbox.acks.flush(now, force=bool(frames) or self._closing)
        if ack is not None:
            frames.insert(0, _pack([ACK, ack]))
        return pack_messages(frames)

    async def _keepalive(self, ws: trio_websocket.WebSocketConnection) -> None:
        try:
            while True:
                await trio.sleep(self._keepalive_interval)
                with trio.move_on_after(self._keepalive_interval) as scope:
                    await ws.ping()
                if scope.cancelled_caught:
                    self._end_session(_Lost(0, "no pong from the relay"))
                    return
        except trio_websocket.ConnectionClosed as exc:
            self._end_session(None if self._closing else _Lost.from_close(exc))


def _bin(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"expected bin, got {type(value).__name__}")
    return value


class _EntryIterator:
    def __init__(self, client: RelayClient) -> None:
        self._client = client

    def __aiter__(self) -> _EntryIterator:
        return self

    async def __anext__(self) -> Entry:
        try:
            return await self._client.receive()
        except ConnectionClosed as exc:
            if self._client._fatal is None:
                raise StopAsyncIteration from None
            raise exc


def _unwrap(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Re-raise the one meaningful exception of a nursery's group, else the group."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for sub in exc.exceptions:
                walk(sub)
        else:
            leaves.append(exc)

    walk(group)
    real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    chosen = real[0] if len(real) == 1 else leaves[0] if not real and leaves else None
    if chosen is None:
        raise group
    # Re-raise without chaining the group as its __context__ (the group only
    # wraps it); keep whatever context it had.
    context = chosen.__context__
    try:
        raise chosen
    finally:
        chosen.__context__ = context
        del chosen, context


@asynccontextmanager
async def open_transport(
    identity: DeviceIdentity,
    *,
    register: bool = False,
    token: str | None = None,
    reconnect: bool = True,
    max_in_flight: int = 256,
    connect_timeout: float = 10.0,
    window: int = 256,
    keepalive: float = 30.0,
    close_timeout: float = 5.0,
    e2e: EndToEnd | None = None,
) -> AsyncIterator[RelayClient]:
    """Connect ``identity`` to its relay; yields a READY :class:`RelayClient`.

    ``register=True`` sends REGISTER (with ``token``) instead of AUTH on the
    first connection; READY's device number is stored into ``identity``
    (save it afterwards). With ``reconnect`` (default) a lost connection is
    re-established with back-off and the first connection is retried until
    ``connect_timeout``. ``window`` is the relay's flow-control window W.

    Raises :class:`AuthError` when the relay refuses the device, and
    :class:`ConnectionClosed` when it cannot be reached in time. On a normal
    exit of the block the taken entries are acked, queued READs sent and the
    WebSocket closed (1000) within ``close_timeout``; SENDs still un-answered
    then fail with :class:`ConnectionClosed`. On an exception nothing more is
    sent (un-acked entries are redelivered next time).
    """
    try:
        async with trio.open_nursery() as nursery:
            client = RelayClient(
                identity,
                nursery,
                register=register,
                token=token,
                reconnect=reconnect,
                max_in_flight=max_in_flight,
                connect_timeout=connect_timeout,
                window=window,
                keepalive=keepalive,
                close_timeout=close_timeout,
                e2e=e2e,
            )
            await nursery.start(client._run)
            try:
                yield client
            except BaseException:
                client._abort()
                raise
            else:
                await client._aclose()
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        _unwrap(group)
