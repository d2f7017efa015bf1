"""End-to-end encryption through the client library, over a real relay.

Alice and Bob talk 1:1 (X3DH, then the Double Ratchet, both ways, across a
restart of both clients from their state directories); a group of five
talks with Sender Keys, and a removed member's chain no longer opens what
follows; a tampered payload is shown as undecryptable, never dropped, and
the session goes on; one-time prekeys are refilled on ``keys.low``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from relay.client import DeviceIdentity, Event, Message, SecureClient, open_client, open_transport
from relay.client.keystore import KeyStore
from relay.config import Settings
from relay.e2ee.errors import E2EEError
from relay.server.app import RelayServer


async def register(relay: RelayServer, tmp: Path, name: str) -> DeviceIdentity:
    ident = DeviceIdentity.generate(relay.url, name)
    async with open_client(ident, tmp / name, register=True, connect_timeout=5):
        pass
    ident.save(tmp / name)
    return ident


async def next_message(client: SecureClient, timeout: float = 10) -> Message:
    with trio.fail_after(timeout):
        while True:
            entry = await client.receive()
            if isinstance(entry, Message):
                return entry


def body(message: Message) -> str:
    assert message.error is None, message.error
    assert message.plaintext is not None and message.plaintext["type"] == "text"
    assert isinstance(message.plaintext["ts"], int)
    return str(message.plaintext["body"])


async def test_one_to_one_both_ways_and_after_restart(relay: RelayServer, tmp_path: Path) -> None:
    alice = await register(relay, tmp_path, "alice")
    bob = await register(relay, tmp_path, "bob")
    async with open_client(alice, tmp_path / "alice") as a, open_client(bob, tmp_path / "bob") as b:
        for i in range(3):
            await a.send("bob", f"hello {i}")
        got = [await next_message(b) for _ in range(3)]
        assert [body(m) for m in got] == ["hello 0", "hello 1", "hello 2"]
        assert all(b"hello" not in m.payload for m in got)
        await b.send("alice", "hi alice")
        assert body(await next_message(a)) == "hi alice"
        await a.send("bob", "after the reply")
        assert body(await next_message(b)) == "after the reply"

    # Both come back from disk: the sessions go on where they were.
    alice, bob = DeviceIdentity.load(tmp_path / "alice"), DeviceIdentity.load(tmp_path / "bob")
    async with open_client(alice, tmp_path / "alice") as a, open_client(bob, tmp_path / "bob") as b:
        await b.send("alice", "still here")
        assert body(await next_message(a)) == "still here"
        await a.send("bob", "me too")
        message = await next_message(b)
        assert body(message) == "me too" and not message.identity_changed
        numbers_a = dict(await a.safety_numbers("bob"))
        numbers_b = dict(await b.safety_numbers("alice"))
        assert numbers_a[1] == numbers_b[1] and len(numbers_a[1].replace(" ", "")) == 60
    mode = os.stat(tmp_path / "alice" / "e2ee.state").st_mode & 0o777
    assert mode == 0o600


def give_device(relay: RelayServer, user: str, device: int, ident: DeviceIdentity) -> None:
    """Set ``user``'s ``device`` to ``ident``'s key in the store directly
    (device.link is not built yet), around the store's device cache."""
    from tests.test_protocol_integration import add_device

    add_device(relay, user, device, ident.signing_key)
    relay.store._shard(user).devices.pop(user, None)
    ident.device = device


async def test_every_device_gets_its_own_ciphertext_and_409_refetches(relay: RelayServer, tmp_path: Path) -> None:
    alice = await register(relay, tmp_path, "alice")
    bob = await register(relay, tmp_path, "bob")
    async with open_client(alice, tmp_path / "alice") as a:
        await a.send("bob", "to bob's only device")
        # bob gains a device: alice's cached device set is stale, the relay
        # answers 409, the client refetches, sets up a session, resends.
        bob2 = DeviceIdentity.generate(relay.url, "bob")
        give_device(relay, "bob", 2, bob2)
        keys2 = KeyStore.open(tmp_path / "bob2")
        async with open_client(bob2, keys=keys2):
            pass  # publishes bob device 2's prekeys
        await a.send("bob", "to both devices")
        assert ("bob", 1) in a.keys.peers and ("bob", 2) in a.keys.peers
    async with open_client(bob, tmp_path / "bob") as b1, open_client(bob2, keys=keys2) as b2:
        assert body(await next_message(b1)) == "to bob's only device"
        m1, m2 = await next_message(b1), await next_message(b2)
        assert body(m1) == body(m2) == "to both devices"
        assert m1.payload != m2.payload


