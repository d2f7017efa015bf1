"""Groups over real loopback sockets and LMDB: every request, permission and event."""

from __future__ import annotations

import os

import trio

from relay.protocol.frames import is_group
from relay.server.clock import now_ms
from relay.store.base import RegisterUser, body_key
from tests.wire import User, WireClient

OK, RES, EVENT, MSG, RECEIPT, SENT, ERROR, SIGNALED = True, 21, 22, 13, 15, 12, 4, 31


async def register_all(url: str, *names: str) -> list[User]:
    users = [User(n) for n in names]
    for u in users:
        await u.register(url)
    return users


async def ok(client: WireClient, req_id: int, op: str, args: dict) -> dict:
    res = await client.request(req_id, op, args)
    assert res[1] == req_id and res[2] is True, res
    return res[3]


async def fails(client: WireClient, req_id: int, op: str, args: dict) -> int:
    res = await client.request(req_id, op, args)
    assert res[1] == req_id and res[2] is False, res
    return res[3]["code"]


async def next_event(client: WireClient) -> dict:
    frame = await client.recv_type(EVENT, keep=True)
    assert frame[2] == "group.changed"
    await client.send([14, frame[1]])
    return frame[3]


async def test_create_info_and_event(relay):
    ann, ben, cat = await register_all(relay.url, "ann", "ben", "cat")
    async with ann.online(relay.url) as a, ben.online(relay.url) as b:
        info = await ok(a, 1, "group.create", {"name": "team", "members": ["ben", "cat", "ann", "ben"]})
        assert is_group(info["group"])
        assert info["members"] == ["ann", "ben", "cat"] and info["admins"] == ["ann"]
        assert info["version"] == 1 and info["name"] == "team"
        for client in (a, b):
            body = await next_event(client)
            assert body == {**info, "actor": "ann"}
        assert await ok(b, 2, "group.info", {"group": info["group"]}) == info
    async with cat.online(relay.url) as c:
        assert c.ready[3] == 1, "the event waited in cat's inbox"
        assert (await next_event(c))["group"] == info["group"]


async def test_create_with_unknown_member_is_404_and_bad_args_400(relay):
    (ann,) = await register_all(relay.url, "ann")
    async with ann.online(relay.url) as a:
        assert await fails(a, 1, "group.create", {"name": "x", "members": ["ghost"]}) == 404
        assert await fails(a, 2, "group.create", {"name": "", "members": []}) == 400
        assert await fails(a, 3, "group.create", {"name": "x", "members": "ben"}) == 400
        assert await fails(a, 4, "group.info", {"group": "not-a-group"}) == 400
        assert await fails(a, 5, "group.info", {"group": "g." + "A" * 22}) == 404


async def test_membership_changes_and_permissions(relay):
    ann, ben, cat, dan = await register_all(relay.url, "ann", "ben", "cat", "dan")
    async with ann.online(relay.url) as a, ben.online(relay.url) as b, dan.online(relay.url) as d:
        info = await ok(a, 1, "group.create", {"name": "team", "members": ["ben"]})
        g = info["group"]
        await next_event(a)
        await next_event(b)
        # Non-admins cannot change membership, names or roles; non-members cannot even look.
        for req_id, op, args in (
            (2, "group.add", {"members": ["cat"]}),
            (3, "group.remove", {"members": ["ann"]}),
            (4, "group.rename", {"name": "x"}),
            (5, "group.promote", {"members": ["ben"]}),
            (6, "group.demote", {"members": ["ann"]}),
        ):
            assert await fails(b, req_id, op, {"group": g, **args}) == 403
        for req_id, op in ((7, "group.info"), (8, "group.leave"), (9, "group.add")):
            assert await fails(d, req_id, op, {"group": g, "members": ["dan"]}) == 403
        # Admin adds: version bumps, everyone including the newcomer hears of it.
        info = await ok(a, 10, "group.add", {"group": g, "members": ["cat", "dan"]})
        assert info["members"] == ["ann", "ben", "cat", "dan"] and info["version"] == 2
        for client in (a, b, d):
            assert (await next_event(client))["version"] == 2
        # A change that changes nothing keeps the version and sends no event.
        again = await ok(a, 11, "group.add", {"group": g, "members": ["cat"]})
        assert again["version"] == 2
        same_name = await ok(a, 12, "group.rename", {"group": g, "name": "team"})
        assert same_name["version"] == 2
        await b.expect_nothing(0.2)
        # Rename, promote, demote.
        assert (await ok(a, 13, "group.rename", {"group": g, "name": "crew"}))["name"] == "crew"
        info = await ok(a, 14, "group.promote", {"group": g, "members": ["ben"]})
        assert info["admins"] == ["ann", "ben"] and info["version"] == 4
        info = await ok(b, 15, "group.demote", {"group": g, "members": ["ann"]})
        assert info["admins"] == ["ben"] and info["version"] == 5
        for _ in range(3):
            await next_event(d)
        # Removal: the removed member gets the event that removed it, then nothing.
        info = await ok(b, 16, "group.remove", {"group": g, "members": ["dan"]})
        assert "dan" not in info["members"]
        removed = await next_event(d)
        assert removed["version"] == 6 and "dan" not in removed["members"] and removed["actor"] == "ben"
        await ok(b, 17, "group.rename", {"group": g, "name": "after"})
        await d.expect_nothing(0.3)
        assert await fails(d, 18, "group.info", {"group": g}) == 403


