"""Sender → receiver pairs: the 1:1 message cycle shared by ``pairs`` and ``latency``.

Cycle per message (PROTOCOL.md, Messaging and status)::

    sender ──SEND──▶ relay ──SENT──▶ sender            (SEND→SENT latency)
                     relay ──MSG───▶ receiver          (SEND→MSG latency)
    receiver ──ACK─▶ relay ──RECEIPT(status 1)──▶ sender's inbox
    sender ──ACK (the receipt's seq)──▶ relay          (cycle complete)

The 100-byte payload carries the sender's ``perf_counter_ns`` at send time,
the sender index and a per-sender counter, so the receiver measures latency
and checks order, duplicates and gaps without shared state. Every ACK is
cumulative: one ``[14, seq]`` per received WebSocket message carrying inbox
entries (the highest seq in it), all replies of one read batched into one
WebSocket message together with the sender's next SENDs.

With ``pairs --e2ee`` the payload is a relay-v1 pairwise ciphertext instead
(:meth:`Sender.build_encrypted`): a 100-byte ``text`` plaintext whose extra
``bench`` field carries the same stamp, and the receiver decrypts every MSG
with its ratchet session before it reads the stamp and acks (failures are
counted, never acked silently as good). Sessions are set up in-process
(:mod:`bench.e2ee`).
"""

from __future__ import annotations

import os
import struct
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

import msgpack
from nacl.signing import SigningKey

from bench.e2ee import STAMP_FIELD, stamped_plaintext
from bench.e2ee import now_ms as _now_ms
from bench.engine import Conn
from bench.proto import ERROR, EVENT, MSG, RECEIPT, SENT
from bench.wsclient import encode_binary
from relay.e2ee import pairwise
from relay.e2ee import plaintext as _plaintext
from relay.e2ee.errors import E2EEError
from relay.e2ee.prekeys import PrekeyStore

PAYLOAD_SIZE = 100
_PAY = struct.Struct("<qIQ")  # send time (perf_counter_ns), sender index, counter
_PAD = bytes(PAYLOAD_SIZE - _PAY.size)
# [10, msg_id: bin16, to, {1: bin(100)}] written by hand: fixarray(4), 10, bin8(16)
_SEND_HEAD = b"\x94\x0a\xc4\x10"
_MAP_HEAD = b"\x81\x01\xc4" + bytes((PAYLOAD_SIZE,))
_packb = msgpack.packb
perf_counter_ns = time.perf_counter_ns


def ack_frame(seq: int) -> bytes:
    return _packb([14, seq])


def _bin_head(n: int) -> bytes:
    """msgpack bin8 / bin16 header for ``n`` bytes."""
    return b"\xc4" + bytes((n,)) if n < 256 else b"\xc5" + n.to_bytes(2, "big")


@dataclass
class Counters:
    """Totals over the whole run; the scenario snapshots them around the measured interval."""

    sends: int = 0
    sent: int = 0
    msgs: int = 0
    receipts: int = 0
    completed: int = 0
    acks: int = 0
    errors: int = 0
    duplicates: int = 0
    gaps: int = 0
    unexpected: int = 0
    unknown_ids: int = 0
    throttled: int = 0
    # pairs --e2ee: client-side time spent in encrypt (plaintext encode +
    # pairwise.encrypt) and decrypt (pairwise.decrypt + plaintext decode).
    e2ee_encrypts: int = 0
    e2ee_encrypt_ns: int = 0
    e2ee_decrypts: int = 0
    e2ee_decrypt_ns: int = 0
    e2ee_failures: int = 0
    error_samples: list[Any] = field(default_factory=list)

    def snapshot(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if isinstance(v, int)}


class Latencies:
    """Append-only nanosecond samples; the scenario keeps the index range of its window."""

    def __init__(self) -> None:
        self.send_to_sent = array("q")
        self.send_to_msg = array("q")
        self.send_to_receipt = array("q")

    def marks(self) -> tuple[int, int, int]:
        return len(self.send_to_sent), len(self.send_to_msg), len(self.send_to_receipt)


