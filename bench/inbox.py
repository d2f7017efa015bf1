"""Offline inboxes: fill them (``drain``, ``restart``) and drain them on reconnect.

* :class:`StoreSender` sends a fixed number of 1:1 messages to a recipient that
  is offline, keeping ``window`` SENDs without SENT; nothing comes back but
  SENTs (the receipts wait in the sender's own inbox).
* :class:`DrainReceiver` authenticates inside the engine (non-blocking: HELLO →
  AUTH → READY, so many recipients connect at once), then receives and acks
  its inbox, checking every message arrives exactly once and, per sender, in
  send order.
* :func:`fill` runs the store phase; :func:`upgrade_all` opens connections
  that are upgraded to WebSocket but not yet authenticated.
"""

from __future__ import annotations

import argparse
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nacl.signing import SigningKey

from bench.engine import Conn, Engine
from bench.proto import (
    ERROR,
    EVENT,
    HELLO,
    MSG,
    READY,
    RECEIPT,
    Session,
    auth_frame,
    open_connection,
    open_sessions,
)
from bench.scenarios.common import Guard
from bench.stats import summarize_ns
from bench.system import CpuMeter, cpu_us_per
from bench.workload import Sender, Shared, ack_frame
from bench.wsclient import encode_binary

_PAY = struct.Struct("<qIQ")  # the 1:1 payload of bench.workload: send time, sender index, counter
perf_counter_ns = time.perf_counter_ns


class StoreSender(Sender):
    """A :class:`bench.workload.Sender` that stops after ``total`` messages and
    expects no receipts (its recipient is offline)."""

    def __init__(self, shared: Shared, index: int, to_user: str, window: int, total: int) -> None:
        super().__init__(shared, index, to_user, window, total + 1, ack_per_read=False)
        self.total = total
        self.first_ns = 0
        self.last_sent_ns = 0

    def room(self) -> int:
        return max(0, min(self.free, self.total - self.counter))

    def done(self) -> bool:
        return self.counter >= self.total and not self.sent_at


def fill(
    url: str,
    args: argparse.Namespace,
    relay_pid: int | None,
    senders: list[str],
    targets: list[str],
    per_sender: int,
    window: int,
    alive: Callable[[], bool] | None,
    timeout: float,
) -> dict[str, Any]:
    """Register ``senders`` (fresh), let sender i send ``per_sender`` messages to
    ``targets[i]`` (already registered, offline), wait for every SENT, close.
    Returns the store figures (SENT/s over the whole phase, SEND→SENT)."""
    shared = Shared()
    c = shared.counters
    engine = Engine()
    try:
        t0 = time.monotonic()
        sessions = open_sessions(url, senders, register=True, timeout=args.setup_timeout, token=args.token)
        register_s = time.monotonic() - t0
        roles: list[StoreSender] = []
        for i, session in enumerate(sessions):
            role = StoreSender(shared, i, targets[i], window, per_sender)
            role.conn = engine.add(session, role)
            roles.append(role)
        guard = Guard(
            lambda: (c.sent, c.errors),
            args.stall_timeout,
            alive,
            lambda: f"sends {c.sends}, SENT {c.sent}, errors {c.errors}",
        )

        def tick(now: float) -> float | None:
            guard.check(now)
            return None

        total = per_sender * len(senders)
        meter = CpuMeter(relay_pid)
        cpu0 = meter.sample()
        now_ns = perf_counter_ns()
        for role in roles:
            role.send_now(role.room(), now_ns)
        finished = engine.run(cpu0.wall + timeout, tick, until=lambda: c.sent + c.errors >= total)
        cpu1 = meter.sample()
        wall = cpu1.wall - cpu0.wall
        if not finished:
            raise TimeoutError(f"store phase not finished within {timeout:.0f} s ({c.sent} of {total} SENT)")
        totals = c.snapshot()
        cpu = CpuMeter.shares(cpu0, cpu1)
        return {
            "messages": total,
            "senders": len(senders),
            "per_sender": per_sender,
            "window": window,
            "register_seconds": round(register_s, 3),
            "seconds": round(wall, 3),
            "sent_per_s": round(c.sent / wall, 1) if wall > 0 else None,
            "send_to_sent_ms": summarize_ns(shared.lat.send_to_sent),
            "cpu_us_per_msg": cpu_us_per(cpu, c.sent),  # relay CPU per message stored (SENT)
            "cpu": cpu,
            "run_totals": totals,
            "error_samples": list(c.error_samples),
        }
    finally:
        engine.close()


def upgrade_all(url: str, users: list[str], keys: list[SigningKey], timeout: float, read_size: int = 0) -> list[Session]:
    """Open and upgrade a connection per user; no AUTH yet (the engine does it)."""
    out: list[Session] = []
    try:
        for user, key in zip(users, keys, strict=True):
            hs = open_connection(url, user, key, timeout, read_size)
            out.append(Session(hs.sock, hs.parser, hs.unpacker, user, 1, key, -1, hs.early))
    except BaseException:
        for s in out:
            s.sock.close()
        raise
    return out


@dataclass
class DrainCounters:
    msgs: int = 0
    acks: int = 0
    ready: int = 0
    errors: int = 0
    duplicates: int = 0
    gaps: int = 0
    unexpected: int = 0
    receipts: int = 0
    events: int = 0
    first_msg_ns: int = 0
    last_msg_ns: int = 0
    last_ready_ns: int = 0
    first_ready_ns: int = 0
    error_samples: list[Any] = field(default_factory=list)

    def snapshot(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if isinstance(v, int) and not k.endswith("_ns")}


