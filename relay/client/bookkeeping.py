"""The client's pure bookkeeping: no sockets, no trio, no clock of its own.

- :class:`DedupeWindow` remembers the last N message keys.
- :class:`AckTracker` decides when to send a cumulative ACK (batching).
- :class:`InboxCursor` combines both: which taken entries to hand to the
  application and which to swallow as redeliveries.
- :class:`ReadQueue` holds READ frames, re-sending recent ones after a drop.
- :class:`DeviceDirectory` caches ``devices.list`` per user, with a generation
  number so that a 409 can tell a stale cache from a fresh one.
- :class:`Outbox` holds every SEND not yet answered by SENT, in submit order,
  and decides what goes on the wire next (resend after reconnect, refresh after
  409, back off after 429/503) while keeping the per-recipient order.

Times are plain floats from the caller's clock (``trio.current_time()`` in the
client); connections are numbered by the caller from 1.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field

import msgpack

__all__ = [
    "AckTracker",
    "Batch",
    "DedupeWindow",
    "DeviceDirectory",
    "ErrorVerdict",
    "InboxCursor",
    "Outbox",
    "OutgoingSend",
    "ReadQueue",
]

FRAME_SEND = 10
FRAME_SEND_GROUP = 11

#: Codes after which a SEND is tried again rather than failed.
RETRY_CODES = frozenset({429, 503})


class DedupeWindow:
    """A set of the last ``capacity`` keys, oldest evicted first."""

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._keys: OrderedDict[Hashable, None] = OrderedDict()

    def add(self, key: Hashable) -> bool:
        """Record ``key``; True when it is new, False when it is a duplicate."""
        if key in self._keys:
            return False
        self._keys[key] = None
        if len(self._keys) > self.capacity:
            self._keys.popitem(last=False)
        return True

    def __contains__(self, key: Hashable) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)


class AckTracker:
    """When to send the cumulative ACK, and with which seq.

    The application *takes* entries in seq order. The relay clamps an ACK to
    what it pushed on the current connection, so the ACK value is the highest
    seq both taken and *seen* (pushed) on this connection. An ACK is due once
    ``batch`` entries were taken since the last one, ``delay`` seconds after it
    became pending, and when closing; anything else going out may carry it
    along (:meth:`flush` with ``force``).

    After a reconnect the relay pushes the un-acked entries again; those taken
    before are swallowed by :class:`InboxCursor` but still make the ACK
    pending here (through :meth:`seen`), so they get acked on the new
    connection.
    """

    def __init__(self, batch: int = 128, delay: float = 0.1) -> None:
        if batch < 1:
            raise ValueError("batch must be >= 1")
        self.batch = batch
        self.delay = delay
        self.taken_max = 0
        self.seen_max = 0  # highest seq pushed on the current connection
        self.acked = 0  # highest seq ACKed on the current connection
        self._count = 0  # entries taken since the last ACK
        self._since: float | None = None  # when the ACK became pending

    def seen(self, seq: int, now: float) -> bool:
        """The relay pushed entry ``seq`` on this connection. Returns True when
        the writer should look again (an ACK just became pending)."""
        if seq > self.seen_max:
            self.seen_max = seq
        return self._touch(now)

    def take(self, seq: int, now: float) -> bool:
        """The application took entry ``seq`` (or a redelivery of it was
        swallowed). Returns True when the writer should look again (an ACK
        just became pending, or is due by count)."""
        if seq > self.taken_max:
            self.taken_max = seq
        if self.pending() is None:
            return False
        self._count += 1
        return self._touch(now) or self._count >= self.batch

    def _touch(self, now: float) -> bool:
        if self._since is None and self.pending() is not None:
            self._since = now
            return True
        return False

    def pending(self) -> int | None:
        """The seq an ACK would carry now, or None when nothing is un-acked."""
        seq = min(self.taken_max, self.seen_max)
        return seq if seq > self.acked else None

    def due(self, now: float) -> bool:
        if self.pending() is None:
            return False
        if self._count >= self.batch or self._since is None:
            return True
        return now >= self._since + self.delay

    def deadline(self) -> float | None:
        """When the time-based ACK falls due (None if nothing is pending)."""
        if self.pending() is None:
            return None
        if self._since is None:
            return float("-inf")
        return self._since + self.delay

    def flush(self, now: float, *, force: bool = False) -> int | None:
        """The seq to ACK now (marking it sent), or None when no ACK is due.

        ``force`` sends any pending ACK even if not due yet (piggybacking on
        other frames, or closing)."""
        seq = self.pending()
        if seq is None or not (force or self.due(now)):
            return None
        self.acked = seq
        self._count = 0
        self._since = None
        return seq

    def new_connection(self) -> None:
        """A new connection: nothing is pushed or acked on it yet."""
        self.seen_max = 0
        self.acked = 0
        self._count = 0
        self._since = None


class InboxCursor:
    """Which entries the application sees, and the ACK bookkeeping for them.

    The relay delivers one inbox in ``seq`` order and redelivers un-acked
    entries with their seq after a reconnect, so an entry whose seq is not above
    the highest taken one is a redelivery. Messages are also de-duplicated on
    ``(from_user, from_device, msg_id)`` in a bounded window, for the case
    where the relay stored the same message twice.
    """

    def __init__(
        self, *, batch: int = 128, delay: float = 0.1, dedupe_capacity: int = 100_000
    ) -> None:
        self.acks = AckTracker(batch, delay)
        self.dedupe = DedupeWindow(dedupe_capacity)
        self.duplicates = 0

    def fresh(self, seq: int, key: Hashable | None) -> bool:
        """Whether :meth:`take` would hand entry ``seq`` to the application
        (without taking it)."""
        return seq > self.acks.taken_max and (key is None or key not in self.dedupe)

    def take(self, seq: int, key: Hashable | None, now: float) -> tuple[bool, bool]:
        """Take entry ``seq`` (``key`` is the message key, None for receipts and
        events). Returns ``(fresh, wake)``: whether to hand it to the
        application, and whether the writer should look at the ACK state."""
        fresh = seq > self.acks.taken_max
        if fresh and key is not None:
            fresh = self.dedupe.add(key)
        if not fresh:
            self.duplicates += 1
        wake = self.acks.take(seq, now)
        return fresh, wake


class ReadQueue:
    """READ frames waiting to be written, and the ones written lately.

    The relay does not confirm a READ, and one written just before the
    connection dropped (or the relay crashed) may be lost. So the frames
    written in the last ``resend_window`` seconds are written again on the
    next connection: a repeated READ only repeats read receipts, which
    clients tolerate anyway.
    """

    def __init__(
        self, *, capacity: int = 256, resend_window: float = 10.0, max_written: int = 1024
    ) -> None:
        self.capacity = capacity
        self.resend_window = resend_window
        self.max_written = max_written
        self._queued: deque[bytes] = deque()
        self._written: deque[tuple[float, bytes]] = deque()

    def __len__(self) -> int:
        return len(self._queued)

    def full(self) -> bool:
        return len(self._queued) >= self.capacity

    def push(self, frame: bytes) -> None:
        self._queued.append(frame)

    def take(self, now: float, limit: int) -> list[bytes]:
        """Up to ``limit`` frames to write now (remembered as written at ``now``)."""
        out: list[bytes] = []
        while self._queued and len(out) < limit:
            frame = self._queued.popleft()
            out.append(frame)
            self._written.append((now, frame))
        self._trim(now)
        return out

    def _trim(self, now: float) -> None:
        while self._written and (
            len(self._written) > self.max_written or self._written[0][0] < now - self.resend_window
        ):
            self._written.popleft()

    def connection_lost(self, now: float) -> int:
        """Queue the recently written frames again, first; returns how many."""
        self._trim(now)
        again = [frame for _, frame in self._written]
        self._written.clear()
        self._queued.extendleft(reversed(again))
        return len(again)


class DeviceDirectory:
    """A cache of ``devices.list`` results, at most ``capacity`` users (LRU).

    Each stored device set gets a new generation number; a SEND remembers the
    generation its payload map was built from. :meth:`invalidate` drops an
    entry (after a 409) so that the next use fetches it again.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[int, tuple[int, ...]]] = OrderedDict()
        self._fetching: set[str] = set()
        self._gen = 0

    def get(self, user: str) -> tuple[int, tuple[int, ...]] | None:
        """``(generation, devices)`` or None when unknown or invalidated."""
        entry = self._entries.get(user)
        if entry is not None:
            self._entries.move_to_end(user)
        return entry

    def generation(self, user: str) -> int | None:
        entry = self._entries.get(user)
        return None if entry is None else entry[0]

    def set(self, user: str, devices: Iterable[int]) -> int:
        """Store a fresh device set (ends a fetch); returns its generation."""
        self._gen += 1
        self._entries[user] = (self._gen, tuple(sorted(set(devices))))
        self._entries.move_to_end(user)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        self._fetching.discard(user)
        return self._gen

    def invalidate(self, user: str) -> None:
        self._entries.pop(user, None)

    def needs_fetch(self, user: str) -> bool:
        return user not in self._entries and user not in self._fetching

    def start_fetch(self, user: str) -> None:
        self._fetching.add(user)

    def fetch_failed(self, user: str) -> None:
        self._fetching.discard(user)

    def fetching(self, user: str) -> bool:
        return user in self._fetching