class Shared:
    def __init__(self) -> None:
        self.counters = Counters()
        self.lat = Latencies()
        # One WebSocket message per frame (bench --framing single), for every role.
        self.single_frames = False

    def record_error(self, frame: Any) -> None:
        self.counters.errors += 1
        if len(self.counters.error_samples) < 10:
            self.counters.error_samples.append(repr(frame)[:200])

    def record_e2ee_failure(self, exc: Exception) -> None:
        self.counters.e2ee_failures += 1
        if len(self.counters.error_samples) < 10:
            self.counters.error_samples.append(f"decrypt: {type(exc).__name__}: {exc}"[:200])


@dataclass
class ReceiverKeys:
    """What a receiver needs to decrypt (``pairs --e2ee``): its identity and
    prekeys, its session with the sender, and the sender's identity key."""

    identity: SigningKey
    prekeys: PrekeyStore
    peer: pairwise.PeerSessions
    sender_identity_key: bytes


def ws_messages(frames: list[bytes], single: bool) -> bytes:
    """The bytes of one socket write carrying ``frames``: all in one WebSocket
    message, or (``single``) one WebSocket message per frame, as a client that
    sends every message on its own does."""
    if single:
        return b"".join([encode_binary(f) for f in frames])
    return encode_binary(b"".join(frames))


class Sender:
    """Sends to one receiver; ``window`` bounds SENDs without SENT, ``cap`` bounds
    messages without RECEIPT (so the relay's inboxes cannot grow without bound)."""

    def __init__(self, shared: Shared, index: int, to_user: str, window: int, cap: int, ack_per_read: bool) -> None:
        self.shared = shared
        self.index = index
        self.to_packed: bytes = _packb(to_user)
        self.id_prefix = os.urandom(8)
        self.counter = 0
        self.window = window
        self.free = window
        self.cap = cap
        self.ack_per_read = ack_per_read
        self.sent_at: dict[bytes, int] = {}
        self.cycle_at: dict[bytes, int] = {}
        self.conn: Conn | None = None
        self.closed_loop = True
        # pairs --e2ee: the session with the receiver; every payload is then a
        # relay-v1 pairwise ciphertext (see build_encrypted).
        self.peer: pairwise.PeerSessions | None = None

    def build(self, n: int, t_ns: int) -> list[bytes]:
        """``n`` SEND frames stamped ``t_ns``; updates the window bookkeeping."""
        if self.peer is not None:
            return self.build_encrypted(n, self.peer)
        parts = []
        index = self.index
        prefix = self.id_prefix
        to = self.to_packed
        sent_at = self.sent_at
        cycle_at = self.cycle_at
        k = self.counter
        pack = _PAY.pack
        for _ in range(n):
            k += 1
            mid = prefix + k.to_bytes(8, "big")
            parts.append(_SEND_HEAD + mid + to + _MAP_HEAD + pack(t_ns, index, k) + _PAD)
            sent_at[mid] = t_ns
            cycle_at[mid] = t_ns
        self.counter = k
        self.free -= n
        self.shared.counters.sends += n
        return parts

    def build_encrypted(self, n: int, peer: pairwise.PeerSessions) -> list[bytes]:
        """``n`` SEND frames whose payload is the pairwise ciphertext of a
        100-byte text plaintext carrying the stamp (each message stamped when
        its encryption starts, so latencies include the sender's encrypt)."""
        parts = []
        index = self.index
        prefix = self.id_prefix
        to = self.to_packed
        sent_at = self.sent_at
        cycle_at = self.cycle_at
        k = self.counter
        encrypt = pairwise.encrypt
        ts_ms = _now_ms()
        spent = 0
        for _ in range(n):
            k += 1
            mid = prefix + k.to_bytes(8, "big")
            t0 = perf_counter_ns()
            payload = encrypt(peer, stamped_plaintext(t0, index, k, ts_ms))
            spent += perf_counter_ns() - t0
            parts.append(_SEND_HEAD + mid + to + b"\x81\x01" + _bin_head(len(payload)) + payload)
            sent_at[mid] = t0
            cycle_at[mid] = t0
        self.counter = k
        self.free -= n
        c = self.shared.counters
        c.sends += n
        c.e2ee_encrypts += n
        c.e2ee_encrypt_ns += spent
        return parts

    def room(self) -> int:
        """How many SENDs the window and the receipt cap allow now."""
        return max(0, min(self.free, self.cap - len(self.cycle_at)))

    def send_now(self, n: int, t_ns: int, extra: list[bytes] | None = None) -> None:
        parts = extra or []
        if n > 0:
            parts.extend(self.build(n, t_ns))
        if parts and self.conn is not None:
            self.conn.write(ws_messages(parts, self.shared.single_frames))

    def on_messages(self, conn: Conn, messages: list[bytes], now_ns: int) -> None:
        shared = self.shared
        c = shared.counters
        lat = shared.lat
        unp = conn.session.unpacker
        sent_at = self.sent_at
        cycle_at = self.cycle_at
        acks: list[bytes] = []
        top_read = 0
        freed = 0
        refused = 0
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
                    lat.send_to_sent.append(now_ns - t0)
                elif typ == RECEIPT:
                    top = fr[1]
                    c.receipts += 1
                    t0 = cycle_at.pop(fr[2], None)
                    if t0 is None or fr[5] != 1:
                        c.unknown_ids += 1
                        continue
                    c.completed += 1
                    lat.send_to_receipt.append(now_ns - t0)
                elif typ == ERROR:
                    shared.record_error(fr)
                    # A refused SEND (429, 503, ...) frees its window slot: no SENT will come.
                    ref = fr[1] if len(fr) > 1 else None
                    if isinstance(ref, bytes) and sent_at.pop(ref, None) is not None:
                        cycle_at.pop(ref, None)
                        refused += 1
                elif typ in (MSG, EVENT):
                    top = fr[1]
                    c.unexpected += 1
                else:
                    c.unexpected += 1
            if top:
                if self.ack_per_read:
                    top_read = max(top_read, top)
                else:
                    acks.append(ack_frame(top))
        if top_read:
            acks.append(ack_frame(top_read))
        c.sent += freed
        c.acks += len(acks)
        self.free += freed + refused
        if self.closed_loop:
            n = self.room()
            if n < self.free:
                c.throttled += 1
            self.send_now(n, perf_counter_ns(), acks)
        elif acks:
            conn.write(ws_messages(acks, self.shared.single_frames))


