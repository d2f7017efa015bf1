"""Rate limits: the pure token bucket, and 429 over the wire for REQ and SIGNAL floods."""

from __future__ import annotations

import pytest

from relay.protocol.limits import TokenBucket
from relay.server.app import open_relay
from tests.wire import User


def test_token_bucket_burst_then_rate():
    bucket = TokenBucket(rate=10, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.05), "half a token is not a token"
    assert bucket.take(0.1)
    assert bucket.take(100.0) and bucket.take(100.0) and bucket.take(100.0)
    assert not bucket.take(100.0), "idle time refills up to the burst, no more"
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, now=0)


async def test_request_and_signal_floods_get_429(settings):
    settings.requests_per_s = 1
    settings.requests_burst = 5
    settings.signals_per_s = 1
    settings.signals_burst = 3
    async with open_relay(settings) as relay:
        alice, bob = User("alice"), User("bob")
        await alice.register(relay.url)
        await bob.register(relay.url)
        async with alice.online(relay.url) as a, bob.online(relay.url) as b:
            await a.send(*[[20, i, "devices.list", {"user": "bob"}] for i in range(8)])
            results = [await a.recv_type(21, keep=True) for _ in range(8)]
            assert [r[2] for r in results] == [True] * 5 + [False] * 3
            assert all(r[3]["code"] == 429 for r in results[5:])
            await a.send(*[[30, "bob", "typing"] for _ in range(5)])
            errors = [await a.recv_type(4) for _ in range(2)]
            assert all(e[1:3] == [30, 429] for e in errors)
            signals = [await b.recv_type(31) for _ in range(3)]
            assert len(signals) == 3
            await b.expect_nothing(0.2)
            # The connection is still served: an ordinary SEND works.
            msg_id = await a.send_msg("bob", {1: b"still here"})
            assert (await a.recv_type(12))[1] == msg_id