async def test_last_admin_leaving_promotes_someone(relay):
    ann, ben, cat = await register_all(relay.url, "ann", "ben", "cat")
    async with ann.online(relay.url) as a, ben.online(relay.url) as b:
        g = (await ok(a, 1, "group.create", {"name": "t", "members": ["ben", "cat"]}))["group"]
        await next_event(b)
        info = await ok(a, 2, "group.leave", {"group": g})
        assert info["members"] == ["ben", "cat"] and info["admins"] == ["ben"]
        await next_event(a)  # creation
        left = await next_event(a)
        assert left["actor"] == "ann" and "ann" not in left["members"], "the leaver gets its own leaving"
        assert (await next_event(b))["admins"] == ["ben"]
        assert (await ok(b, 3, "group.add", {"group": g, "members": ["ann"]}))["version"] == 3


async def test_send_group_delivery_receipts_and_store_once(relay):
    ann, ben, cat = await register_all(relay.url, "ann", "ben", "cat")
    async with ann.online(relay.url) as a, ben.online(relay.url) as b:
        g = (await ok(a, 1, "group.create", {"name": "t", "members": ["ben", "cat"]}))["group"]
        await next_event(a)
        await next_event(b)
        msg_id = os.urandom(16)
        await a.send([11, msg_id, g, b"to all"])
        sent = await a.recv_type(SENT)
        assert sent[1] == msg_id
        key = body_key(g, "ann", 1, msg_id)
        assert relay.store.body_refs(key) == (2, True), "one body, one reference per other member device"
        msg = await b.recv_type(MSG)
        assert msg[2:] == [msg_id, "ann", 1, g, sent[2], b"to all"]
        # Idempotent retry: the original SENT, nothing stored again.
        await a.send([11, msg_id, g, b"to all"])
        assert (await a.recv_type(SENT))[2] == sent[2]
        assert relay.store.body_refs(key) == (2, True)
        # Delivered receipt per member device; the body stays until the last ack.
        await b.send([14, msg[1]])
        receipt = await a.recv_type(RECEIPT)
        assert receipt[2:6] == [msg_id, "ben", 1, 1]
        await a.send([14, receipt[1]])
        await b.send([16, "ann", [msg_id]])
        read = await a.recv_type(RECEIPT)
        assert read[2:6] == [msg_id, "ben", 1, 2]
        await trio.sleep(0.1)
        assert relay.store.body_refs(key) == (1, True)
    async with cat.online(relay.url) as c:
        await next_event(c)
        msg = await c.recv_type(MSG)
        await c.send([14, msg[1]])
        with trio.fail_after(5):
            while relay.store.body_refs(key) is not None:
                await trio.sleep(0.02)


async def test_send_group_errors(relay):
    ann, ben, dan = await register_all(relay.url, "ann", "ben", "dan")
    async with ann.online(relay.url) as a, dan.online(relay.url) as d:
        g = (await ok(a, 1, "group.create", {"name": "t", "members": ["ben"]}))["group"]
        mid = os.urandom(16)
        await d.send([11, mid, g, b"x"])
        err = await d.recv_type(ERROR)
        assert err[1:3] == [mid, 403]
        mid2 = os.urandom(16)
        await a.send([11, mid2, "g." + "B" * 22, b"x"])
        err = await a.recv_type(ERROR)
        assert err[1:3] == [mid2, 404]