@dataclass(eq=False)
class OutgoingSend:
    """A SEND (or SEND_GROUP) waiting for its SENT."""

    msg_id: bytes
    to: str
    payload: bytes
    group: bool = False
    connection: int = 0  # connection it is on the wire on (0: not sent yet)
    generation: int = 0  # DeviceDirectory generation its payload map came from
    conflicts: int = 0  # 409s so far
    retries: int = 0  # 429/503 so far
    hold_until: float | None = None  # backing off after 429/503
    # device -> the ciphertext sealed for it. Sealing advances that device's
    # ratchet, so a resend (reconnect, or a 409 that added a device) reuses
    # what was sealed and seals only for devices new to this SEND.
    sealed: dict[int, bytes] = field(default_factory=dict)

    @property
    def key(self) -> tuple[bool, str]:
        """The ordering domain: one recipient user, or one group."""
        return (self.group, self.to)

    def seal_for(self, devices: Iterable[int], seal: Seal) -> list[int]:
        """Seal the payload for each of ``devices`` not sealed yet; returns the
        devices ``seal`` has no session with (nothing sealed for them)."""
        missing = []
        for device in devices:
            if device not in self.sealed:
                sealed = seal(self.to, device, self.payload)
                if sealed is None:
                    missing.append(device)
                else:
                    self.sealed[device] = sealed
        return missing

    def encode(self, devices: tuple[int, ...] = ()) -> bytes:
        """The SEND (or SEND_GROUP) frame; a SEND carries for each of
        ``devices`` what :meth:`seal_for` sealed, or else the payload itself."""
        if self.group:
            return msgpack.packb([FRAME_SEND_GROUP, self.msg_id, self.to, self.payload])
        payloads = {device: self.sealed.get(device, self.payload) for device in devices}
        return msgpack.packb([FRAME_SEND, self.msg_id, self.to, payloads])


