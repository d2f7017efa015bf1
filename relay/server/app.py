"""The relay process: store, one group-commit writer per shard, router, listener.

:func:`open_relay` is the entry point for code and tests (an async context
manager yielding a started :class:`RelayServer`); ``relay serve`` wraps it
with signal handling. Task tree::

    RelayServer.run
    ├── Reactor.run                the data path's epoll set: live sockets, commit completions
    ├── GroupCommitWriter.run      x shards (waits for close; its commits run in reactor turns)
    ├── expiry sweeper
    └── listener -> Connection.serve (reader + delivery pump) per client
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import trio

from relay import fastpath
from relay.config import Settings
from relay.errors import CLOSE_GOING_AWAY, ConfigError
from relay.server.clock import now_ms
from relay.server.connection import Connection, Handlers
from relay.server.context import ServerContext
from relay.server.flush import OutputBatch
from relay.server.groups import Groups
from relay.server.keys import Keys
from relay.server.memory import HeapTrimmer, load_malloc_trim
from relay.server.parking import ParkedConnection, ParkingLot
from relay.server.reactor import Reactor, load_io
from relay.server.requests import RequestHandler
from relay.server.router import Router
from relay.server.writer import GroupCommitWriter
from relay.store.base import ExpireEntries
from relay.store.lmdb_store import LmdbStore

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 3.0


class RelayServer:
    def __init__(self, settings: Settings, store: LmdbStore | None = None) -> None:
        settings.validate()
        self.settings = settings
        try:
            self.fastpath = fastpath.load(settings.fastpath)
        except ImportError as exc:
            raise ConfigError(
                "the compiled fast path is not built (installed with RELAY_NO_EXT=1?); use --fastpath pure"
            ) from exc
        self.store = store or LmdbStore(
            settings.data,
            shards=settings.shards,
            map_size=settings.map_size_bytes,
            sync=settings.sync == "durable",
            fastpath=self.fastpath.IMPLEMENTATION,
        )
        self.output_batch = OutputBatch()
        self.reactor = Reactor(self.output_batch, load_io(settings.fastpath))
        self.router = Router()
        self.writers = [
            GroupCommitWriter(
                self.store,
                i,
                max_batch=settings.commit_batch_max,
                reactor=self.reactor,
                deliver=self.router.deliver,
            )
            for i in range(self.store.shards)
        ]
        # What the handlers below share; none of them sees the server.
        self.ctx = ServerContext(
            settings, self.fastpath, self.store, self.router, self.writers, self.output_batch, self.reactor
        )
        self.requests = RequestHandler(self.ctx)
        self.groups = Groups(self.ctx, self.requests)
        self.keys = Keys(self.ctx, self.requests)
        self.heap = HeapTrimmer(load_malloc_trim())
        self.parking = ParkingLot(self.ctx, self.heap, self._resume)
        self.handlers = Handlers(self.requests, self.groups, self.parking)
        # Served by a task of their own; Connection.serve keeps the set.
        self.connections = self.handlers.live
        self.port: int | None = None
        self._accept_scope = trio.CancelScope()
        self._shutdown_event = trio.Event()

    @property
    def url(self) -> str:
        return f"ws://{self.settings.host}:{self.port}/v1"

    @property
    def shutting_down(self) -> bool:
        return self.ctx.shutting_down

    def statistics(self) -> dict[str, Any]:
        return {
            "connections": len(self.connections),
            "online_devices": self.router.count(),
            "parking": self.parking.statistics(),
            "heap_trims": self.heap.trims,
            "direct_flushes": self.output_batch.flushes,
            "reactor_turns": self.reactor.turns,
            "short_direct_writes": self.output_batch.short_writes,
            "writers": [w.statistics() for w in self.writers],
            "fastpath": self.fastpath.IMPLEMENTATION,
        }

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`shutdown`; ``task_status.started(port)`` once listening."""
        try:
            async with trio.open_nursery() as core:
                # The reactor outlives everything that feeds it: the writers'
                # last commits complete through it.
                await core.start(self.reactor.run)
                await self._run_writers_and_listener(task_status)
                core.cancel_scope.cancel()
        finally:
            self.store.close()

    async def _run_writers_and_listener(self, task_status: trio.TaskStatus[int]) -> None:
        async with trio.open_nursery() as writers_nursery:
            for writer in self.writers:
                await writers_nursery.start(writer.run)
            async with trio.open_nursery() as nursery:
                self.ctx.nursery = nursery
                listeners = await trio.open_tcp_listeners(self.settings.port, host=self.settings.host)
                self.port = listeners[0].socket.getsockname()[1]
                nursery.start_soon(self._sweep_forever)
                nursery.start_soon(self._check_timers_forever)
                await nursery.start(self.parking.run)
                await nursery.start(self.heap.run)
                nursery.start_soon(self._accept, listeners, nursery)
                log.info("relay listening on %s (fast path: %s)", self.url, self.fastpath.IMPLEMENTATION)
                task_status.started(self.port)
                await self._wait_shutdown()
                await self._close_connections()
                nursery.cancel_scope.cancel()
            # Connections are gone: let the writers commit what is queued.
            for writer in self.writers:
                writer.close()

    async def _accept(self, listeners: list[trio.SocketListener], nursery: trio.Nursery) -> None:
        with self._accept_scope:
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    def _handle(self, stream: trio.SocketStream) -> Coroutine[Any, Any, None]:
        # Not a coroutine itself: one frame less on every connection's stack.
        return Connection(self.ctx, self.handlers, stream).serve()

    def _resume(self, stream: trio.SocketStream, parked: ParkedConnection) -> Connection:
        """A parked session goes live again on a new Connection (for the ParkingLot)."""
        conn = Connection(self.ctx, self.handlers, stream, resume=parked)
        self.ctx.spawn(conn.serve)
        return conn

    def abort_connections(self, user: str) -> int:
        """Cut every connection of ``user`` without a close frame; return how many."""
        targets = self.router.devices_online(user)
        for conn in targets:
            conn.abort()
        return len(targets)

    def shutdown(self) -> None:
        """Stop accepting, close every connection with 1001, commit, return from :meth:`run`."""
        self.ctx.shutting_down = True
        self._shutdown_event.set()

    async def _wait_shutdown(self) -> None:
        await self._shutdown_event.wait()

    async def _close_connections(self) -> None:
        self._accept_scope.cancel()
        self.parking.close_all(self.ctx.close_frame(CLOSE_GOING_AWAY, "server shutting down"))
        for conn in list(self.connections):
            conn.begin_close(CLOSE_GOING_AWAY, "server shutting down")
        with trio.move_on_after(SHUTDOWN_GRACE_S):
            while self.connections:
                await trio.sleep(0.01)

    def timer_interval(self) -> float:
        """How often connections' idle and park timers are checked: a quarter
        of the shorter one, so they fire at most 25 % late."""
        periods = [t for t in (self.settings.park_after_s, self.settings.idle_timeout_s) if t > 0]
        return min(0.5, max(0.002, min(periods) / 4))

    async def _check_timers_forever(self) -> None:
        interval = self.timer_interval()
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            for conn in list(self.connections):
                conn.check_timers(now)

    async def _sweep_forever(self) -> None:
        while True:
            await trio.sleep(self.settings.sweep_interval_s)
            await self.sweep_expired()

    async def sweep_expired(self) -> int:
        """Delete entries older than the retention period; return how many."""
        cutoff = now_ms() - int(self.settings.retention_s * 1000)
        total = 0
        for writer in self.writers:
            resume: bytes | None = None
            while True:
                result = await writer.call(ExpireEntries(cutoff, 10_000, resume))
                if not isinstance(result, tuple):
                    log.error("expiry sweep failed on shard %d: %r", writer.shard, result)
                    break
                resume, deleted = result
                total += deleted
                if resume is None:
                    break
        return total


@asynccontextmanager
async def open_relay(settings: Settings) -> AsyncIterator[RelayServer]:
    """Start a relay (``settings.port`` 0 picks a free port) and stop it on exit."""
    server = RelayServer(settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        try:
            yield server
        finally:
            server.shutdown()