class Receiver:
    """Receives from one sender, checks order, acks each WebSocket message."""

    def __init__(self, shared: Shared, ack_per_read: bool) -> None:
        self.shared = shared
        self.expect = 1
        self.ack_per_read = ack_per_read
        # pairs --e2ee: every MSG payload is decrypted before it is acked.
        self.keys: ReceiverKeys | None = None

    def on_messages(self, conn: Conn, messages: list[bytes], now_ns: int) -> None:
        shared = self.shared
        c = shared.counters
        to_msg = shared.lat.send_to_msg
        unp = conn.session.unpacker
        unpack = _PAY.unpack_from
        acks: list[bytes] = []
        top_read = 0
        expect = self.expect
        keys = self.keys
        now_ms = _now_ms() if keys is not None else 0
        for payload in messages:
            unp.feed(payload)
            top = 0
            for fr in unp:
                typ = fr[0]
                if typ == MSG:
                    top = fr[1]
                    c.msgs += 1
                    if keys is None:
                        stamp = fr[7]
                    else:
                        started = perf_counter_ns()
                        try:
                            got = pairwise.decrypt(
                                keys.identity, keys.peer, fr[7], keys.sender_identity_key, keys.prekeys, now_ms
                            )
                            stamp = _plaintext.decode(got.plaintext)[STAMP_FIELD]
                        except (E2EEError, KeyError) as exc:
                            shared.record_e2ee_failure(exc)
                            continue
                        keys.peer = got.peer
                        c.e2ee_decrypt_ns += perf_counter_ns() - started
                        c.e2ee_decrypts += 1
                    t0, _idx, k = unpack(stamp)
                    to_msg.append(now_ns - t0)
                    if k == expect:
                        expect += 1
                    elif k < expect:
                        c.duplicates += 1
                    else:
                        c.gaps += k - expect
                        expect = k + 1
                elif typ == ERROR:
                    shared.record_error(fr)
                else:
                    if typ in (RECEIPT, EVENT):
                        top = fr[1]
                    c.unexpected += 1
            if top:
                if self.ack_per_read:
                    top_read = max(top_read, top)
                else:
                    acks.append(ack_frame(top))
        self.expect = expect
        if top_read:
            acks.append(ack_frame(top_read))
        if acks:
            c.acks += len(acks)
            conn.write(ws_messages(acks, self.shared.single_frames))
