"""Group fan-out roles: one sender, many members of one group (``fanout``).

Cycle per message (PROTOCOL.md, Groups)::

    sender ──SEND_GROUP──▶ relay ──SENT──▶ sender              (SEND_GROUP→SENT)
                           relay ──MSG───▶ every other member  (SEND_GROUP→first / last member)
    member ──ACK─▶ relay ──RECEIPT(status 1)──▶ sender's inbox (one per member and message)
    sender ──ACK (cumulative)──▶ relay

The 100-byte payload carries the sender's ``perf_counter_ns`` at send time and
the message's number ``k`` (1, 2, ...), so every member checks that it gets
every message exactly once and in order, and a shared :class:`Tracker` (all
members live in this process) knows when the last member has a message.
Every ACK is cumulative: one ``[14, seq]`` per received WebSocket message
carrying inbox entries, all of one read batched into one WebSocket message
(the sender's next SEND_GROUPs ride in the same message).
"""

from __future__ import annotations

import os
import struct
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

import msgpack

from bench.engine import Conn
from bench.proto import ERROR, EVENT, MSG, RECEIPT, RES, SENT, req_frame
from bench.workload import PAYLOAD_SIZE, ack_frame
from bench.wsclient import encode_binary

_PAY = struct.Struct("<qIQ")  # send time (perf_counter_ns), 0, message number k
_PAD = bytes(PAYLOAD_SIZE - _PAY.size)
# [11, msg_id: bin16, to: group, payload: bin(100)]: fixarray(4), 11, bin8(16) ... bin8(100)
_SEND_GROUP_HEAD = b"\x94\x0b\xc4\x10"
_PAYLOAD_HEAD = b"\xc4" + bytes((PAYLOAD_SIZE,))
perf_counter_ns = time.perf_counter_ns


@dataclass
class GroupCounters:
    """Totals over the whole run; snapshotted around the measured interval."""

    sends: int = 0
    sent: int = 0
    deliveries: int = 0
    completed: int = 0  # messages every member has
    receipts: int = 0
    acks: int = 0
    events: int = 0
    errors: int = 0
    duplicates: int = 0
    reordered: int = 0
    seq_regressions: int = 0
    wrong_group: int = 0
    unexpected: int = 0
    unknown_ids: int = 0
    throttled: int = 0
    error_samples: list[Any] = field(default_factory=list)
    reorder_samples: list[str] = field(default_factory=list)

    def snapshot(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if isinstance(v, int)}

    def record_error(self, frame: Any) -> None:
        self.errors += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(repr(frame)[:200])


class Tracker:
    """Per message k: when it was sent and how many members still miss it."""

    def __init__(self, members: int) -> None:
        self.members = members
        self.send_ns = array("q")
        self.remaining = array("l")
        self.to_first = array("q")  # SEND_GROUP → first member, per message
        self.to_last = array("q")  # SEND_GROUP → last member, per message
        self.to_sent = array("q")
        self.c = GroupCounters()

    def marks(self) -> tuple[int, int, int]:
        return len(self.to_sent), len(self.to_first), len(self.to_last)


class GroupSender:
    """Creates the group, then keeps up to ``window`` SEND_GROUPs without SENT and
    at most ``cap`` messages that some member does not have yet."""

    def __init__(self, tracker: Tracker, window: int, cap: int) -> None:
        self.t = tracker
        self.window = window
        self.free = window
        self.cap = cap
        self.group: str | None = None
        self.group_packed = b""
        self.id_prefix = os.urandom(8)
        self.k = 0
        self.sent_at: dict[bytes, int] = {}
        self.conn: Conn | None = None
        self.sending = False
        self.create_req: int | None = None
        self.create_sent_ns = 0
        self.create_result: Any = None
        self.create_ns = 0
        self.events = 0
        self.pending_acks: list[bytes] = []

    def create_group(self, name: str, members: list[str]) -> None:
        assert self.conn is not None
        self.create_req = 1
        self.create_sent_ns = perf_counter_ns()
        self.conn.write(encode_binary(req_frame(1, "group.create", {"name": name, "members": members})))

    def set_group(self, group: str) -> None:
        self.group = group
        self.group_packed = msgpack.packb(group)

    def room(self) -> int:
        t = self.t
        undelivered = self.k - t.c.completed
        return max(0, min(self.free, self.cap - undelivered))

    def build(self, n: int, t_ns: int) -> list[bytes]:
        t = self.t
        parts = []
        prefix = self.id_prefix
        head = _SEND_GROUP_HEAD
        to = self.group_packed + _PAYLOAD_HEAD
        pack = _PAY.pack
        sent_at = self.sent_at
        send_ns = t.send_ns
        remaining = t.remaining
        members = t.members
        k = self.k
        for _ in range(n):
            k += 1
            mid = prefix + k.to_bytes(8, "big")
            parts.append(head + mid + to + pack(t_ns, 0, k) + _PAD)
            sent_at[mid] = t_ns
            send_ns.append(t_ns)
            remaining.append(members)
        self.k = k
        self.free -= n
        t.c.sends += n
        return parts

    def refill(self, extra: list[bytes] | None = None) -> None:
        """Send what the window and the cap allow now (with ``extra`` frames, e.g. ACKs)."""
        parts = extra or []
        if self.sending:
            n = self.room()
            if n < self.free:
                self.t.c.throttled += 1
            if n > 0:
                parts.extend(self.build(n, perf_counter_ns()))
        if parts and self.conn is not None:
            self.conn.write(encode_binary(b"".join(parts)))

    def on_messages(self, conn: Conn, messages: list[bytes], now_ns: int) -> None:
        t = self.t
        c = t.c
        unp = conn.session.unpacker
        sent_at = self.sent_at
        to_sent = t.to_sent
        acks: list[bytes] = []
        freed = 0
        for payload in messages:
            unp.feed(payload)
            top = 0
            for fr in unp:
                typ = fr[0]
                if typ == SENT:
                    t0 = sent_at.pop(fr[1], None)
                    if t0 is None:
                        c.unknown_ids += 1
                        continue
                    freed += 1
                    to_sent.append(now_ns - t0)
                elif typ == RECEIPT:
                    top = fr[1]
                    c.receipts += 1
                    if fr[5] != 1:
                        c.unknown_ids += 1
                elif typ == EVENT:
                    top = fr[1]
                    self.events += 1
                    c.events += 1
                elif typ == RES:
                    if fr[1] == self.create_req and self.create_result is None:
                        self.create_ns = now_ns - self.create_sent_ns
                        self.create_result = fr
                        if fr[2] and isinstance(fr[3], dict) and isinstance(fr[3].get("group"), str):
                            self.set_group(fr[3]["group"])
                    else:
                        c.unexpected += 1
                elif typ == ERROR:
                    c.record_error(fr)
                    ref = fr[1] if len(fr) > 1 else None
                    if isinstance(ref, bytes) and sent_at.pop(ref, None) is not None:
                        freed += 1  # a refused SEND_GROUP frees its slot: no SENT will come
                else:
                    if typ == MSG:
                        top = fr[1]
                    c.unexpected += 1
            if top:
                acks.append(ack_frame(top))
        c.sent += freed
        c.acks += len(acks)
        self.free += freed
        self.refill(acks)


