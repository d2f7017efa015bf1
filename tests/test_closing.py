"""Closing handshake: a peer that never answers the close frame is cut at the deadline."""

from __future__ import annotations

import trio

from relay.server.connection import CLOSE_TIMEOUT_S
from tests.test_stall import open_stalled
from tests.wire import User


async def test_a_peer_that_never_answers_the_close_is_cut_at_the_deadline(relay):
    # The raw client reads READY and then nothing: the relay's reader waits for
    # input without a cancel scope when the close begins (a second login
    # replaces the session), and must still give up on the answer in time.
    alice = User("alice")
    await alice.register(relay.url)
    ws = await open_stalled(relay.url, "alice", alice.key)
    async with alice.online(relay.url):
        start = trio.current_time()
        with trio.fail_after(CLOSE_TIMEOUT_S + 1 + 5):
            while await ws.stream.receive_some(65536):
                pass
        assert trio.current_time() - start >= CLOSE_TIMEOUT_S
    await ws.stream.aclose()
