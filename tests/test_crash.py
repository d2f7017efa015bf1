"""Acceptance: SENT means durable, against a real relay process killed with SIGKILL.

PROTOCOL.md: "SENT (✓) is sent only after the message is durable in the
relay's store (it survives kill -9 of the relay right after SENT)", inbox
entries are delivered in seq order, and messages from one sender device to
one recipient keep their send order. These tests run ``relay serve`` as a
subprocess (tests/relayproc.py), pipeline SENDs several to a WebSocket
message, kill the process with SIGKILL and restart it on the same data
directory, then check what the recipient gets: everything that got SENT,
exactly once, in order, and nothing that was not sent.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed

from tests.relayproc import spawn_relay
from tests.wire import User, WireClient

pytestmark = pytest.mark.slow

SENDS_PER_MESSAGE = 10


def payload_for(counter: int) -> bytes:
    # The counter leads the payload; the padding makes it look like a message.
    return b"%08d:" % counter + os.urandom(24)


def counter_of(payload: bytes) -> int:
    return int(payload[:8])


async def send_pipelined(
    client: WireClient,
    to: str,
    ids: list[bytes],
    sent: dict[bytes, int],
    max_outstanding: int,
    outstanding_changed: list[trio.Event],
) -> None:
    """SEND ids[i] with payload_for(i), SENDS_PER_MESSAGE frames per WebSocket
    message, keeping at most ``max_outstanding`` SENDs without SENT."""
    for start in range(0, len(ids), SENDS_PER_MESSAGE):
        with trio.fail_after(30):
            while start - len(sent) >= max_outstanding:
                outstanding_changed[0] = trio.Event()
                await outstanding_changed[0].wait()
        chunk = range(start, min(start + SENDS_PER_MESSAGE, len(ids)))
        await client.send(*[[10, ids[i], to, {1: payload_for(i)}] for i in chunk])


async def receive_all(bob: WireClient, expected: int, ids: list[bytes]) -> list[int]:
    """Receive ``expected`` MSGs, ACKing after each WebSocket message's batch
    (and at least every 64 entries); return the payload counters in order."""
    counters: list[int] = []
    last_seq = 0
    unacked = 0
    with trio.fail_after(60):
        while len(counters) < expected:
            frame = await bob.recv(timeout=15)
            assert frame[0] == 13, f"expected MSG, got {frame!r}"
            seq, msg_id, from_user, from_device, group, _ts, payload = frame[1:]
            assert seq > last_seq, f"seq {seq} after {last_seq}: not increasing"
            assert (from_user, from_device, group) == ("alice", 1, None)
            counter = counter_of(payload)
            assert 0 <= counter < len(ids), f"payload counter {counter} was never sent"
            assert msg_id == ids[counter], f"msg_id of counter {counter} does not match"
            counters.append(counter)
            last_seq = seq
            unacked += 1
            if not bob.buffer or unacked >= 64:
                await bob.send([14, seq])
                unacked = 0
        if unacked:
            await bob.send([14, last_seq])
    # Exactly once: nothing beyond what READY announced.
    await bob.expect_nothing(0.5)
    return counters


async def register_pair(url: str) -> tuple[User, User]:
    alice, bob = User("alice"), User("bob")
    await alice.register(url)
    await bob.register(url)
    return alice, bob


async def test_kill_right_after_last_sent(tmp_path: Path, fastpath_name: str) -> None:
    """N pipelined SENDs all answered SENT, SIGKILL at once: all N survive."""
    n = 500
    data = tmp_path / "data"
    ids = [os.urandom(16) for _ in range(n)]
    sent: dict[bytes, int] = {}
    async with spawn_relay(data, fastpath=fastpath_name) as relay:
        alice, bob = await register_pair(relay.url)
        async with alice.online(relay.url) as a:
            changed = [trio.Event()]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_pipelined, a, "bob", ids, sent, n, changed)
                with trio.fail_after(60):
                    while len(sent) < n:
                        frame = await a.recv(timeout=15)
                        assert frame[0] == 12, f"expected SENT, got {frame!r}"
                        assert frame[1] in ids and frame[1] not in sent, (
                            "SENT for an unknown or repeated msg_id"
                        )
                        sent[frame[1]] = frame[2]
                        changed[0].set()
                # Immediately after the last SENT: a crash, no shutdown code runs.
                relay.kill()
            assert await relay.wait() == -signal.SIGKILL
    async with spawn_relay(data, fastpath=fastpath_name) as relay, bob.online(relay.url) as b:
        assert b.ready is not None and b.ready[3] == n, f"READY pending {b.ready!r}, expected {n}"
        counters = await receive_all(b, n, ids)
    assert counters == list(range(n))


async def test_kill_while_sending(tmp_path: Path, fastpath_name: str) -> None:
    """SIGKILL after K SENT while SENDs are still flowing: every SENT message
    is delivered after restart, exactly once, in order, and nothing unsent."""
    n, k = 2000, 437
    data = tmp_path / "data"
    ids = [os.urandom(16) for _ in range(n)]
    sent: dict[bytes, int] = {}
    async with spawn_relay(data, fastpath=fastpath_name) as relay:
        alice, bob = await register_pair(relay.url)
        async with alice.online(relay.url) as a:
            changed = [trio.Event()]
            async with trio.open_nursery() as nursery:

                async def sender() -> None:
                    # The relay is killed under us: a broken connection is expected.
                    with contextlib.suppress(
                        ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError
                    ):
                        await send_pipelined(a, "bob", ids, sent, 100, changed)

                nursery.start_soon(sender)
                try:
                    with trio.fail_after(60):
                        while True:
                            frame = await a.recv(timeout=15)
                            assert frame[0] == 12, f"expected SENT, got {frame!r}"
                            assert frame[1] in ids and frame[1] not in sent
                            sent[frame[1]] = frame[2]
                            changed[0].set()
                            if len(sent) == k:
                                relay.kill()
                except ConnectionClosed:
                    pass  # SENTs already on the wire before the kill were read above
                nursery.cancel_scope.cancel()
            assert await relay.wait() == -signal.SIGKILL
    assert k <= len(sent) < n, f"{len(sent)} SENT: the kill did not land mid-stream"
    sent_counters = sorted(ids.index(m) for m in sent)
    async with spawn_relay(data, fastpath=fastpath_name) as relay, bob.online(relay.url) as b:
        assert b.ready is not None
        pending = b.ready[3]
        assert len(sent) <= pending <= n, f"READY pending {pending}, {len(sent)} got SENT, {n} sent"
        counters = await receive_all(b, pending, ids)
    print(
        f"\n[{fastpath_name}] SENT before kill: {len(sent)}, stored (pending after restart): {pending}, of {n} sent"
    )
    # In order and exactly once (receive_all checked seq order and the ids).
    assert counters == sorted(set(counters)), "duplicates or out of send order"
    # Every SENT message is there.
    missing = sorted(set(sent_counters) - set(counters))
    assert not missing, f"{len(missing)} messages got SENT but were lost, first {missing[:10]}"
    # One connection's SENDs to one recipient commit in order: what survived
    # is a prefix of what was sent (nothing skipped in between).
    assert counters == list(range(len(counters)))


async def test_sigterm_closes_1001_and_exits_0(tmp_path: Path, fastpath_name: str) -> None:
    data = tmp_path / "data"
    async with spawn_relay(data, fastpath=fastpath_name) as relay:
        alice, bob = await register_pair(relay.url)
        carol = User("carol")
        await carol.register(relay.url)
        async with alice.online(relay.url) as a, bob.online(relay.url) as b:
            msg_id = await a.send_msg("carol", {1: payload_for(7)})
            sent = await a.recv_type(12)
            assert sent[1] == msg_id
            relay.terminate()
            assert await a.closed() == 1001
            assert await b.closed() == 1001
        assert await relay.wait(timeout=10) == 0
    # A clean shutdown loses nothing either.
    async with spawn_relay(data, fastpath=fastpath_name) as relay, carol.online(relay.url) as c:
        assert c.ready is not None and c.ready[3] == 1
        msg = await c.recv_type(13)
        assert msg[2] == msg_id and counter_of(msg[7]) == 7
