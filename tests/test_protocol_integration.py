"""Integration tests of wire protocol v1 (PROTOCOL.md) over real loopback sockets.

Every test runs against an in-process relay with a real LMDB store, once per
fast path ("cython" and "pure", see ``conftest.py``). Clients are the
frame-level :mod:`tests.wire` client, so each test sends exactly the frames
it means. Assertions follow PROTOCOL.md, not the implementation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import nacl.signing
import pytest
import trio
from trio_websocket import ConnectionClosed

from relay.config import Settings
from relay.server.app import RelayServer, open_relay
from tests.wire import AUTH_CONTEXT, User, WireClient, connect, packb

HELLO, AUTH, REGISTER, READY, ERROR = 0, 1, 2, 3, 4
SEND, SEND_GROUP, SENT, MSG, ACK, RECEIPT, READ = 10, 11, 12, 13, 14, 15, 16
REQ, RES, EVENT, SIGNAL, SIGNALED = 20, 21, 22, 30, 31

GROUP_ID = "g." + "A" * 22  # well-formed, never created by the relay


# --------------------------------------------------------------------- helpers


@asynccontextmanager
async def custom_relay(settings: Settings, **changes: Any) -> AsyncIterator[RelayServer]:
    """A relay like the ``relay`` fixture (same fast path, fresh data dir) with ``changes``."""
    changed = dataclasses.replace(settings, data=settings.data + "-custom", **changes)
    async with open_relay(changed) as server:
        yield server


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` holds (store effects of ACK are asynchronous)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def recv_n(client: WireClient, n: int, timeout: float = 10) -> list[list[Any]]:
    return [await client.recv(timeout) for _ in range(n)]


async def assert_alive(client: WireClient, user: str, req_id: int = 424242) -> None:
    """The connection is open and served: a REQ is answered (frames before it are dropped)."""
    res = await client.request(req_id, "devices.list", {"user": user})
    assert res[1] == req_id and res[2] is True, res


def sign_challenge(
    key: nacl.signing.SigningKey, challenge: bytes, server_name: str = "relay"
) -> bytes:
    return key.sign(AUTH_CONTEXT + server_name.encode() + challenge).signature


def add_device(relay: RelayServer, user: str, device: int, key: nacl.signing.SigningKey) -> None:
    """Give ``user`` another device record (no wire op for it yet: write the
    ``users`` database directly, in the layout documented in lmdb_store.py)."""
    shard = relay.store._shard(user)
    with shard.env.begin(write=True, db=shard.users) as txn:
        record = msgpack.unpackb(txn.get(user.encode()), raw=False, strict_map_key=False)
        record["devices"][device] = bytes(key.verify_key)
        txn.put(user.encode(), msgpack.packb(record, use_bin_type=True))


def inbox_entries(relay: RelayServer) -> int:
    return sum(s["inbox"] for s in relay.store.stats().values())


async def users(url: str, *names: str) -> list[User]:
    out = [User(n) for n in names]
    for u in out:
        await u.register(url)
    return out


def assert_error(frame: list[Any], code: int, ref: Any = ...) -> None:
    assert frame[0] == ERROR, frame
    assert len(frame) == 4, frame  # [4, ref, code, reason]
    assert frame[2] == code, frame
    assert isinstance(frame[3], str), frame
    if ref is not ...:
        assert frame[1] == ref, frame


# ----------------------------------------------------------------------- HELLO


async def test_hello(relay):
    before = time.time() * 1000
    async with connect(relay.url) as c1, connect(relay.url) as c2:
        hello = c1.hello
        assert len(hello) == 5
        assert hello[1] == 1
        assert hello[2] == relay.settings.server_name == "relay"
        assert isinstance(hello[3], bytes) and len(hello[3]) == 32
        assert type(hello[4]) is int and before - 5000 <= hello[4] <= time.time() * 1000 + 5000
        assert c2.hello[3] != hello[3], "each connection gets a fresh challenge"


# -------------------------------------------------------------------- REGISTER


async def test_register_success(relay):
    key = nacl.signing.SigningKey.generate()
    async with connect(relay.url) as c:
        ready = await c.register("alice", key)
        assert ready == [READY, "alice", 1, 0]
        await assert_alive(c, "alice")
        res = await c.request(1, "devices.list", {"user": "alice"})
        assert res == [
            RES,
            1,
            True,
            {"devices": [{"device": 1, "identity_key": bytes(key.verify_key)}]},
        ]


async def test_register_user_taken(relay):
    (alice,) = await users(relay.url, "alice")
    other = nacl.signing.SigningKey.generate()
    async with connect(relay.url) as c:
        err = await c.register("alice", other)
        assert_error(err, 409, REGISTER)
        assert await c.closed() == 1008
    # The original key still owns the account.
    async with alice.online(relay.url) as a:
        assert a.ready == [READY, "alice", 1, 0]


async def test_register_bad_signature(relay):
    key = nacl.signing.SigningKey.generate()
    async with connect(relay.url) as c:
        bad = sign_challenge(key, os.urandom(32))
        await c.send([REGISTER, "alice", bytes(key.verify_key), bad, None])
        assert_error(await c.recv(), 401, REGISTER)
        assert await c.closed() == 1008
    assert relay.store.get_user("alice") is None
    # Signed by another key than the one registered.
    async with connect(relay.url) as c:
        sig = sign_challenge(nacl.signing.SigningKey.generate(), c.hello[3])
        await c.send([REGISTER, "alice", bytes(key.verify_key), sig, None])
        assert_error(await c.recv(), 401, REGISTER)
        assert await c.closed() == 1008
    assert relay.store.get_user("alice") is None


@pytest.mark.parametrize("name", ["Alice", "", "a" * 65, "bad name", "é", "a/b", 7])
async def test_register_invalid_user_name(relay, name):
    key = nacl.signing.SigningKey.generate()
    async with connect(relay.url) as c:
        sig = sign_challenge(key, c.hello[3])
        await c.send([REGISTER, name, bytes(key.verify_key), sig, None])
        assert_error(await c.recv(), 400, REGISTER)
        assert await c.closed() == 1008


async def test_register_user_name_limits_accepted(relay):
    for name in ("a" * 64, "0", "a.b_c-9"):
        key = nacl.signing.SigningKey.generate()
        async with connect(relay.url) as c:
            assert await c.register(name, key) == [READY, name, 1, 0]


async def test_registration_token(relay):
    async with custom_relay(relay.settings, registration_token="s3cret") as server:
        for token in (None, "wrong", ""):
            key = nacl.signing.SigningKey.generate()
            async with connect(server.url) as c:
                assert_error(await c.register("alice", key, token=token), 403, REGISTER)
                assert await c.closed() == 1008
            assert server.store.get_user("alice") is None
        key = nacl.signing.SigningKey.generate()
        async with connect(server.url) as c:
            assert await c.register("alice", key, token="s3cret") == [READY, "alice", 1, 0]
        # AUTH needs no token.
        async with connect(server.url) as c:
            assert (await c.auth("alice", 1, key))[0] == READY


# ------------------------------------------------------------------------ AUTH


async def test_auth_success(relay):
    (alice,) = await users(relay.url, "alice")
    async with connect(relay.url) as c:
        assert await c.auth("alice", 1, alice.key) == [READY, "alice", 1, 0]
        await assert_alive(c, "alice")


async def test_auth_failures_are_401_and_close(relay):
    alice, bob = await users(relay.url, "alice", "bob")
    cases: list[tuple[str, Callable[[bytes], list[Any]]]] = [
        ("unknown user", lambda ch: [AUTH, "nobody", 1, sign_challenge(alice.key, ch)]),
        ("wrong device", lambda ch: [AUTH, "alice", 2, sign_challenge(alice.key, ch)]),
        ("another user's key", lambda ch: [AUTH, "alice", 1, sign_challenge(bob.key, ch)]),
        ("garbage signature", lambda ch: [AUTH, "alice", 1, os.urandom(64)]),
        (
            "wrong server name",
            lambda ch: [AUTH, "alice", 1, sign_challenge(alice.key, ch, "other")],
        ),
        (
            "no context prefix",
            lambda ch: [AUTH, "alice", 1, alice.key.sign(b"relay" + ch).signature],
        ),
    ]
    for label, make in cases:
        async with connect(relay.url) as c:
            await c.send(make(c.hello[3]))
            frame = await c.recv()
            assert frame[0] == ERROR and frame[1] == AUTH and frame[2] == 401, (label, frame)
            assert await c.closed() == 1008, label


async def test_auth_signature_over_another_challenge_is_refused(relay):
    (alice,) = await users(relay.url, "alice")
    async with connect(relay.url) as first, connect(relay.url) as second:
        # A signature made for the first connection's challenge, replayed on the second.
        sig = sign_challenge(alice.key, first.hello[3])
        await second.send([AUTH, "alice", 1, sig])
        assert_error(await second.recv(), 401, AUTH)
        assert await second.closed() == 1008
        # ... while on its own connection it is good.
        await first.send([AUTH, "alice", 1, sig])
        assert (await first.recv())[0] == READY


async def test_auth_replayed_on_same_connection_is_not_a_second_login(relay):
    (alice,) = await users(relay.url, "alice")
    async with connect(relay.url) as c:
        assert (await c.auth("alice", 1, alice.key))[0] == READY
        await c.send([AUTH, "alice", 1, sign_challenge(alice.key, c.hello[3])])
        frame = await c.recv()
        assert frame[0] == ERROR and frame[1] == AUTH, frame


@pytest.mark.parametrize(
    "frame",
    [
        [SEND, b"\x01" * 16, "bob", {1: b"x"}],
        [SEND_GROUP, b"\x01" * 16, GROUP_ID, b"x"],
        [ACK, 1],
        [READ, "bob", [b"\x01" * 16]],
        [REQ, 1, "devices.list", {"user": "bob"}],
        [SIGNAL, "bob", "typing"],
        [99, 1],
    ],
    ids=lambda f: str(f[0]),
)
async def test_frames_before_ready_are_401_and_close(relay, frame):
    async with connect(relay.url) as c:
        await c.send(frame)
        assert_error(await c.recv(), 401, frame[0])
        assert await c.closed() == 1008


async def test_garbage_before_ready_is_401_and_close(relay):
    async with connect(relay.url) as c:
        await c.send_raw(packb("hello"))
        assert_error(await c.recv(), 401, None)
        assert await c.closed() == 1008


# -------------------------------------------------------------- SEND/SENT/MSG


async def test_send_sent_msg_fields_and_seq(relay):
    alice, bob = await users(relay.url, "alice", "bob")
    async with alice.online(relay.url) as a, bob.online(relay.url) as b:
        sent: dict[bytes, int] = {}
        ids = []
        for i in range(3):
            msg_id = await a.send_msg("bob", {1: b"payload %d" % i})
            ids.append(msg_id)
            frame = await a.recv()
            assert frame[0] == SENT and frame[1] == msg_id and len(frame) == 3, frame
            assert type(frame[2]) is int and abs(frame[2] - time.time() * 1000) < 60_000
            sent[msg_id] = frame[2]
        msgs = await recv_n(b, 3)
        for i, msg in enumerate(msgs):
            assert msg == [MSG, i + 1, ids[i], "alice", 1, None, sent[ids[i]], b"payload %d" % i], (
                msg
            )


async def test_payload_per_device_and_device_set_mismatch(relay):
    alice, bob = await users(relay.url, "alice", "bob")
    bob2 = nacl.signing.SigningKey.generate()
    add_device(relay, "bob", 2, bob2)
    async with alice.online(relay.url) as a:
        res = await a.request(5, "devices.list", {"user": "bob"})
        assert res == [
            RES,
            5,
            True,
            {
                "devices": [
                    {"device": 1, "identity_key": bytes(bob.key.verify_key)},
                    {"device": 2, "identity_key": bytes(bob2.verify_key)},
                ]
            },
        ]
        # Device set != registered set: 409 naming the difference, nothing stored.
        bad = await a.send_msg("bob", {1: b"one", 7: b"seven"})
        err = await a.recv()
        assert_error(err, 409, bad)
        assert "missing [2]" in err[3] and "extra [7]" in err[3], err
        bad = await a.send_msg("bob", {2: b"two"})
        err = await a.recv()
        assert_error(err, 409, bad)
        assert "missing [1]" in err[3], err
        assert relay.store.pending("bob", 1) == 0 and relay.store.pending("bob", 2) == 0
        # Exactly the set: each device gets its own ciphertext.
        good = await a.send_msg("bob", {1: b"for one", 2: b"for two"})
        assert (await a.recv())[:2] == [SENT, good]
    async with bob.online(relay.url, 1) as b1:
        assert b1.ready == [READY, "bob", 1, 1]
        msg = await b1.recv()
        assert msg[2] == good and msg[7] == b"for one"
    async with connect(relay.url) as b2:
        assert await b2.auth("bob", 2, bob2) == [READY, "bob", 2, 1]
        msg = await b2.recv()
        assert msg[:5] == [MSG, 1, good, "alice", 1] and msg[7] == b"for two"
        # Acks are per device: device 2's receipt names device 2.
        await b2.send([ACK, 1])
    async with alice.online(relay.url) as a:
        receipt = await a.recv_type(RECEIPT)
        assert receipt[2:6] == [good, "bob", 2, 1]


async def test_device_set_mismatch_single_device(relay):
    alice, bob = await users(relay.url, "alice", "bob")
    async with alice.online(relay.url) as a:
        before = inbox_entries(relay)
        msg_id = await a.send_msg("bob", {1: b"x", 7: b"y"})
        err = await a.recv()
        assert_error(err, 409, msg_id)
        assert "extra [7]" in err[3] and "missing []" in err[3], err
        await assert_alive(a, "alice")
        assert inbox_entries(relay) == before
        assert relay.store.pending("bob", 1) == 0


async def test_send_to_unknown_user_is_404_with_msg_id(relay):
    (alice,) = await users(relay.url, "alice")
    async with alice.online(relay.url) as a:
        msg_id = await a.send_msg("nobody", {1: b"x"})
        assert_error(await a.recv(), 404, msg_id)
        await assert_alive(a, "alice")


async def test_idempotent_retry(relay):
    alice, bob, carol = await users(relay.url, "alice", "bob", "carol")
    msg_id = os.urandom(16)
    async with alice.online(relay.url) as a:
        await a.send_msg("bob", {1: b"first"}, msg_id)
        first = await a.recv()
        assert first[:2] == [SENT, msg_id]
        entries = inbox_entries(relay)
        stats = relay.store.stats()
        await trio.sleep(0.01)  # so that a new ts would differ
        await a.send_msg("bob", {1: b"retry with other bytes"}, msg_id)
        assert await a.recv() == first
    # After a reconnect too.
    async with alice.online(relay.url) as a:
        await a.send_msg("bob", {1: b"first"}, msg_id)
        assert await a.recv() == first
    assert relay.store.pending("bob", 1) == 1
    assert inbox_entries(relay) == entries
    assert relay.store.stats() == stats
    # The same msg_id from another user is another message.
    async with carol.online(relay.url) as c:
        await c.send_msg("bob", {1: b"carol's"}, msg_id)
        assert (await c.recv())[:2] == [SENT, msg_id]
    assert relay.store.pending("bob", 1) == 2
    async with bob.online(relay.url) as b:
        assert b.ready[3] == 2
        m1, m2 = await recv_n(b, 2)
        assert (m1[3], m1[7]) == ("alice", b"first")
        assert (m2[3], m2[7]) == ("carol", b"carol's")
        await b.expect_nothing(0.2)


async def test_empty_payload_allowed(relay):
    alice, bob = await users(relay.url, "alice", "bob")
    async with alice.online(relay.url) as a, bob.online(relay.url) as b:
        msg_id = await a.send_msg("bob", {1: b""})
        assert (await a.recv())[:2] == [SENT, msg_id]
        msg = await b.recv()
        assert msg[0] == MSG and msg[2] == msg_id and msg[7] == b""


async def test_largest_message_accepted_and_delivered(relay):
    """A SEND filling the 1 MiB message limit exactly is served; the MSG that
    carries it back is a little larger (clients accept limit + 4 KiB)."""
    alice, bob = await users(relay.url, "alice", "bob")
    limit = relay.settings.max_message_bytes
    msg_id = os.urandom(16)
    payload_len = limit
    while len(packb([SEND, msg_id, "bob", {1: b"\0" * payload_len}])) > limit:
        payload_len -= 1
    frame = packb([SEND, msg_id, "bob", {1: os.urandom(payload_len)}])
    assert len(frame) == limit
    async with alice.online(relay.url) as a, bob.online(relay.url) as b:
        await a.send_raw(frame)
        assert (await a.recv())[:2] == [SENT, msg_id]
        msg = await b.recv()
        assert msg[2] == msg_id and len(msg[7]) == payload_len


async def test_pipelined_sends_keep_their_order(relay):
    """Many SENDs in flight at once (not waiting for SENT), to users on
    different shards: each recipient gets them in send order."""
    alice, bob, carol = await users(relay.url, "alice", "bob", "carol")
    async with alice.online(relay.url) as a:
        ids = {"bob": [], "carol": []}
        frames_ = []
        for i in range(60):
            to = "bob" if i % 3 else "carol"
            msg_id = os.urandom(16)
            ids[to].append(msg_id)
            frames_.append([SEND, msg_id, to, {1: b"%d" % i}])
        for chunk in (frames_[:20], frames_[20:40], frames_[40:]):
            await a.send(*chunk)
        sent = await recv_n(a, 60)
        assert {f[1] for f in sent} == set(ids["bob"] + ids["carol"])
    for user in (bob, carol):
        async with user.online(relay.url) as c:
            n = len(ids[user.name])
            assert c.ready[3] == n
            msgs = await recv_n(c, n)
            assert [m[2] for m in msgs] == ids[user.name]
            assert [m[1] for m in msgs] == list(range(1, n + 1))


# ----------------------------------------------------------- ACK and RECEIPT


async def test_ack_is_cumulative_deletes_and_sends_receipts(relay):
    alice, bob = await users(relay.url, "alice", "bob")
    async with alice.online(relay.url) as a, bob.online(relay.url) as b:
        ids = []
        for i in range(3):
            ids.append(await a.send_msg("bob", {1: b"m%d" % i}))
            assert (await a.recv())[0] == SENT
        msgs = await recv_n(b, 3)
        assert [m[1] for m in msgs] == [1, 2, 3]
        assert relay.store.pending("bob", 1) == 3
        await b.send([ACK, 2])  # covers seq 1 and 2
        await eventually(lambda: relay.store.pending("bob", 1) == 1)
        assert [e.seq for e in relay.store.read_inbox("bob", 1, 0, 10)] == [3]
        receipts = await recv_n(a, 2)
        for r in receipts:
            assert r[0] == RECEIPT and len(r) == 7, r
            assert r[3:6] == ["bob", 1, 1], r
            assert type(r[6]) is int
        assert {r[2] for r in receipts} == set(ids[:2])
        # Receipts are entries of alice's own inbox, with alice's own seqs.
        assert sorted(r[1] for r in receipts) == [1, 2] and receipts[0][1] < receipts[1][1]
        assert relay.store.pending("alice", 1) == 2
        await b.send([ACK, 3])
        (third,) = await recv_n(a, 1)
        assert third[0] == RECEIPT and third[1] == 3 and third[2] == ids[2]
        await eventually(lambda: relay.store.pending("bob", 1) == 0)
        # Acking receipts deletes them like any entry.
        await a.send([ACK, 3])
        await eventually(lambda: relay.store.pending("alice", 1) == 0)
        assert relay.store.read_inbox("alice", 1, 0, 10) == []
        # An ACK repeated or below the acked seq changes nothing and is not an error.
        await b.send([ACK, 1])
        await a.expect_nothing(0.2)
        await assert_alive(b, "bob")


async def test_receipt_reaches_offline_sender_later(relay):
    alice, bob = await users(relay.url, "alice", "bob")
    async with alice.online(relay.url) as a:
        msg_id = await a.send_msg("bob", {1: b"hi"})
        await a.recv()
    async with bob.online(relay.url) as b:
        msg = await b.recv()
        await b.send([ACK, msg[1]])
        await eventually(lambda: relay.store.pending("alice", 1) == 1)
    async with alice.online(relay.url) as a:
        assert a.ready == [READY, "alice", 1, 1]
        receipt = await a.recv()
        assert receipt[:6] == [RECEIPT, 1, msg_id, "bob", 1, 1]


async def test_read_sends_receipt_status_2(relay):
    alice, bob = await users(relay.url, "alice", "bob")
    async with alice.online(relay.url) as a, bob.online(relay.url) as b:
        id1 = await a.send_msg("bob", {1: b"one"})
        id2 = await a.send_msg("bob", {1: b"two"})
        await recv_n(a, 2)
        msgs = await recv_n(b, 2)
        await b.send([ACK, msgs[-1][1]])
        delivered = await recv_n(a, 2)
        assert all(r[0] == RECEIPT and r[5] == 1 for r in delivered)
        await b.send([READ, "alice", [id1, id2]])
        read = await recv_n(a, 2)
        assert {r[2] for r in read} == {id1, id2}
        for r in read:
            assert r[0] == RECEIPT and r[3:6] == ["bob", 1, 2], r
        assert [r[1] for r in delivered + read] == [1, 2, 3, 4]


async def test_read_for_unknown_sender_is_404(relay):
    (alice,) = await users(relay.url, "alice")
    async with alice.online(relay.url) as a:
        await a.send([READ, "nobody", [os.urandom(16)]])
        assert_error(await a.recv(), 404, READ)
        await assert_alive(a, "alice")


# ---------------------------------------------------- offline and redelivery


async def test_offline_delivery_in_order(relay):
    alice, bob = await users(relay.url, "alice", "bob")
    ids = []
    async with alice.online(relay.url) as a:
        for i in range(5):
            ids.append(await a.send_msg("bob", {1: b"%d" % i}))
        sent = await recv_n(a, 5)
        assert [s[1] for s in sent] == ids
    assert relay.store.pending("bob", 1) == 5
    async with bob.online(relay.url) as b:
        assert b.ready == [READY, "bob", 1, 5]
        msgs = await recv_n(b, 5)
        assert [m[1] for m in msgs] == [1, 2, 3, 4, 5]
        assert [m[2] for m in msgs] == ids
        assert [m[7] for m in msgs] == [b"%d" % i for i in range(5)]


async def test_unacked_entries_redelivered_with_same_seq(relay):
    alice, bob = await users(relay.url, "alice", "bob")
    async with alice.online(relay.url) as a:
        for i in range(3):
            await a.send_msg("bob", {1: b"%d" % i})
        await recv_n(a, 3)
    async with bob.online(relay.url) as b:
        first = await recv_n(b, 3)
        await b.send([ACK, 1])
        await eventually(lambda: relay.store.pending("bob", 1) == 2)
    async with bob.online(relay.url) as b:
        assert b.ready == [READY, "bob", 1, 2]
        again = await recv_n(b, 2)
        assert again == first[1:]
        await b.expect_nothing(0.2)


async def test_flow_window(relay):
    async with custom_relay(relay.settings, window=4) as server:
        alice, bob = await users(server.url, "alice", "bob")
        async with alice.online(server.url) as a:
            for i in range(10):
                await a.send_msg("bob", {1: b"%d" % i})
            await recv_n(a, 10)
        async with bob.online(server.url) as b:
            assert b.ready[3] == 10
            got = await recv_n(b, 4)
            assert [m[1] for m in got] == [1, 2, 3, 4]
            await b.expect_nothing(0.3)
            await b.send([ACK, 2])
            got = await recv_n(b, 2)
            assert [m[1] for m in got] == [5, 6]
            await b.expect_nothing(0.3)
            await b.send([ACK, 6])
            got = await recv_n(b, 4)
            assert [m[1] for m in got] == [7, 8, 9, 10]
            await b.send([ACK, 10])
            await eventually(lambda: server.store.pending("bob", 1) == 0)
        # Entries arriving while the window is full wait too.
        async with bob.online(server.url) as b, alice.online(server.url) as a:
            for i in range(6):
                await a.send_msg("bob", {1: b"live %d" % i})
            got = await recv_n(b, 4)
            assert [m[7] for m in got] == [b"live %d" % i for i in range(4)]
            await b.expect_nothing(0.3)
            await b.send([ACK, got[-1][1]])
            got = await recv_n(b, 2)
            assert [m[7] for m in got] == [b"live 4", b"live 5"]


async def test_same_device_twice(relay):
    alice, bob = await users(relay.url, "alice", "bob")
    async with alice.online(relay.url) as a:
        for i in range(3):
            await a.send_msg("bob", {1: b"%d" % i})
        await recv_n(a, 3)
    async with bob.online(relay.url) as old:
        first = await recv_n(old, 3)
        await old.send([ACK, 1])
        await eventually(lambda: relay.store.pending("bob", 1) == 2)
        async with bob.online(relay.url) as new:
            assert await old.closed() == 4409
            assert new.ready == [READY, "bob", 1, 2]
            assert await recv_n(new, 2) == first[1:]
            # The new connection is the live one.
            async with alice.online(relay.url) as a:
                msg_id = await a.send_msg("bob", {1: b"live"})
                msg = await new.recv()
                assert msg[1] == 4 and msg[2] == msg_id


# ---------------------------------------------------------------- SIGNAL


async def test_signal_to_online_user(relay):
    alice, bob, carol = await users(relay.url, "alice", "bob", "carol")
    async with alice.online(relay.url) as a, bob.online(relay.url) as b:
        await a.send([SIGNAL, "bob", "typing"])
        assert await b.recv() == [SIGNALED, "alice", "bob", "typing"]
        await b.send([SIGNAL, "alice", "paused"])
        assert await a.recv() == [SIGNALED, "bob", "alice", "paused"]
        # Offline and unknown users: dropped silently, nothing stored.
        await a.send([SIGNAL, "carol", "typing"], [SIGNAL, "nobody", "typing"])
        await a.expect_nothing(0.3)
        await assert_alive(a, "alice")
        # A group the sender is not in: 403.
        await a.send([SIGNAL, GROUP_ID, "typing"])
        assert_error(await a.recv(), 403, SIGNAL)
        await assert_alive(a, "alice")
        await b.expect_nothing(0.2)
    assert relay.store.pending("carol", 1) == 0
    async with carol.online(relay.url) as c:
        assert c.ready[3] == 0
        await c.expect_nothing(0.2)


# ---------------------------------------------------------------- REQ/RES


async def test_devices_list_and_request_errors(relay):
    alice, bob = await users(relay.url, "alice", "bob")
    async with alice.online(relay.url) as a:
        res = await a.request(7, "devices.list", {"user": "bob"})
        assert res == [
            RES,
            7,
            True,
            {"devices": [{"device": 1, "identity_key": bytes(bob.key.verify_key)}]},
        ]
        res = await a.request(8, "devices.list", {"user": "nobody"})
        assert (
            res[:3] == [RES, 8, False]
            and res[3]["code"] == 404
            and isinstance(res[3]["reason"], str)
        )
        res = await a.request(9, "no.such.op", {})
        assert res[:3] == [RES, 9, False] and res[3]["code"] == 400
        res = await a.request(10, "devices.list", {})
        assert res[:3] == [RES, 10, False] and res[3]["code"] == 400
        res = await a.request(11, "devices.list", {"user": "Not A User"})
        assert res[:3] == [RES, 11, False] and res[3]["code"] == 400
        # Malformed REQ without a readable req_id: ERROR 400.
        await a.send([REQ, "eleven", "devices.list", {"user": "bob"}])
        assert_error(await a.recv(), 400, REQ)
        await a.send([REQ])
        assert_error(await a.recv(), 400, REQ)
        await assert_alive(a, "alice")


@pytest.mark.parametrize(
    "frame",
    [
        [REQ, 12, "devices.list", ["user", "bob"]],
        [REQ, 12, 5, {"user": "bob"}],
        [REQ, 12, "devices.list"],
        [REQ, 12, "devices.list", {"user": "bob"}, "extra"],
    ],
    ids=["args-not-map", "op-not-str", "short", "long"],
)
async def test_malformed_req_with_readable_req_id_is_res_400(relay, frame):
    (alice,) = await users(relay.url, "alice")
    async with alice.online(relay.url) as a:
        await a.send(frame)
        res = await a.recv()
        assert res[:3] == [RES, 12, False] and res[3]["code"] == 400, res
        await assert_alive(a, "alice")


# ------------------------------------------------------------ SEND_GROUP


async def test_send_group_to_nonexistent_group(relay):
    (alice,) = await users(relay.url, "alice")
    async with alice.online(relay.url) as a:
        msg_id = os.urandom(16)
        await a.send([SEND_GROUP, msg_id, GROUP_ID, b"sender keys ciphertext"])
        err = await a.recv()
        assert_error(err, 404, msg_id)
        await assert_alive(a, "alice")


# -------------------------------------------------------------- batching


async def test_batch_each_frame_answered(relay):
    alice, bob = await users(relay.url, "alice", "bob")
    async with alice.online(relay.url) as a, bob.online(relay.url) as b:
        id1, id2 = os.urandom(16), os.urandom(16)
        await a.send(
            [SEND, id1, "bob", {1: b"one"}],
            [REQ, 1, "devices.list", {"user": "bob"}],
            [SIGNAL, "bob", "typing"],
            [SEND, id2, "bob", {1: b"two"}],
            [ACK, 0],
        )
        answers = await recv_n(a, 3)
        assert sorted((f[0], f[1]) for f in answers) == sorted([(SENT, id1), (SENT, id2), (RES, 1)])
        got = await recv_n(b, 3)
        assert [f for f in got if f[0] == SIGNALED] == [[SIGNALED, "alice", "bob", "typing"]]
        assert [f[2] for f in got if f[0] == MSG] == [id1, id2]
        await a.expect_nothing(0.2)


async def test_batch_bad_frames_in_the_middle(relay):
    alice, bob = await users(relay.url, "alice", "bob")
    async with alice.online(relay.url) as a:
        good1, bad, good2 = os.urandom(16), os.urandom(16), os.urandom(16)
        await a.send(
            [SEND, good1, "bob", {1: b"one"}],
            [SEND, bad, "Not A User", {1: b"x"}],
            [99, "unknown type"],
            [SEND, good2, "bob", {1: b"two"}],
            [REQ, 3, "devices.list", {"user": "bob"}],
        )
        answers = await recv_n(a, 5)
        by_kind = {(f[0], f[1]): f for f in answers}
        assert set(by_kind) == {
            (SENT, good1),
            (ERROR, bad),
            (ERROR, 99),
            (SENT, good2),
            (RES, 3),
        }, answers
        assert by_kind[(ERROR, bad)][2] == 400 and by_kind[(ERROR, 99)][2] == 400
        await a.expect_nothing(0.2)
    async with bob.online(relay.url) as b:
        assert b.ready[3] == 2
        assert [m[2] for m in await recv_n(b, 2)] == [good1, good2]


async def test_batch_at_frame_limit_is_served(relay):
    (alice,) = await users(relay.url, "alice")
    limit = relay.settings.max_frames_per_message
    async with alice.online(relay.url) as a:
        await a.send(*[[REQ, i, "devices.list", {"user": "alice"}] for i in range(limit)])
        answers = await recv_n(a, limit, timeout=20)
        assert [f[1] for f in answers] == list(range(limit))
        assert all(f[0] == RES and f[2] is True for f in answers)


async def test_too_many_frames_is_413_and_message_dropped(relay):
    alice, bob = await users(relay.url, "alice", "bob")
    limit = relay.settings.max_frames_per_message
    async with alice.online(relay.url) as a:
        frames_ = [[SEND, os.urandom(16), "bob", {1: b"x"}] for _ in range(limit + 1)]
        await a.send(*frames_)
        err = await a.recv()
        assert err[0] == ERROR and err[2] == 413, err
        await a.expect_nothing(0.5)
        await assert_alive(a, "alice")
    assert relay.store.pending("bob", 1) == 0


# ------------------------------------------------------ WebSocket level


async def test_text_message_closes_1003(relay):
    (alice,) = await users(relay.url, "alice")
    async with alice.online(relay.url) as a:
        await a.send_raw("[10]")
        assert await a.closed() == 1003


async def test_message_over_limit_closes_1009(relay):
    (alice,) = await users(relay.url, "alice")
    async with alice.online(relay.url) as a:
        # The relay may close before it has read the whole message.
        with contextlib.suppress(ConnectionClosed, trio.BrokenResourceError):
            await a.send_raw(b"\x00" * (relay.settings.max_message_bytes + 1))
        assert await a.closed() == 1009


async def test_malformed_frames_budget_closes_1008(relay):
    (alice,) = await users(relay.url, "alice")
    async with alice.online(relay.url) as a:
        for i in range(16):
            await a.send_raw(packb(i))  # a frame that is not an array
            assert_error(await a.recv(), 400)
        await assert_alive(a, "alice")
        await a.send_raw(packb("seventeenth"))
        assert_error(await a.recv(), 400)
        assert await a.closed() == 1008


async def test_malformed_frames_budget_in_one_batch(relay):
    (alice,) = await users(relay.url, "alice")
    async with alice.online(relay.url) as a:
        await a.send(*range(17))
        errors = await recv_n(a, 17)
        assert all(f[0] == ERROR and f[2] == 400 for f in errors)
        assert await a.closed() == 1008


async def test_ping_pong(relay):
    (alice,) = await users(relay.url, "alice")
    async with alice.online(relay.url) as a:
        with trio.fail_after(5):
            await a.ws.ping(b"are you there")
            await a.ws.ping()
        await assert_alive(a, "alice")


async def test_idle_timeout_and_ping_keepalive(relay):
    async with custom_relay(relay.settings, idle_timeout_s=1.0) as server:
        (alice,) = await users(server.url, "alice")
        async with alice.online(server.url) as a:
            for _ in range(6):  # 1.5 s in all, longer than the idle timeout
                await trio.sleep(0.25)
                with trio.fail_after(5):
                    await a.ws.ping()
            await assert_alive(a, "alice")
            code = await a.closed(timeout=5)
            assert code == 1001


# ------------------------------------------------------------- retention


async def test_retention_expiry(relay):
    async with custom_relay(relay.settings, retention_s=1.0) as server:
        alice, bob = await users(server.url, "alice", "bob")
        async with alice.online(server.url) as a:
            await a.send_msg("bob", {1: b"old 1"})
            await a.send_msg("bob", {1: b"old 2"})
            await recv_n(a, 2)
        assert server.store.pending("bob", 1) == 2
        assert await server.sweep_expired() == 0, "nothing is old yet"
        assert server.store.pending("bob", 1) == 2
        await trio.sleep(1.1)
        assert await server.sweep_expired() == 2
        assert server.store.pending("bob", 1) == 0
        assert server.store.read_inbox("bob", 1, 0, 10) == []
        async with alice.online(server.url) as a:
            fresh = await a.send_msg("bob", {1: b"fresh"})
            await a.recv()
        async with bob.online(server.url) as b:
            assert b.ready == [READY, "bob", 1, 1]
            msg = await b.recv()
            # seq only increases: a gap where the expired entries were.
            assert msg[1] == 3 and msg[2] == fresh and msg[7] == b"fresh"
            await b.expect_nothing(0.2)


# -------------------------------------------------------------- shutdown


async def test_shutdown_closes_connections_with_1001(relay):
    async with custom_relay(relay.settings) as server:
        alice, bob = await users(server.url, "alice", "bob")
        async with alice.online(server.url) as a, connect(server.url) as anonymous:
            server.shutdown()
            assert await a.closed() == 1001
            assert await anonymous.closed() == 1001


# ------------------------------------------------------- groups: frame shapes


async def test_event_and_group_msg_frames(relay):
    alice, bob = await users(relay.url, "alice", "bob")
    async with alice.online(relay.url) as a, bob.online(relay.url) as b:
        res = await a.request(1, "group.create", {"name": "team", "members": ["bob"]})
        assert res[2] is True, res
        group = res[3]["group"]
        for client in (a, b):
            event = await client.recv_type(EVENT)
            assert len(event) == 5 and type(event[1]) is int and event[2] == "group.changed", event
            assert (
                event[3]["group"] == group
                and event[3]["actor"] == "alice"
                and type(event[4]) is int
            )
            await client.send([ACK, event[1]])
        msg_id = os.urandom(16)
        await a.send([SEND_GROUP, msg_id, group, b"sender keys ciphertext"])
        sent = await a.recv_type(SENT)
        assert sent[1] == msg_id
        msg = await b.recv_type(MSG)
        assert msg[2:] == [msg_id, "alice", 1, group, sent[2], b"sender keys ciphertext"], msg


async def test_retention_expiry_of_group_messages(relay, caplog):
    async with custom_relay(relay.settings, retention_s=0.2) as server:
        alice, bob = await users(server.url, "alice", "bob")
        async with alice.online(server.url) as a:
            res = await a.request(1, "group.create", {"name": "team", "members": ["bob"]})
            group = res[3]["group"]
            await a.send([SEND_GROUP, os.urandom(16), group, b"old"])
            await a.recv_type(SENT)
        # bob: the group.changed EVENT and the group MSG.
        assert server.store.pending("bob", 1) == 2
        await trio.sleep(0.3)
        caplog.clear()
        assert await server.sweep_expired() >= 2
        assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text
        assert server.store.pending("bob", 1) == 0
        assert server.store.pending("alice", 1) == 0
        for shard in server.store.stats().values():
            assert shard["inbox"] == 0 and shard.get("bodies", 0) == 0, shard
        async with alice.online(server.url) as a:
            fresh = os.urandom(16)
            await a.send([SEND_GROUP, fresh, group, b"fresh"])
            await a.recv_type(SENT)
        async with bob.online(server.url) as b:
            assert b.ready[3] == 1
            msg = await b.recv()
            assert msg[0] == MSG and msg[2] == fresh and msg[5] == group and msg[7] == b"fresh"
