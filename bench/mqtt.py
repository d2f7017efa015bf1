"""A minimal raw-socket MQTT 3.1.1 client and the ``pairs`` cycle over it, for
comparing the relay with Mosquitto on the same engine; at the end, the
``fanout`` roles (one publisher, N - 1 subscribers of one topic).

Only what the cycle needs: CONNECT (clean_session=0, a client id, no
keep-alive), SUBSCRIBE QoS 1 to the client's own topic, PUBLISH QoS 1 with
packet ids and PUBACK both ways. The cycle per message, the analogue of the
relay's SEND→SENT→MSG→ACK→RECEIPT::

    sender ──PUBLISH q1 (receiver's topic)──▶ broker ──PUBACK──▶ sender      (≈ SENT)
                                              broker ──PUBLISH──▶ receiver   (≈ MSG)
    receiver ──PUBACK──▶ broker
    receiver ──PUBLISH q1 "receipt" (sender's topic)──▶ broker ──PUBLISH──▶ sender
    sender ──PUBACK──▶ broker                                                (cycle complete)

The 100-byte payload is the relay cycle's (send time, sender index, counter,
padding); the receipt carries its first 20 bytes back. Each sender keeps at
most ``window`` PUBLISHes without PUBACK; every reply of one socket read
leaves in one ``send``. Closed loop (``pairs``) refills the window from the
replies; open loop (``latency``, ``closed_loop = False``) publishes only when
the scenario's schedule says so and writes just the PUBACKs back.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from typing import Any

from bench.engine import EPOLLIN, BufferedWriter, ConnectionLost, Engine
from bench.groups import Member, Tracker
from bench.workload import _PAD, _PAY, PAYLOAD_SIZE, Shared

RECV_SIZE = 1 << 18
perf_counter_ns = time.perf_counter_ns

CONNACK = 0x20
PUBLISH = 0x30
PUBACK = 0x40
SUBACK = 0x90
_PID = struct.Struct(">H")


def _varlen(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _str(s: str) -> bytes:
    b = s.encode()
    return _PID.pack(len(b)) + b


def connect_packet(client_id: str, clean_session: bool = False) -> bytes:
    body = _str("MQTT") + bytes((4, 0x02 if clean_session else 0x00)) + _PID.pack(0) + _str(client_id)
    return b"\x10" + _varlen(len(body)) + body


def subscribe_packet(pid: int, topic: str, qos: int = 1) -> bytes:
    body = _PID.pack(pid) + _str(topic) + bytes((qos,))
    return b"\x82" + _varlen(len(body)) + body


def publish_head(topic: str, payload_len: int) -> tuple[bytes, bytes]:
    """(fixed header + topic, for QoS 1); the packet is head + pid + payload."""
    t = _str(topic)
    return b"\x32" + _varlen(len(t) + 2 + payload_len) + t, t


def puback(pid: int) -> bytes:
    return b"\x40\x02" + _PID.pack(pid)


class Parser:
    """Splits a byte stream into (first byte, body) MQTT packets."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self.buf + data if self.buf else data
        out = []
        i = 0
        n = len(buf)
        while i + 2 <= n:
            length = buf[i + 1]
            j = i + 2
            if length & 0x80:  # multi-byte remaining length (not in this cycle's packets)
                length &= 0x7F
                shift = 7
                complete = False
                while j < n and j < i + 5:
                    b = buf[j]
                    j += 1
                    length |= (b & 0x7F) << shift
                    shift += 7
                    if not b & 0x80:
                        complete = True
                        break
                if not complete:
                    break
            end = j + length
            if end > n:
                break
            out.append((buf[i], buf[j:end]))
            i = end
        self.buf = buf[i:]
        return out


def _recv_packets(sock: socket.socket, parser: Parser, want: int, deadline: float) -> list[tuple[int, bytes]]:
    got: list[tuple[int, bytes]] = []
    while len(got) < want:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConnectionLost("MQTT setup timed out")
        sock.settimeout(left)
        data = sock.recv(65536)
        if not data:
            raise ConnectionLost("broker closed the connection during setup")
        got.extend(parser.feed(data))
    return got