#: ``seal(to, device, payload)``: the payload encrypted for one device, or
#: None when there is no session with that device yet. May raise
#: :class:`SealError` to fail the SEND.
Seal = Callable[[str, int, bytes], "bytes | None"]


class SealError(Exception):
    """Sealing a payload for a device failed for good (code, reason as in ERROR)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


@dataclass
class Batch:
    """What :meth:`Outbox.next_batch` decided."""

    frames: list[tuple[OutgoingSend, bytes]] = field(default_factory=list)
    lookups: set[str] = field(default_factory=set)  # users to fetch devices.list for
    # user -> devices that ``seal`` has no session with yet (set up, then retry)
    sessions: dict[str, set[int]] = field(default_factory=dict)
    failed: list[tuple[OutgoingSend, int, str]] = field(default_factory=list)  # removed


@dataclass
class ErrorVerdict:
    """What an ERROR about a SEND means: ``final`` errors remove it."""

    item: OutgoingSend
    final: bool
    code: int
    reason: str


class Outbox:
    """Every SEND not yet answered, in submit order.

    Ordering rule (per recipient, or per group): a SEND goes on the wire only
    when every earlier SEND to the same recipient is answered, or is on the
    wire on this connection built from the same device set. So a SEND held
    back by a 409 (waiting for a fresh ``devices.list``), by a 429/503 back-off
    or by an unknown device set keeps the later ones behind it, and after a
    reconnect everything is re-sent with the same msg_id in the same order
    before anything new.
    """

    def __init__(
        self,
        *,
        max_frame_bytes: int = 1024 * 1024,
        max_conflicts: int = 3,
        max_retries: int = 5,
        retry_base: float = 0.25,
        retry_cap: float = 5.0,
    ) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.max_conflicts = max_conflicts
        self.max_retries = max_retries
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self._items: OrderedDict[bytes, OutgoingSend] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._items

    def __iter__(self) -> Iterator[OutgoingSend]:
        return iter(list(self._items.values()))

    def add(self, item: OutgoingSend) -> None:
        """Queue ``item`` last; :class:`ValueError` if its msg_id is already queued."""
        if item.msg_id in self._items:
            raise ValueError(f"msg_id {item.msg_id.hex()} is already in flight")
        self._items[item.msg_id] = item

    def next_batch(
        self,
        directory: DeviceDirectory,
        connection: int,
        now: float,
        *,
        sender: tuple[str, int] | None = None,
        max_frames: int = 256,
        max_bytes: int = 1024 * 1024,
        seal: Seal | None = None,
    ) -> Batch:
        """Pick the SENDs to write on ``connection`` now, in order, and mark them
        as on the wire there. ``lookups`` are users whose device set must be
        fetched (mark them with :meth:`DeviceDirectory.start_fetch`).

        ``sender`` is this device ``(user, device)``: a SEND to one's own user
        names only the other devices. ``seal`` encrypts a SEND's payload per
        device (see :data:`Seal`); a device it has no session with yet lands
        in ``sessions`` and holds that recipient back."""
        batch = Batch()
        blocked: set[tuple[bool, str]] = set()
        size = 0
        for item in list(self._items.values()):
            key = item.key
            if key in blocked:
                continue
            if item.connection == connection:
                # On the wire: later SENDs may follow unless this one was built
                # from a device set that has been replaced since (it will 409).
                if not item.group and directory.generation(item.to) != item.generation:
                    blocked.add(key)
                continue
            if item.hold_until is not None and now < item.hold_until:
                blocked.add(key)
                continue
            generation = 0
            if item.group:
                frame = item.encode()
            else:
                entry = directory.get(item.to)
                if entry is None:
                    if directory.needs_fetch(item.to):
                        batch.lookups.add(item.to)
                    blocked.add(key)
                    continue
                generation, devices = entry
                if sender is not None and item.to == sender[0]:
                    devices = tuple(d for d in devices if d != sender[1])
                if not devices:
                    # Only possible for a note to self from a user's only device.
                    del self._items[item.msg_id]
                    batch.failed.append((item, 404, f"{item.to} has no other device to send to"))
                    continue
                if seal is not None:
                    try:
                        missing = item.seal_for(devices, seal)
                    except SealError as exc:
                        del self._items[item.msg_id]
                        batch.failed.append((item, exc.code, exc.reason))
                        continue
                    if missing:
                        batch.sessions.setdefault(item.to, set()).update(missing)
                        blocked.add(key)
                        continue
                frame = item.encode(devices)
            if len(frame) > self.max_frame_bytes:
                del self._items[item.msg_id]
                batch.failed.append(
                    (item, 413, f"message too large: {len(frame)} bytes on the wire")
                )
                continue
            if batch.frames and (len(batch.frames) >= max_frames or size + len(frame) > max_bytes):
                break
            size += len(frame)
            item.connection = connection
            item.generation = generation
            item.hold_until = None
            batch.frames.append((item, frame))
        return batch

    def next_deadline(self) -> float | None:
        """The earliest end of a 429/503 back-off, if any."""
        holds = [i.hold_until for i in self._items.values() if i.hold_until is not None]
        return min(holds) if holds else None

    def on_sent(self, msg_id: bytes) -> OutgoingSend | None:
        """SENT arrived: the SEND is done (None if it was not queued)."""
        return self._items.pop(msg_id, None)

    def on_error(
        self, msg_id: bytes, code: int, reason: str, directory: DeviceDirectory, now: float
    ) -> ErrorVerdict | None:
        """ERROR with ``ref`` = ``msg_id`` arrived (None if it was not queued).

        409: the device set was stale; invalidate it (unless already refreshed
        since) and send again, up to ``max_conflicts`` times. 429/503: send
        again after an exponential back-off, up to ``max_retries`` times.
        Anything else is final."""
        item = self._items.get(msg_id)
        if item is None:
            return None
        if code == 409 and not item.group:
            item.conflicts += 1
            if item.conflicts <= self.max_conflicts:
                if directory.generation(item.to) == item.generation:
                    directory.invalidate(item.to)
                item.connection = 0
                return ErrorVerdict(item, False, code, reason)
        elif code in RETRY_CODES:
            item.retries += 1
            if item.retries <= self.max_retries:
                delay = min(self.retry_cap, self.retry_base * 2 ** (item.retries - 1))
                item.hold_until = now + delay
                item.connection = 0
                return ErrorVerdict(item, False, code, reason)
        del self._items[msg_id]
        return ErrorVerdict(item, True, code, reason)

    def fail_user(self, user: str) -> list[OutgoingSend]:
        """Remove and return every direct SEND to ``user`` (e.g. unknown user)."""
        gone = [i for i in self._items.values() if not i.group and i.to == user]
        for item in gone:
            del self._items[item.msg_id]
        return gone

    def clear(self) -> list[OutgoingSend]:
        """Remove and return everything (the client is closing)."""
        gone = list(self._items.values())
        self._items.clear()
        return gone