async def test_a_changed_identity_key_is_flagged(relay: RelayServer, tmp_path: Path) -> None:
    alice = await register(relay, tmp_path, "alice")
    await register(relay, tmp_path, "bob")
    async with open_client(alice, tmp_path / "alice") as a:
        await a.send("bob", "to the first key")
        assert a.identity_changed("bob") == []
        # bob's device 1 now has another key (a reinstall, or a relay that lies).
        new_bob = DeviceIdentity.generate(relay.url, "bob")
        give_device(relay, "bob", 1, new_bob)
        async with open_client(new_bob, tmp_path / "new-bob") as b:
            await b.send("alice", "a new key")
            message = await next_message(a)
            assert body(message) == "a new key" and message.identity_changed
            assert a.identity_changed("bob") == [1]
            # Sending again makes a new session with the new key.
            await a.send("bob", "to the new key")
            while True:
                got = await next_message(b)
                if got.error is None:
                    break  # the message to the old key was not for this one
            assert body(got) == "to the new key"
            a.accept_identity("bob")
            assert a.identity_changed("bob") == []


async def test_tampered_payload_is_shown_and_the_session_survives(relay: RelayServer, tmp_path: Path) -> None:
    alice = await register(relay, tmp_path, "alice")
    bob = await register(relay, tmp_path, "bob")
    async with open_client(bob, tmp_path / "bob") as b:
        async with open_client(alice, tmp_path / "alice") as a:
            await a.send("bob", "first")
            assert body(await next_message(b)) == "first"
        # Alice's device sends bytes that are not a ratchet message for bob.
        async with open_transport(alice) as raw:
            await raw.send("bob", b"\x93\x01\xc4\x28" + bytes(40) + b"\xc4\x28" + bytes(40))
        refused = await next_message(b)
        assert refused.plaintext is None and refused.error and "decrypt" in refused.error
        async with open_client(alice, tmp_path / "alice") as a:
            await a.send("bob", "second")
        assert body(await next_message(b)) == "second"


async def test_group_of_five_and_a_removal(relay: RelayServer, tmp_path: Path) -> None:
    names = ["ann", "ben", "cat", "dan", "eve"]
    idents = [await register(relay, tmp_path, n) for n in names]
    async with trio.open_nursery() as nursery:
        clients: dict[str, SecureClient] = {}

        async def run(ident: DeviceIdentity, started: trio.Event, stop: trio.Event) -> None:
            async with open_client(ident, tmp_path / ident.user) as client:
                clients[ident.user] = client
                started.set()
                await stop.wait()

        stop = trio.Event()
        for ident in idents:
            started = trio.Event()
            nursery.start_soon(run, ident, started, stop)
            await started.wait()

        info = await clients["ann"].create_group("five", names[1:])
        group = info["group"]
        for name in names:
            await clients[name].send_group(group, f"from {name}")
        for name in names:
            texts = set()
            while len(texts) < 4:
                message = await next_message(clients[name])
                assert message.group == group
                texts.add(body(message))
            assert texts == {f"from {n}" for n in names if n != name}

        # eve leaves the group (removed by ann); ben's next chain is new.
        eve_chains = clients["eve"].keys.sender_chains[(group, "ben", 1)]
        await clients["ann"].remove_members(group, ["eve"])
        await clients["ben"].send_group(group, "eve must not read this")
        message = await next_message(clients["cat"])
        assert body(message) == "eve must not read this"
        with pytest.raises(E2EEError):
            eve_chains.decrypt(group, message.payload)
        stop.set()


async def test_one_time_prekeys_refilled_on_keys_low(tmp_path: Path, fastpath_name: str) -> None:
    settings = Settings(
        port=0, data=str(tmp_path / "data"), fastpath=fastpath_name, shards=2, keys_fetch_burst=1000
    )
    from relay.server.app import open_relay

    async with open_relay(settings) as relay:
        alice = await register(relay, tmp_path, "alice")
        bob = await register(relay, tmp_path, "bob")
        async with open_client(alice, tmp_path / "alice") as a:
            assert await a.request("keys.count") == 100
            async with open_transport(bob) as raw:
                for _ in range(91):
                    await raw.request("keys.fetch", {"user": "alice"})
            assert await raw_count(a) == 9
            with trio.fail_after(10):
                while True:
                    entry = await a.receive()
                    if isinstance(entry, Event) and entry.kind == "keys.low":
                        break
                while await raw_count(a) < 100:
                    await trio.sleep(0.05)