class MqttConn(BufferedWriter):
    """One non-blocking MQTT connection driven by :class:`bench.engine.Engine`."""

    __slots__ = ("parser", "role", "closed")

    def __init__(self, engine: Engine, sock: socket.socket, parser: Parser, role: Any, name: str) -> None:
        self.engine = engine
        self.sock = sock
        sock.setblocking(False)
        self.fd = sock.fileno()
        self.parser = parser
        self.role = role
        self.out = b""
        self.name = name
        self.closed = False
        engine.conns[self.fd] = self  # type: ignore[assignment]
        engine.ep.register(self.fd, EPOLLIN)

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
            now_ns = perf_counter_ns()
        except BlockingIOError:
            return
        except OSError as exc:
            raise ConnectionLost(f"{self.name}: recv failed: {exc}") from exc
        if not data:
            raise ConnectionLost(f"{self.name}: broker closed the connection")
        packets = self.parser.feed(data)
        if packets:
            self.role.on_packets(self, packets, now_ns)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.setblocking(False)
            self.sock.send(b"\xe0\x00")  # DISCONNECT
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class MqttSender:
    """Publishes to one receiver's topic; ``window`` bounds PUBLISHes without
    PUBACK, ``cap`` messages without receipt. ``closed_loop`` (``pairs``):
    every reply refills the window; False (``latency``): the schedule calls
    :meth:`send_now`, replies carry only PUBACKs."""

    def __init__(self, shared: Shared, index: int, to_topic: str, window: int, cap: int) -> None:
        self.shared = shared
        self.index = index
        self.head = publish_head(to_topic, _PAY.size + len(_PAD))[0]
        self.counter = 0
        self.pid = 0
        self.window = window
        self.free = window
        self.cap = cap
        self.sent_at: dict[int, int] = {}  # packet id -> send time
        self.cycle_at: dict[int, int] = {}  # counter -> send time
        self.conn: MqttConn | None = None
        self.closed_loop = True

    def room(self) -> int:
        return max(0, min(self.free, self.cap - len(self.cycle_at)))

    def build(self, n: int, t_ns: int) -> list[bytes]:
        parts = []
        head = self.head
        index = self.index
        pack = _PAY.pack
        pidpack = _PID.pack
        sent_at = self.sent_at
        cycle_at = self.cycle_at
        k = self.counter
        pid = self.pid
        for _ in range(n):
            k += 1
            pid = pid % 0xFFFF + 1
            parts.append(head + pidpack(pid) + pack(t_ns, index, k) + _PAD)
            sent_at[pid] = t_ns
            cycle_at[k] = t_ns
        self.counter = k
        self.pid = pid
        self.free -= n
        self.shared.counters.sends += n
        return parts

    def send_now(self, n: int, t_ns: int, extra: list[bytes] | None = None) -> None:
        parts = extra or []
        if n > 0:
            parts.extend(self.build(n, t_ns))
        if parts and self.conn is not None:
            self.conn.write(b"".join(parts))

    def on_packets(self, conn: MqttConn, packets: list[tuple[int, bytes]], now_ns: int) -> None:
        c = self.shared.counters
        lat = self.shared.lat
        sent_at = self.sent_at
        cycle_at = self.cycle_at
        replies: list[bytes] = []
        freed = 0
        unpack = _PAY.unpack_from
        for first, body in packets:
            typ = first & 0xF0
            if typ == PUBACK:
                t0 = sent_at.pop(body[0] << 8 | body[1], None)
                if t0 is None:
                    c.unknown_ids += 1
                    continue
                freed += 1
                lat.send_to_sent.append(now_ns - t0)
            elif typ == PUBLISH:
                off = 2 + (body[0] << 8 | body[1])
                if first & 0x06:
                    replies.append(b"\x40\x02" + body[off : off + 2])
                    off += 2
                c.receipts += 1
                _t, _idx, k = unpack(body, off)
                t0 = cycle_at.pop(k, None)
                if t0 is None:
                    c.unknown_ids += 1
                    continue
                c.completed += 1
                lat.send_to_receipt.append(now_ns - t0)
            else:
                c.unexpected += 1
        c.sent += freed
        c.acks += len(replies)
        self.free += freed
        if not self.closed_loop:
            if replies:
                conn.write(b"".join(replies))
            return
        n = self.room()
        if n < self.free:
            c.throttled += 1
        self.send_now(n, perf_counter_ns(), replies)