class Member:
    """One member device: checks exactly-once and order, acks each WebSocket message
    (or holds its ACKs while ``acking`` is False).

    Order is checked against the send order (message number ``k``): a message
    that arrives before an earlier one counts as ``reordered`` (the earlier
    one, when it comes, completes the gap); one that arrives twice counts as
    ``duplicates``. Seqs must increase on the connection."""

    def __init__(self, tracker: Tracker, group_of: GroupSender) -> None:
        self.t = tracker
        self.sender = group_of
        self.expect = 1
        self.ahead: set[int] = set()
        self.last_seq = 0
        self.joined = False
        self.acking = True
        self.held = 0

    def on_messages(self, conn: Conn, messages: list[bytes], now_ns: int) -> None:
        t = self.t
        c = t.c
        unp = conn.session.unpacker
        unpack = _PAY.unpack_from
        send_ns = t.send_ns
        remaining = t.remaining
        last = t.members
        group = self.sender.group
        acks: list[bytes] = []
        expect = self.expect
        ahead = self.ahead
        last_seq = self.last_seq
        n = 0
        for payload in messages:
            unp.feed(payload)
            top = 0
            for fr in unp:
                typ = fr[0]
                if typ == MSG:
                    seq = top = fr[1]
                    n += 1
                    if seq <= last_seq:
                        c.seq_regressions += 1
                    last_seq = seq
                    if fr[5] != group:
                        c.wrong_group += 1
                        continue
                    _t0, _z, k = unpack(fr[7])
                    if k == expect:
                        expect += 1
                        if ahead:
                            while expect in ahead:
                                ahead.discard(expect)
                                expect += 1
                    elif k < expect or k in ahead:
                        c.duplicates += 1
                        continue
                    else:
                        ahead.add(k)
                        c.reordered += 1
                        if len(c.reorder_samples) < 10:
                            c.reorder_samples.append(f"{conn.name}: seq {seq} has message {k}, expected {expect}")
                    r = remaining[k - 1] - 1
                    remaining[k - 1] = r
                    if r == last - 1:
                        t.to_first.append(now_ns - send_ns[k - 1])
                    if r == 0:
                        t.to_last.append(now_ns - send_ns[k - 1])
                        c.completed += 1
                elif typ == EVENT:
                    top = fr[1]
                    self.joined = True
                    c.events += 1
                elif typ == ERROR:
                    c.record_error(fr)
                else:
                    if typ == RECEIPT:
                        top = fr[1]
                    c.unexpected += 1
            if top:
                if self.acking:
                    acks.append(ack_frame(top))
                else:
                    self.held = max(self.held, top)
        self.expect = expect
        self.last_seq = last_seq
        c.deliveries += n
        if acks:
            c.acks += len(acks)
            conn.write(encode_binary(b"".join(acks)))

    def missing(self, sent: int) -> int:
        """Messages 1..sent this member has not received."""
        return max(0, sent - (self.expect - 1) - len([k for k in self.ahead if k <= sent]))

    def release(self, conn: Conn) -> None:
        """Resume acking; ACK what was held."""
        self.acking = True
        if self.held:
            conn.write(encode_binary(ack_frame(self.held)))
            self.t.c.acks += 1
            self.held = 0
