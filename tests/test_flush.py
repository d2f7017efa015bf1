"""Output written straight from a commit's callbacks (relay/server/flush.py).

The shortcut writes with one non-blocking send; what the socket does not take
must reach the client through the delivery pump, after what went before and
before what comes next.
"""

from __future__ import annotations

import logging

import pytest

from relay.server.app import RelayServer
from relay.server.flush import OutputBatch
from tests.wire import User

PAYLOAD = 200 * 1024
MESSAGES = 300  # more than the window (256); 50 MiB in flight is more than any socket buffers


class FakeConnection:
    def __init__(self, name: str, log: list[str], written: bool = True, fail: bool = False) -> None:
        self.name = name
        self.log = log
        self.written = written
        self.fail = fail

    def flush(self) -> bool:
        self.log.append(self.name)
        if self.fail:
            raise RuntimeError("broken")
        return self.written


def test_output_batch_defers_to_its_end_and_counts() -> None:
    batch = OutputBatch()
    log: list[str] = []
    a, b = FakeConnection("a", log), FakeConnection("b", log, written=False)
    assert not batch.defer(a), "no batch open: nothing is deferred"
    with batch:
        assert batch.defer(a) and batch.defer(b)
        assert log == []
    assert log == ["a", "b"]
    assert (batch.flushes, batch.short_writes) == (2, 1)
    assert not batch.defer(a)


def test_output_batch_one_failing_flush_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    batch = OutputBatch()
    log: list[str] = []
    with caplog.at_level(logging.ERROR), batch:
        batch.defer(FakeConnection("bad", log, fail=True))
        batch.defer(FakeConnection("good", log))
    assert log == ["bad", "good"]
    assert "flush failed" in caplog.text


async def test_output_too_big_for_the_socket_arrives_whole_and_in_order(relay: RelayServer) -> None:
    alice, bob = User("alice"), User("bob")
    await alice.register(relay.url)
    await bob.register(relay.url)
    ids = [i.to_bytes(16, "big") for i in range(MESSAGES)]
    async with bob.online(relay.url) as b, alice.online(relay.url) as a:
        # Bob does not read while Alice's messages are stored and pushed to him:
        # his socket fills and the writes from the commit callbacks fall short.
        for i, msg_id in enumerate(ids):
            await a.send_msg("bob", {1: bytes([i % 251]) * PAYLOAD}, msg_id=msg_id)
        for _ in ids:
            await a.recv_type(12)
        assert relay.output_batch.short_writes > 0, "no direct write fell short: the test proves nothing"
        last_seq = 0
        for i, msg_id in enumerate(ids):
            msg = await b.recv_type(13)
            assert msg[2] == msg_id, f"message {i} out of order"
            assert msg[1] == last_seq + 1
            assert msg[7] == bytes([i % 251]) * PAYLOAD
            last_seq = msg[1]
            await b.send([14, msg[1]])
        await b.expect_nothing(0.2)
    assert relay.output_batch.flushes > 0