class MqttReceiver:
    """Receives from one sender, checks order, PUBACKs each message, then
    publishes its receipt (QoS 1) to the sender's topic."""

    def __init__(self, shared: Shared, reply_topic: str) -> None:
        self.shared = shared
        self.expect = 1
        self.head = publish_head(reply_topic, _PAY.size)[0]
        self.pid = 0
        self.outstanding = 0

    def on_packets(self, conn: MqttConn, packets: list[tuple[int, bytes]], now_ns: int) -> None:
        c = self.shared.counters
        to_msg = self.shared.lat.send_to_msg
        unpack = _PAY.unpack_from
        replies: list[bytes] = []
        expect = self.expect
        head = self.head
        pid = self.pid
        pidpack = _PID.pack
        for first, body in packets:
            typ = first & 0xF0
            if typ == PUBLISH:
                off = 2 + (body[0] << 8 | body[1])
                if first & 0x06:
                    replies.append(b"\x40\x02" + body[off : off + 2])
                    off += 2
                c.msgs += 1
                t0, _idx, k = unpack(body, off)
                to_msg.append(now_ns - t0)
                if k == expect:
                    expect += 1
                elif k < expect:
                    c.duplicates += 1
                else:
                    c.gaps += k - expect
                    expect = k + 1
                pid = pid % 0xFFFF + 1
                replies.append(head + pidpack(pid) + body[off : off + _PAY.size])
                self.outstanding += 1
            elif typ == PUBACK:
                self.outstanding -= 1
            else:
                c.unexpected += 1
        self.expect = expect
        self.pid = pid
        if replies:
            c.acks += len(replies)
            conn.write(b"".join(replies))


def host_port(url: str) -> tuple[str, int]:
    rest = url.split("://", 1)[1].split("/", 1)[0]
    host, port = rest.rsplit(":", 1)
    return host, int(port)


def handshake(
    url: str, names: list[str], topics: list[str | None], timeout: float
) -> tuple[list[socket.socket], list[Parser], int]:
    """One connection per client id in ``names``: all connections, then CONNECT
    (clean_session=0) and, where ``topics`` has one, SUBSCRIBE QoS 1 written on
    each (pipelined, as MQTT allows), then every CONNACK and SUBACK read.
    Returns (sockets, parsers, packets beyond those, which a fresh session
    should not get)."""
    host, port = host_port(url)
    deadline = time.monotonic() + timeout
    socks: list[socket.socket] = []
    extra = 0
    try:
        for name, topic in zip(names, topics, strict=True):
            s = socket.create_connection((host, port), timeout=timeout)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(s)
            s.sendall(connect_packet(name) + (subscribe_packet(1, topic, 1) if topic is not None else b""))
        parsers = []
        for name, topic, s in zip(names, topics, socks, strict=True):
            p = Parser()
            want = 1 if topic is None else 2
            got = _recv_packets(s, p, want, deadline)
            f1, b1 = got[0]
            if f1 != CONNACK or b1[1] != 0:
                raise ConnectionLost(f"{name}: CONNACK refused: {f1:#x} {b1!r}")
            if topic is not None:
                f2, b2 = got[1]
                if f2 != SUBACK or b2[2] != 1:
                    raise ConnectionLost(f"{name}: SUBACK not QoS 1: {f2:#x} {b2!r}")
            extra += len(got) - want
            parsers.append(p)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks, parsers, extra