async def raw_count(client: SecureClient) -> int:
    count = await client.request("keys.count")
    assert isinstance(count, int)
    return count


async def test_a_member_added_later_reads_from_then_on(relay: RelayServer, tmp_path: Path) -> None:
    ann, ben, cat = [await register(relay, tmp_path, n) for n in ("ann", "ben", "cat")]
    async with (
        open_client(ann, tmp_path / "ann") as a,
        open_client(ben, tmp_path / "ben") as b,
        open_client(cat, tmp_path / "cat") as c,
    ):
        group = (await a.create_group("pair", ["ben"]))["group"]
        await a.send_group(group, "before cat")
        before = await next_message(b)
        assert body(before) == "before cat"
        await a.add_members(group, ["cat"])
        await a.send_group(group, "cat is here")
        assert body(await next_message(b)) == "cat is here"
        got = await next_message(c)
        assert body(got) == "cat is here"
        # cat was given ann's chain as it stood when cat joined: not before.
        with pytest.raises(E2EEError):
            c.keys.sender_chains[(group, "ann", 1)].decrypt(group, before.payload)


async def test_a_device_that_lost_its_e2ee_state_publishes_again(relay: RelayServer, tmp_path: Path) -> None:
    alice = await register(relay, tmp_path, "alice")
    bob = await register(relay, tmp_path, "bob")
    (tmp_path / "alice" / "e2ee.state").unlink()  # state.json (the identity) survives
    async with open_client(alice, tmp_path / "alice") as a, open_client(bob, tmp_path / "bob") as b:
        assert await raw_count(a) == 100  # the relay dropped the prekeys nobody can open
        await b.send("alice", "to the new prekeys")
        assert body(await next_message(a)) == "to the new prekeys"


async def test_open_client_wants_a_place_for_its_keys(relay: RelayServer, tmp_path: Path) -> None:
    alice = await register(relay, tmp_path, "alice")
    with pytest.raises(ValueError, match="state_dir or keys"):
        async with open_client(alice):
            pass


async def test_a_group_message_before_its_sender_key_waits_for_it(relay: RelayServer, tmp_path: Path) -> None:
    from relay.e2ee import plaintext

    ann, ben = await register(relay, tmp_path, "ann"), await register(relay, tmp_path, "ben")
    async with open_client(ann, tmp_path / "ann") as a, open_client(ben, tmp_path / "ben") as b:
        group = (await a.create_group("pair", ["ben"]))["group"]
        await a.send_group(group, "first")  # hands out the chain: ben has it
        assert body(await next_message(b)) == "first"
        # Another client might send the group message before the skdm of a
        # new chain: do that by hand.
        from relay.client.keystore import OwnGroup
        from relay.e2ee.sender_keys import OwnChain

        own = a.keys.own_groups[group]
        fresh = OwnGroup(OwnChain.generate(avoid=(own.chain.chain_id,)), own.members, own.devices)
        a.keys.own_groups[group] = fresh
        skdm = fresh.chain.distribution(group, 1)  # the chain as it stands before "early"
        await a.transport.send_group(group, fresh.chain.encrypt(group, plaintext.encode(plaintext.text("early", 1))))
        await a.send("ben", skdm)  # ... but it is sent after it
        message = await next_message(b)
        assert body(message) == "early" and message.group == group


async def test_an_interrupted_receive_loses_nothing(relay: RelayServer, tmp_path: Path) -> None:
    alice, bob = await register(relay, tmp_path, "alice"), await register(relay, tmp_path, "bob")
    async with open_client(alice, tmp_path / "alice") as a, open_client(bob, tmp_path / "bob") as b:
        calls = 0
        real = b._refresh_devices

        async def flaky(user: str) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                from relay.client import RequestError

                raise RequestError(503, "overloaded")
            if calls == 2:
                await trio.sleep(10)  # cancelled by the caller's deadline
            await real(user)

        b._refresh_devices = flaky  # type: ignore[method-assign]
        await a.send("bob", "one")
        await a.send("bob", "two")
        with pytest.raises(Exception, match="overloaded"):
            await b.receive()
        with trio.move_on_after(0.5):
            await b.receive()
        assert [body(await next_message(b)) for _ in range(2)] == ["one", "two"]