class DrainReceiver:
    """Authenticates (AUTH, device 1) on the engine, then acks everything it gets
    (one cumulative ACK per WebSocket message) and checks each sender's order."""

    def __init__(self, counters: DrainCounters) -> None:
        self.c = counters
        self.expect: dict[int, int] = {}
        self.pending: int | None = None
        self.ready_ns = 0
        self.got = 0
        self.conn: Conn | None = None

    def start(self, conn: Conn) -> None:
        """Handle the frames that came with the upgrade response (usually HELLO)."""
        self.conn = conn
        early = conn.session.early
        conn.session.early = []
        if early:
            self._frames(conn, early, perf_counter_ns())

    def _hello(self, conn: Conn, hello: Any) -> None:
        s = conn.session
        conn.write(encode_binary(auth_frame(hello, s.user, s.key, register=False, device=s.device)))

    def _frames(self, conn: Conn, frames: list[Any], now_ns: int) -> int:
        """Handle decoded frames; returns the highest inbox seq among them (0: none)."""
        c = self.c
        top = 0
        expect = self.expect
        unpack = _PAY.unpack_from
        n = 0
        for fr in frames:
            typ = fr[0]
            if typ == MSG:
                top = fr[1]
                n += 1
                _t0, idx, k = unpack(fr[7])
                want = expect.get(idx, 1)
                if k == want:
                    expect[idx] = k + 1
                elif k < want:
                    c.duplicates += 1
                else:
                    c.gaps += k - want
                    expect[idx] = k + 1
            elif typ == READY:
                self.pending = fr[3]
                self.ready_ns = now_ns
                c.ready += 1
                if not c.first_ready_ns:
                    c.first_ready_ns = now_ns
                c.last_ready_ns = now_ns
            elif typ == HELLO:
                self._hello(conn, fr)
            elif typ == ERROR:
                c.errors += 1
                if len(c.error_samples) < 10:
                    c.error_samples.append(repr(fr)[:200])
            elif typ in (RECEIPT, EVENT):
                top = fr[1]
                c.unexpected += 1
            else:
                c.unexpected += 1
        if n:
            self.got += n
            c.msgs += n
            if not c.first_msg_ns:
                c.first_msg_ns = now_ns
            c.last_msg_ns = now_ns
        return top

    def on_messages(self, conn: Conn, messages: list[bytes], now_ns: int) -> None:
        unp = conn.session.unpacker
        acks: list[bytes] = []
        for payload in messages:
            unp.feed(payload)
            top = self._frames(conn, list(unp), now_ns)
            if top:
                acks.append(ack_frame(top))
        if acks:
            self.c.acks += len(acks)
            conn.write(encode_binary(b"".join(acks)))


def drain(
    url: str,
    args: argparse.Namespace,
    relay_pid: int | None,
    users: list[str],
    keys: list[SigningKey],
    expected: int,
    alive: Callable[[], bool] | None,
    timeout: float,
) -> dict[str, Any]:
    """Connect ``users`` (upgrade all, then AUTH all inside the engine) and receive
    until ``expected`` MSGs in all arrived. Timed from the moment the engine
    starts answering HELLOs (every connection is already upgraded)."""
    c = DrainCounters()
    engine = Engine()
    try:
        t0 = time.monotonic()
        sessions = upgrade_all(url, users, keys, args.setup_timeout)
        connect_s = time.monotonic() - t0
        roles = []
        for session in sessions:
            role = DrainReceiver(c)
            conn = engine.add(session, role)
            roles.append((role, conn))
        guard = Guard(
            lambda: (c.msgs, c.ready, c.errors),
            args.stall_timeout,
            alive,
            lambda: f"READY {c.ready} of {len(users)}, MSGs {c.msgs} of {expected}, errors {c.errors}",
        )

        def tick(now: float) -> float | None:
            guard.check(now)
            return None

        meter = CpuMeter(relay_pid)
        cpu0 = meter.sample()
        start_ns = perf_counter_ns()
        for role, conn in roles:
            role.start(conn)
        finished = engine.run(cpu0.wall + timeout, tick, until=lambda: c.msgs >= expected)
        cpu1 = meter.sample()
        if not finished:
            raise TimeoutError(f"drain not finished within {timeout:.0f} s ({c.msgs} of {expected} MSGs)")
        # Let the last ACKs go out and any stray frame arrive.
        engine.run(time.monotonic() + 0.5, tick)
        drain_s = (c.last_msg_ns - start_ns) / 1e9
        pend = [r.pending for r, _ in roles]
        cpu = CpuMeter.shares(cpu0, cpu1)
        return {
            "recipients": len(users),
            "messages": c.msgs,
            "connect_seconds": round(connect_s, 3),
            "seconds": round(drain_s, 3),
            "msgs_per_s": round(c.msgs / drain_s, 1) if drain_s > 0 else None,
            "first_ready_ms": round((c.first_ready_ns - start_ns) / 1e6, 3),
            "all_ready_ms": round((c.last_ready_ns - start_ns) / 1e6, 3),
            "first_msg_ms": round((c.first_msg_ns - start_ns) / 1e6, 3),
            "ready_pending": {"min": min(p or 0 for p in pend), "max": max(p or 0 for p in pend), "sum": sum(p or 0 for p in pend)},
            "cpu_us_per_msg": cpu_us_per(cpu, c.msgs),  # relay CPU per MSG drained (AUTH → last MSG)
            "cpu": cpu,
            "run_totals": c.snapshot(),
            "error_samples": list(c.error_samples),
        }
    finally:
        engine.close()