def open_clients(
    url: str, engine: Engine, n: int, shared: Shared, window: int, cap: int, timeout: float
) -> tuple[list[MqttSender], list[MqttReceiver]]:
    """``n`` receivers and ``n`` senders, each subscribed to its own topic
    (:func:`handshake`); only then do they join the engine."""
    run_id = os.urandom(4).hex()
    names = [f"b{run_id}r{i}" for i in range(n)] + [f"b{run_id}s{i}" for i in range(n)]
    socks, parsers, extra = handshake(url, names, [f"bench/{name}" for name in names], timeout)
    shared.counters.unexpected += extra
    senders: list[MqttSender] = []
    receivers: list[MqttReceiver] = []
    for i in range(n):
        rx = MqttReceiver(shared, f"bench/{names[n + i]}")
        MqttConn(engine, socks[i], parsers[i], rx, names[i])
        receivers.append(rx)
    for i in range(n):
        tx = MqttSender(shared, i, f"bench/{names[i]}", window, cap)
        tx.conn = MqttConn(engine, socks[n + i], parsers[n + i], tx, names[n + i])
        senders.append(tx)
    return senders, receivers


# --- fanout: one publisher, N - 1 subscribers of one topic --------------------
#
# The analogue of bench.groups' SEND_GROUP cycle::
#
#     publisher ──PUBLISH q1 (group topic)──▶ broker ──PUBACK──▶ publisher     (≈ SENT)
#                                             broker ──PUBLISH──▶ each subscriber (≈ MSG)
#     subscriber ──PUBACK──▶ broker                                            (≈ ACK)
#
# There is no RECEIPT back to the publisher: MQTT has none, and emulating it
# (a PUBLISH per subscriber and message) would be a different workload. The
# shared Tracker and counters are bench.groups', so the fanout scenario
# measures both protocols with the same code. The payload is the relay
# fan-out's: send time, 0, message number k, padded to 100 bytes (the same
# layout as the pairs payload, index field 0).


class MqttGroupPublisher:
    """Publishes to the group topic; at most ``window`` PUBLISHes without PUBACK
    (as :class:`bench.groups.GroupSender` keeps ``window`` SEND_GROUPs without
    SENT) and at most ``cap`` messages some subscriber does not have yet."""

    def __init__(self, tracker: Tracker, topic: str, window: int, cap: int) -> None:
        if not 1 <= window < 0xFFFF:
            # Packet ids are 16 bits; a window that wraps them would reuse an id still in flight.
            raise ValueError(f"--window {window}: MQTT packet ids allow 1..65534 PUBLISHes in flight")
        self.t = tracker
        self.head = publish_head(topic, PAYLOAD_SIZE)[0]
        self.window = window
        self.free = window
        self.cap = cap
        self.k = 0
        self.pid = 0
        self.sent_at: dict[int, int] = {}  # packet id -> send time
        self.conn: MqttConn | None = None
        self.sending = False

    def room(self) -> int:
        undelivered = self.k - self.t.c.completed
        return max(0, min(self.free, self.cap - undelivered))

    def build(self, n: int, t_ns: int) -> list[bytes]:
        t = self.t
        parts = []
        head = self.head
        pack = _PAY.pack
        pidpack = _PID.pack
        sent_at = self.sent_at
        send_ns = t.send_ns
        remaining = t.remaining
        members = t.members
        k = self.k
        pid = self.pid
        for _ in range(n):
            k += 1
            pid = pid % 0xFFFF + 1
            parts.append(head + pidpack(pid) + pack(t_ns, 0, k) + _PAD)
            sent_at[pid] = t_ns
            send_ns.append(t_ns)
            remaining.append(members)
        self.k = k
        self.pid = pid
        self.free -= n
        t.c.sends += n
        return parts

    def refill(self) -> None:
        """Publish what the window and the cap allow now, in one write."""
        if not self.sending:
            return
        n = self.room()
        if n < self.free:
            self.t.c.throttled += 1
        if n > 0 and self.conn is not None:
            self.conn.write(b"".join(self.build(n, perf_counter_ns())))

    def on_packets(self, conn: MqttConn, packets: list[tuple[int, bytes]], now_ns: int) -> None:
        c = self.t.c
        sent_at = self.sent_at
        to_sent = self.t.to_sent
        freed = 0
        for first, body in packets:
            if first & 0xF0 == PUBACK:
                t0 = sent_at.pop(body[0] << 8 | body[1], None)
                if t0 is None:
                    c.unknown_ids += 1
                    continue
                freed += 1
                to_sent.append(now_ns - t0)
            else:
                c.unexpected += 1  # the publisher subscribes to nothing
        c.sent += freed
        self.free += freed
        self.refill()


