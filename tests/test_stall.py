"""Acceptance: a recipient that stops reading does not hurt anyone else.

A "stalled" client does the WebSocket handshake by hand on a raw TCP socket
with a tiny receive buffer, AUTHs, and then never reads again. Another user
floods it (FLOOD messages of 1 KiB, pipelined). Meanwhile healthy pairs run a
full SEND -> SENT -> MSG -> ACK -> RECEIPT cycle, one message at a time. The
relay is a real process (tests/relayproc.py). Checks:

* the healthy pairs finish all their messages (a liveness bound, generous);
* the flooder keeps getting SENT for every message: they are durable in the
  stalled device's inbox (READY ``pending`` shows all of them afterwards),
  not held in the relay's memory;
* the relay's RSS grows by less than RSS_GROWTH_LIMIT over the baseline
  measured after a warm-up; the figures are printed (``pytest -s``).
"""

from __future__ import annotations

import base64
import os
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import nacl.signing
import pytest
import trio

from tests.relayproc import RelayProcess, spawn_relay
from tests.wire import AUTH_CONTEXT, User, WireClient, packb, unpack_all

pytestmark = pytest.mark.slow

FLOOD = 20_000
FLOOD_PAYLOAD = 1024
FLOOD_SENDS_PER_MESSAGE = 16
FLOOD_MAX_OUTSTANDING = 1024
PAIRS = 5
PAIR_MESSAGES = 200
WARMUP_MESSAGES = 20
WARMUP_FLOOD = 1000
FLOOD_HEAD_START = 300  # SENT to the stalled device (more than its window) before the pairs start
MAX_PAIR_MESSAGES = 5000
LIVENESS_S = 60.0
RSS_GROWTH_LIMIT = 64 << 20
# The heap alone (RSS minus the LMDB map's file pages) must grow by less than
# the flood's payload bytes (20 MiB): the flood cannot be sitting in memory.
ANON_GROWTH_LIMIT = 16 << 20
MIB = 1 << 20


# --- a client that stops reading: raw socket, handshake by hand --------------