async def test_group_signal(relay):
    ann, ben, dan = await register_all(relay.url, "ann", "ben", "dan")
    async with ann.online(relay.url) as a, ben.online(relay.url) as b, dan.online(relay.url) as d:
        g = (await ok(a, 1, "group.create", {"name": "t", "members": ["ben"]}))["group"]
        await a.send([30, g, "typing"])
        assert (await b.recv_type(SIGNALED))[1:] == ["ann", g, "typing"]
        await d.send([30, g, "typing"])
        err = await d.recv_type(ERROR)
        assert err[1:3] == [30, 403]


async def test_1024_members_one_body_then_nothing_left(tmp_path, settings):
    """Acceptance: one body and 1,023 references; after every member acks, nothing is left."""
    from relay.server.app import open_relay

    settings.shards = 4
    async with open_relay(settings) as relay:
        owner = User("owner")
        await owner.register(relay.url)
        names = [f"m{i:04d}" for i in range(1023)]
        # Members are registered straight in the store (their keys are not needed to ack:
        # they authenticate below with keys registered here).
        keys = {}
        for name in names:
            user = User(name)
            keys[name] = user
            shard = relay.store.shard_of(name)
            (result,) = relay.store.apply_batch(shard, [RegisterUser(name, bytes(user.key.verify_key), now_ms())])
            assert result is True
        async with owner.online(relay.url) as o:
            g = (await ok(o, 1, "group.create", {"name": "big", "members": names}))["group"]
            msg_id = os.urandom(16)
            await o.send([11, msg_id, g, b"hello everyone"])
            assert (await o.recv_type(SENT))[1] == msg_id
        key = body_key(g, "owner", 1, msg_id)
        stats = relay.store.stats()
        assert sum(s["bodies"] for s in stats.values()) == 1
        assert relay.store.body_refs(key) == (1023, True)
        # Every member inbox: the creation event and one reference (not a copy).
        assert sum(s["inbox"] for s in stats.values()) == 1023 * 2 + 1

        async def member(name: str, limiter: trio.CapacityLimiter) -> None:
            async with limiter, keys[name].online(relay.url) as c:
                assert c.ready[3] == 2
                await c.recv_type(EVENT)
                msg = await c.recv_type(MSG)
                assert msg[2] == msg_id and msg[7] == b"hello everyone"
                await c.send([14, msg[1]])
                with trio.fail_after(10):
                    while relay.store.pending(name, 1):
                        await trio.sleep(0.01)

        limiter = trio.CapacityLimiter(64)
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(member, name, limiter)
        with trio.fail_after(10):
            while relay.store.body_refs(key) is not None:
                await trio.sleep(0.02)
        stats = relay.store.stats()
        assert sum(s["bodies"] for s in stats.values()) == 0
        assert sum(s["fanout"] for s in stats.values()) == 0
        members_inbox = sum(relay.store.pending(n, 1) for n in names)
        assert members_inbox == 0


async def test_pipelined_send_groups_keep_send_order(settings):
    """Many SEND_GROUPs in flight at once reach every member in send order
    (regression: each used to fan out from its own task, in any order)."""
    from relay.server.app import open_relay

    settings.shards = 4
    async with open_relay(settings) as relay:
        names = [f"u{i:02d}" for i in range(12)]
        users = await register_all(relay.url, *names)
        async with users[0].online(relay.url) as owner, users[5].online(relay.url) as member:
            g = (await ok(owner, 1, "group.create", {"name": "t", "members": names[1:]}))["group"]
            for round_ in range(3):
                ids = [os.urandom(16) for _ in range(32)]
                await owner.send(*[[11, m, g, b"%02d" % i] for i, m in enumerate(ids)])
                sent = {(await owner.recv_type(SENT, keep=False))[1] for _ in ids}
                assert sent == set(ids)
                got = []
                while len(got) < len(ids):
                    frame = await member.recv()
                    if frame[0] == MSG:
                        got.append(frame[2])
                    if frame[0] in (MSG, EVENT):
                        await member.send([14, frame[1]])
                assert got == ids, f"round {round_}: out of send order"