class MqttSubscriber(Member):
    """One subscriber of the group topic: checks exactly-once and send order like
    :class:`bench.groups.Member` (whose state and :meth:`missing` it shares) and
    PUBACKs every PUBLISH, all PUBACKs of one socket read in one write (the
    relay's members send one cumulative ACK per WebSocket message instead)."""

    def __init__(self, tracker: Tracker, publisher: MqttGroupPublisher, topic: str) -> None:
        super().__init__(tracker, None)  # type: ignore[arg-type]  # no group id: the topic is checked
        self.publisher = publisher
        self.topic = topic.encode()
        self.joined = True  # SUBACK before the engine starts: there is no join EVENT

    def on_packets(self, conn: MqttConn, packets: list[tuple[int, bytes]], now_ns: int) -> None:
        t = self.t
        c = t.c
        unpack = _PAY.unpack_from
        send_ns = t.send_ns
        remaining = t.remaining
        last = t.members
        topic = self.topic
        tlen = len(topic)
        replies: list[bytes] = []
        expect = self.expect
        ahead = self.ahead
        n = 0
        for first, body in packets:
            if first & 0xF0 != PUBLISH:
                c.unexpected += 1
                continue
            tl = body[0] << 8 | body[1]
            off = 2 + tl
            if first & 0x06:
                replies.append(b"\x40\x02" + body[off : off + 2])
                off += 2
            n += 1
            if tl != tlen or body[2 : 2 + tl] != topic:
                c.wrong_group += 1
                continue
            _t0, _z, k = unpack(body, off)
            # The same bookkeeping as bench.groups.Member.on_messages (kept inline: per delivery).
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
                    c.reorder_samples.append(f"{conn.name}: message {k}, expected {expect}")
            r = remaining[k - 1] - 1
            remaining[k - 1] = r
            if r == last - 1:
                t.to_first.append(now_ns - send_ns[k - 1])
            if r == 0:
                t.to_last.append(now_ns - send_ns[k - 1])
                c.completed += 1
        self.expect = expect
        c.deliveries += n
        if replies:
            c.acks += len(replies)
            conn.write(b"".join(replies))


def open_fanout_clients(
    url: str, engine: Engine, subscribers: int, tracker: Tracker, window: int, cap: int, timeout: float
) -> tuple[MqttGroupPublisher, list[MqttSubscriber], str]:
    """``subscribers`` clients subscribed (QoS 1) to one fresh topic and one
    publisher that subscribes to nothing (MQTT 3.1.1 has no "no local": a
    subscribed publisher would get its own messages, the relay's sender does
    not). Every SUBACK is in before the first PUBLISH. Returns (publisher,
    subscribers, topic)."""
    run_id = os.urandom(4).hex()
    topic = f"bench/group/{run_id}"
    names = [f"g{run_id}m{i}" for i in range(subscribers)] + [f"g{run_id}p"]
    socks, parsers, extra = handshake(url, names, [topic] * subscribers + [None], timeout)
    tracker.c.unexpected += extra
    publisher = MqttGroupPublisher(tracker, topic, window, cap)
    subs: list[MqttSubscriber] = []
    for i in range(subscribers):
        sub = MqttSubscriber(tracker, publisher, topic)
        MqttConn(engine, socks[i], parsers[i], sub, names[i])
        subs.append(sub)
    publisher.conn = MqttConn(engine, socks[-1], parsers[-1], publisher, names[-1])
    return publisher, subs, topic