class RawWebSocket:
    """Just enough RFC 6455 to AUTH: masked binary frames out, unmasked in."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def _read_exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("relay closed the connection")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    async def handshake(self, host: str, port: int) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /v1 HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: relay.v1\r\n\r\n"
        )
        await self.stream.send_all(request.encode())
        while b"\r\n\r\n" not in self.buffer:
            chunk = await self.stream.receive_some(4096)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

    async def send_binary(self, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            header = bytes((0x82, 0x80 | n))
        elif n < 1 << 16:
            header = bytes((0x82, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            header = bytes((0x82, 0x80 | 127)) + n.to_bytes(8, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await self.stream.send_all(header + mask + masked)

    async def receive_message(self) -> bytes:
        first, second = await self._read_exactly(2)
        assert first & 0x80 and first & 0x0F == 0x2, (
            f"expected an unfragmented binary frame, got {first:#x}"
        )
        assert not second & 0x80, "server frames are not masked"
        n = second & 0x7F
        if n == 126:
            n = int.from_bytes(await self._read_exactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await self._read_exactly(8), "big")
        return await self._read_exactly(n)


async def open_stalled(url: str, user: str, key: nacl.signing.SigningKey) -> RawWebSocket:
    """Connect with a tiny receive buffer, AUTH, read READY -- and then nothing, ever."""
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port
    assert host is not None and port is not None
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((host, port))
    ws = RawWebSocket(trio.SocketStream(sock))
    with trio.fail_after(10):
        await ws.handshake(host, port)
        hello = unpack_all(await ws.receive_message())[0]
        assert hello[0] == 0
        sig = key.sign(AUTH_CONTEXT + b"relay" + hello[3]).signature
        await ws.send_binary(packb([1, user, 1, sig]))
        ready = unpack_all(await ws.receive_message())[0]
        assert ready[0] == 3 and ready[3] == 0, ready
    return ws


# --- the flood and the healthy pairs --------------------------------------------


class FloodStats:
    def __init__(self) -> None:
        self.sent = 0
        self.receipts = 0
        self.errors: list[object] = []
        self.started = 0.0
        self.finished = 0.0
        self.max_gap = 0.0


async def flood(client: WireClient, to: str, count: int, stats: FloodStats) -> None:
    """SEND ``count`` 1 KiB messages pipelined; read every SENT."""
    ids = [os.urandom(16) for _ in range(count)]
    outstanding_changed = trio.Event()
    stats.started = time.monotonic()

    async def writer() -> None:
        nonlocal outstanding_changed
        for start in range(0, count, FLOOD_SENDS_PER_MESSAGE):
            while start - stats.sent - len(stats.errors) >= FLOOD_MAX_OUTSTANDING:
                outstanding_changed = trio.Event()
                await outstanding_changed.wait()
            chunk = range(start, min(start + FLOOD_SENDS_PER_MESSAGE, count))
            await client.send(
                *[[10, ids[i], to, {1: b"%08d" % i + os.urandom(FLOOD_PAYLOAD - 8)}] for i in chunk]
            )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        last = time.monotonic()
        while stats.sent + len(stats.errors) < count:
            frame = await client.recv(timeout=30)
            now = time.monotonic()
            stats.max_gap = max(stats.max_gap, now - last)
            last = now
            if frame[0] == 12:
                stats.sent += 1
            elif frame[0] == 15:  # delivered receipts from a reading recipient
                stats.receipts += 1
                if not client.buffer:
                    await client.send([14, frame[1]])
                continue
            else:
                stats.errors.append(frame)
            outstanding_changed.set()
    stats.finished = time.monotonic()


async def run_pair(
    url: str,
    sender: User,
    receiver: User,
    count: int,
    latencies: list[tuple[float, float]],
    tag: bytes,
    keep_going: Callable[[], bool] = lambda: False,
) -> None:
    """Full cycles, one message at a time: SEND, SENT, MSG, ACK, RECEIPT (acked
    too). At least ``count``, and on while ``keep_going()`` (at most MAX_PAIR_MESSAGES).
    ``latencies`` gets (finished at, seconds) per cycle."""
    async with sender.online(url) as s, receiver.online(url) as r:
        i = 0
        while i < count or (keep_going() and i < MAX_PAIR_MESSAGES):
            t0 = time.monotonic()
            body = tag + b"%06d" % i
            msg_id = await s.send_msg(receiver.name, {1: body})
            msg = await r.recv(timeout=30)
            assert msg[0] == 13 and msg[2] == msg_id and msg[7] == body, msg
            await r.send([14, msg[1]])
            got_sent = got_receipt = False
            while not (got_sent and got_receipt):
                frame = await s.recv(timeout=30)
                if frame[0] == 12:
                    assert frame[1] == msg_id and not got_sent, frame
                    got_sent = True
                elif frame[0] == 15:
                    assert frame[2] == msg_id and frame[3] == receiver.name and frame[5] == 1, frame
                    await s.send([14, frame[1]])
                    got_receipt = True
                else:
                    raise AssertionError(f"unexpected frame for the sender: {frame!r}")
            t1 = time.monotonic()
            latencies.append((t1, t1 - t0))
            i += 1


def tcp_queues(local_port: int, remote_port: int) -> tuple[int, int] | None:
    """(tx_queue, rx_queue) bytes of the loopback TCP socket local_port -> remote_port."""
    want = f":{local_port:04X}", f":{remote_port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(want[0]) and fields[2].endswith(want[1]):
                tx, rx = fields[4].split(":")
                return int(tx, 16), int(rx, 16)
    return None


async def sample_rss(
    relay: RelayProcess, samples: list[tuple[float, int, int]], stop: trio.Event
) -> None:
    t0 = time.monotonic()
    while not stop.is_set():
        samples.append((time.monotonic() - t0, relay.rss(), relay.rss_anon()))
        with trio.move_on_after(0.1):
            await stop.wait()


def describe(latencies: list[tuple[float, float]]) -> str:
    ordered = sorted(dt for _, dt in latencies)
    if not ordered:
        return "n=0"
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"n={len(ordered)} p50={statistics.median(ordered) * 1000:.1f}ms p99={p99 * 1000:.1f}ms max={ordered[-1] * 1000:.1f}ms"


async def test_stalled_recipient_does_not_hurt_others(tmp_path: Path, fastpath_name: str) -> None:
    async with spawn_relay(tmp_path / "data", fastpath=fastpath_name) as relay:
        url = relay.url
        flooder, stalled, sink = User("flooder"), User("stalled"), User("sink")
        senders = [User(f"s{i}") for i in range(PAIRS)]
        receivers = [User(f"r{i}") for i in range(PAIRS)]
        for user in (flooder, stalled, sink, *senders, *receivers):
            await user.register(url)

        # Warm-up: every code path once (pairs' cycles, 1 KiB pipelined SENDs
        # to a reading recipient), then the baseline.
        warm_latencies: list[tuple[float, float]] = []
        async with trio.open_nursery() as nursery:
            for i in range(PAIRS):
                nursery.start_soon(
                    run_pair, url, senders[i], receivers[i], WARMUP_MESSAGES, warm_latencies, b"w"
                )
            async with (
                flooder.online(url) as f,
                sink.online(url) as k,
                trio.open_nursery() as warm_flood,
            ):

                async def drain_sink() -> None:
                    got = 0
                    while got < WARMUP_FLOOD:
                        frame = await k.recv(timeout=30)
                        if frame[0] == 13:
                            got += 1
                            if not k.buffer:
                                await k.send([14, frame[1]])

                warm_flood.start_soon(drain_sink)
                warm = FloodStats()
                await flood(f, sink.name, WARMUP_FLOOD, warm)
                assert warm.sent == WARMUP_FLOOD and not warm.errors, warm.errors[:3]
        await trio.sleep(0.5)
        baseline, baseline_anon = relay.rss(), relay.rss_anon()

        stalled_ws = await open_stalled(url, stalled.name, stalled.key)
        samples: list[tuple[float, int, int]] = []
        latencies: list[tuple[float, float]] = []
        stats = FloodStats()
        stop_sampling = trio.Event()
        pairs_done = 0.0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample_rss, relay, samples, stop_sampling)
            async with flooder.online(url) as f, trio.open_nursery() as work:
                work.start_soon(flood, f, stalled.name, FLOOD, stats)
                # Let the flood fill the stalled device's window and its socket first.
                with trio.fail_after(30):
                    while stats.sent < FLOOD_HEAD_START:
                        await trio.sleep(0.01)
                pairs_start = time.monotonic()
                with trio.fail_after(LIVENESS_S):
                    async with trio.open_nursery() as pairs:
                        for i in range(PAIRS):
                            pairs.start_soon(
                                run_pair,
                                url,
                                senders[i],
                                receivers[i],
                                PAIR_MESSAGES,
                                latencies,
                                b"p",
                                lambda: not stats.finished,
                            )
                pairs_done = time.monotonic() - pairs_start
                client_port = stalled_ws.stream.socket.getsockname()[1]
                relay_port = urlparse(url).port
                assert relay_port is not None
                relay_side = tcp_queues(relay_port, client_port)
                client_side = tcp_queues(client_port, relay_port)
            await trio.sleep(0.5)
            stop_sampling.set()
        after_flood, after_flood_anon = relay.rss(), relay.rss_anon()

        peak = max(rss for _, rss, _ in samples)
        peak_anon = max(anon for _, _, anon in samples)
        flood_s = stats.finished - stats.started
        print(
            f"\n[{fastpath_name}] stall test: baseline RSS {baseline / MIB:.1f} MiB (anon {baseline_anon / MIB:.1f}),"
            f" peak during flood {peak / MIB:.1f} MiB (anon {peak_anon / MIB:.1f}),"
            f" growth {(peak - baseline) / MIB:.1f} MiB (anon {(peak_anon - baseline_anon) / MIB:.1f}),"
            f" after {after_flood / MIB:.1f} MiB (anon {after_flood_anon / MIB:.1f}), {len(samples)} samples"
        )
        print(
            f"[{fastpath_name}] flood: {stats.sent} SENT in {flood_s:.2f}s ({stats.sent / flood_s:.0f}/s),"
            f" longest gap between SENTs {stats.max_gap * 1000:.0f}ms"
        )
        during = [(t, dt) for t, dt in latencies if t <= stats.finished]
        print(
            f"[{fastpath_name}] healthy pairs: {len(latencies)} cycles in {pairs_done:.2f}s,"
            f" {len(during)} of them while the flood ran: {describe(during)}; all: {describe(latencies)}"
        )
        data_bytes = sum(f.stat().st_size for f in (tmp_path / "data").rglob("*") if f.is_file())
        print(
            f"[{fastpath_name}] data dir {data_bytes / MIB:.1f} MiB on disk after {FLOOD} x {FLOOD_PAYLOAD} B;"
            f" RSS growth minus heap growth is the LMDB map's file pages (clean page cache, reclaimable)"
        )
        print(f"[{fastpath_name}] warm-up cycles (no flood): {describe(warm_latencies)}")
        print(
            f"[{fastpath_name}] stalled socket after the pairs: relay send queue {relay_side and relay_side[0]} bytes,"
            f" client receive queue {client_side and client_side[1]} bytes (tx, rx from /proc/net/tcp)"
        )

        assert not stats.errors, f"flooder got errors instead of SENT: {stats.errors[:3]}"
        assert stats.sent == FLOOD
        assert len(latencies) >= PAIRS * PAIR_MESSAGES
        assert peak - baseline < RSS_GROWTH_LIMIT, (
            f"RSS grew {(peak - baseline) / MIB:.1f} MiB while a recipient was stalled"
        )
        assert peak_anon - baseline_anon < ANON_GROWTH_LIMIT, (
            f"heap (RssAnon) grew {(peak_anon - baseline_anon) / MIB:.1f} MiB: is the flood held in memory?"
        )

        # The flood is durable in the stalled device's inbox, not in memory:
        # the same device authenticating again sees every entry pending
        # (it replaces the stalled connection, which gets 4409).
        async with stalled.online(url) as fresh:
            assert fresh.ready is not None and fresh.ready[3] == FLOOD, fresh.ready
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await stalled_ws.stream.aclose()
