from __future__ import annotations

from tests.wire import User


async def test_send_receive_ack_receipt(relay):
    alice, bob = User("alice"), User("bob")
    await alice.register(relay.url)
    await bob.register(relay.url)
    async with alice.online(relay.url) as a:
        msg_id = await a.send_msg("bob", {1: b"hi"})
        sent = await a.recv()
        assert sent[0] == 12 and sent[1] == msg_id
        async with bob.online(relay.url) as b:
            assert b.ready[3] == 1
            msg = await b.recv()
            assert msg[0] == 13 and msg[1] == 1 and msg[2] == msg_id and msg[3] == "alice" and msg[7] == b"hi"
            await b.send([14, msg[1]])
            receipt = await a.recv_type(15)
            assert receipt[2] == msg_id and receipt[3] == "bob" and receipt[5] == 1
