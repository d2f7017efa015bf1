"""Connections cut by the network (server-side abort, RST) while messages flow,
and reconnects right after acks: nothing lost, nothing twice, order kept."""

from __future__ import annotations

import trio

from relay.client import DeviceIdentity, Message, open_transport
from tests.wire import User

TOTAL = 1000


async def test_cuts_during_flow_lose_and_repeat_nothing(relay):
    """Acceptance: 1,000 messages; sender and receiver cut several times each."""
    alice = DeviceIdentity.generate(relay.url, "alice")
    bob = DeviceIdentity.generate(relay.url, "bob")
    for identity in (alice, bob):
        async with open_transport(identity, register=True):
            pass
    received: list[bytes] = []
    cuts = {"alice": 0, "bob": 0}

    async def send_all() -> None:
        async with open_transport(alice, max_in_flight=64) as client:
            ids = []
            for i in range(TOTAL):
                # Stay a little ahead of the receiver, so both sides are
                # mid-flow whenever a cut comes.
                while i - len(received) > 150:
                    await trio.sleep(0.001)
                ids.append(await client.submit("bob", b"%04d" % i))
            for msg_id in ids:
                await client.wait_sent(msg_id, timeout=60)

    async def receive_all() -> None:
        async with open_transport(bob) as client:
            async for entry in client.entries():
                if isinstance(entry, Message):
                    received.append(entry.payload)
                    if len(received) == TOTAL:
                        return

    async def cut_connections() -> None:
        # Cut while traffic flows: after some progress, alternately each side.
        for round_ in range(4):
            for user in ("alice", "bob"):
                target = (round_ * 2 + (user == "bob") + 1) * TOTAL // 10
                with trio.fail_after(30):
                    while len(received) < target:
                        await trio.sleep(0.001)
                cuts[user] += relay.abort_connections(user)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all)
            nursery.start_soon(cut_connections)
            await receive_all()
    assert cuts["alice"] >= 3 and cuts["bob"] >= 3, cuts
    assert received == [b"%04d" % i for i in range(TOTAL)]


async def test_reconnect_right_after_ack_does_not_redeliver(relay):
    alice, bob = User("alice"), User("bob")
    await alice.register(relay.url)
    await bob.register(relay.url)
    async with alice.online(relay.url) as a:
        for i in range(50):
            await a.send_msg("bob", {1: b"%d" % i})
        for _ in range(50):
            await a.recv_type(12)
    async with bob.online(relay.url) as b:
        last = None
        for _ in range(50):
            last = await b.recv_type(13)
        await b.send([14, last[1]])
    # At once, before the delete has necessarily committed:
    async with bob.online(relay.url) as b:
        assert b.ready[3] == 0
        await b.expect_nothing(0.3)
