"""The reactor: level-triggered sockets, posts from threads, soon, timers, one output batch per turn."""

from __future__ import annotations

import socket
import threading

import trio

from relay.server.flush import OutputBatch
from relay.server.reactor import Reactor


async def _running(nursery: trio.Nursery, reactor: Reactor) -> None:
    await nursery.start(reactor.run)


async def test_a_watched_socket_is_served_in_turns_until_unwatched() -> None:
    reactor = Reactor()
    a, b = socket.socketpair()
    a.setblocking(False)
    got: list[bytes] = []

    def readable() -> None:
        got.append(a.recv(100))
        if got[-1] == b"stop":
            reactor.unwatch(a.fileno())

    async with trio.open_nursery() as nursery:
        await _running(nursery, reactor)
        reactor.watch(a.fileno(), readable)
        b.send(b"one")
        with trio.fail_after(5):
            while got != [b"one"]:
                await trio.sleep(0.001)
        b.send(b"stop")
        with trio.fail_after(5):
            while len(got) < 2:
                await trio.sleep(0.001)
        assert reactor.watching() == 0
        b.send(b"unseen")
        await trio.sleep(0.05)
        assert got == [b"one", b"stop"], "an unwatched socket is not read"
        nursery.cancel_scope.cancel()
    a.close()
    b.close()


async def test_posts_from_other_threads_run_in_order_on_the_loop_thread() -> None:
    reactor = Reactor()
    seen: list[tuple[int, bool]] = []
    loop_thread = threading.get_ident()

    def record(value: int) -> None:
        seen.append((value, threading.get_ident() == loop_thread))

    async with trio.open_nursery() as nursery:
        await _running(nursery, reactor)

        def poster() -> None:
            for i in range(500):
                reactor.post(record, i)

        await trio.to_thread.run_sync(poster)
        with trio.fail_after(5):
            while len(seen) < 500:
                await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    assert [v for v, _ in seen] == list(range(500))
    assert all(on_loop for _, on_loop in seen)


async def test_soon_runs_at_the_end_of_the_turn_and_output_is_flushed_once() -> None:
    batch = OutputBatch()
    reactor = Reactor(batch)
    order: list[str] = []

    class Conn:
        def flush(self) -> bool:
            order.append("flush")
            return True

    conn = Conn()

    def posted(_: object) -> None:
        order.append("posted")
        assert batch.defer(conn)
        reactor.soon(lambda: order.append("soon"))

    async with trio.open_nursery() as nursery:
        await _running(nursery, reactor)
        reactor.post(posted, None)
        with trio.fail_after(5):
            while "flush" not in order:
                await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    assert order == ["posted", "soon", "flush"]


async def test_timers_fire_after_their_delay_and_cancelled_ones_never() -> None:
    reactor = Reactor()
    fired: list[str] = []
    async with trio.open_nursery() as nursery:
        await _running(nursery, reactor)
        start = trio.current_time()
        reactor.call_later(0.05, lambda: fired.append("late"))
        reactor.call_later(0.01, lambda: fired.append("early"))
        reactor.call_later(0.02, lambda: fired.append("cancelled")).cancel()
        with trio.fail_after(5):
            while len(fired) < 2:
                await trio.sleep(0.005)
        assert trio.current_time() - start >= 0.05
        await trio.sleep(0.03)
        nursery.cancel_scope.cancel()
    assert fired == ["early", "late"]


async def test_a_failing_handler_does_not_stop_the_others(caplog) -> None:
    reactor = Reactor()
    ran: list[int] = []

    def broken(_: object) -> None:
        raise RuntimeError("bug")

    def broken_soon() -> None:
        raise RuntimeError("bug")

    async with trio.open_nursery() as nursery:
        await _running(nursery, reactor)
        reactor.post(broken, None)
        reactor.post(ran.append, 1)
        reactor.soon(broken_soon)
        reactor.soon(lambda: ran.append(2))
        with trio.fail_after(5):
            while len(ran) < 2:
                await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    assert ran == [1, 2]
    assert "reactor callback failed" in caplog.text
    assert "reactor handler failed" in caplog.text
