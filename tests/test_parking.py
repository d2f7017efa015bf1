"""Idle connections parked (no task, no buffer) and revived by input or by the relay."""

from __future__ import annotations

import contextlib

import trio

from relay.errors import CLOSE_GOING_AWAY
from relay.server import app
from relay.server.app import open_relay
from relay.server.connection import Connection
from relay.server.parking import ParkedConnection
from tests.wire import User

PARK = 0.05


async def wait_parked(relay, user: str, device: int = 1) -> None:
    with trio.fail_after(5):
        while not isinstance(relay.router.connection(user, device), ParkedConnection) or not relay.router.connection(user, device).registered:
            await trio.sleep(0.01)


async def test_parked_connection_is_revived_by_a_message(settings):
    settings.park_after_s = PARK
    async with open_relay(settings) as relay:
        alice, bob = User("alice"), User("bob")
        await alice.register(relay.url)
        await bob.register(relay.url)
        async with alice.online(relay.url) as a, bob.online(relay.url) as b:
            await wait_parked(relay, "bob")
            await wait_parked(relay, "alice")
            assert relay.parking.statistics()["parked"] == 2
            assert not relay.connections, "parked connections own no task"
            msg_id = await a.send_msg("bob", {1: b"wake up"})
            assert (await a.recv_type(12))[1] == msg_id
            msg = await b.recv_type(13)
            assert msg[2] == msg_id and msg[7] == b"wake up"
            await b.send([14, msg[1]])
            receipt = await a.recv_type(15)
            assert receipt[2] == msg_id
            await a.send([14, receipt[1]])
            # Both park again, and a second round trip still works with the right seqs.
            await wait_parked(relay, "bob")
            await wait_parked(relay, "alice")
            await a.send_msg("bob", {1: b"again"})
            msg2 = await b.recv_type(13)
            assert msg2[1] == msg[1] + 1 and msg2[7] == b"again"
            assert relay.parking.revived_total >= 4


async def test_parked_connection_is_revived_by_its_client_and_by_signals(settings):
    settings.park_after_s = PARK
    async with open_relay(settings) as relay:
        alice, bob = User("alice"), User("bob")
        await alice.register(relay.url)
        await bob.register(relay.url)
        async with alice.online(relay.url) as a, bob.online(relay.url) as b:
            await wait_parked(relay, "alice")
            res = await a.request(7, "devices.list", {"user": "bob"})
            assert res[2] is True and res[3]["devices"][0]["device"] == 1
            await wait_parked(relay, "alice")
            await wait_parked(relay, "bob")
            await a.send([30, "bob", "typing"])
            assert (await b.recv_type(31))[1:] == ["alice", "bob", "typing"]
            # Ping from a parked client gets its pong (trio-websocket waits for it).
            await wait_parked(relay, "bob")
            with trio.fail_after(5):
                await b.ws.ping(b"hi")


async def test_parked_connection_replaced_idle_expired_and_shut_down(settings):
    settings.park_after_s = PARK
    settings.idle_timeout_s = 1.0
    async with open_relay(settings) as relay:
        alice = User("alice")
        await alice.register(relay.url)
        async with alice.online(relay.url) as first:
            await wait_parked(relay, "alice")
            async with alice.online(relay.url) as second:
                assert await first.closed() == 4409
                await wait_parked(relay, "alice")
                # The idle timeout still applies to a parked connection.
                assert await second.closed(timeout=5) == 1001
                assert relay.parking.statistics()["parked"] == 0
        async with alice.online(relay.url) as third:
            await wait_parked(relay, "alice")
            relay.shutdown()
            assert await third.closed() == 1001


async def test_abort_parked_connection(settings):
    settings.park_after_s = PARK
    async with open_relay(settings) as relay:
        alice = User("alice")
        await alice.register(relay.url)
        async with alice.online(relay.url) as a:
            await wait_parked(relay, "alice")
            assert relay.abort_connections("alice") == 1
            assert await a.closed() == 1006
            assert relay.router.connection("alice", 1) is None


def test_timer_sweep_interval_is_a_quarter_of_the_shorter_timer(settings):
    """Idle and park timers fire up to a quarter late, checked at most every 0.5 s."""
    import dataclasses

    from relay.server.app import RelayServer

    cases = [((2.0, 120.0), 0.5), ((0.01, 120.0), 0.0025), ((0.0, 1.0), 0.25), ((0.001, 1.0), 0.002)]
    for (park_after, idle), interval in cases:
        server = RelayServer(dataclasses.replace(settings, park_after_s=park_after, idle_timeout_s=idle))
        try:
            assert server.timer_interval() == interval, (park_after, idle)
        finally:
            server.store.close()


async def test_a_busy_connection_is_never_parked_mid_stream(settings):
    """Input keeps coming much faster than park_after_s: the sweep leaves the reader alone."""
    settings.park_after_s = 0.5
    async with open_relay(settings) as relay:
        alice, bob = User("alice"), User("bob")
        await alice.register(relay.url)
        await bob.register(relay.url)
        async with alice.online(relay.url) as a:
            for i in range(40):  # about 1 s, twice park_after_s, input every 25 ms
                await a.send_msg("bob", {1: bytes([i])})
                await a.recv_type(12)
                assert not isinstance(relay.router.connection("alice", 1), ParkedConnection)
                await trio.sleep(0.02)
            await wait_parked(relay, "alice")


async def test_close_asked_of_a_connection_whose_reader_just_ended(settings, monkeypatch):
    """Shutdown asks every connection it still counts to close, some of them
    just as their reader ended (here: they park). Their nursery may already be
    closed then, and begin_close must not start a pump in it: that raised
    "Nursery is closed to new arrivals" and took the relay down."""
    settings.park_after_s = PARK
    ended: list[Connection] = []

    class Watched(Connection):
        async def _read_loop(self, data: bytes) -> None:
            await super()._read_loop(data)
            ended.append(self)

    async with open_relay(settings) as relay:
        users = [User(f"u{i}") for i in range(10)]
        for user in users:
            await user.register(relay.url)
        monkeypatch.setattr(app, "Connection", Watched)
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(user.online(relay.url)) for user in users]
            asked = 0
            with trio.fail_after(10):
                while asked < len(users):
                    # Every scheduling round, like a shutdown that comes at any moment.
                    await trio.lowlevel.checkpoint()
                    while ended:
                        ended.pop().begin_close(CLOSE_GOING_AWAY, "shutting down")
                        asked += 1
            # Those that parked before the close came stay parked; shutdown closes them.
            relay.shutdown()
            for client in clients:
                assert await client.closed() in (1001, 1006)
