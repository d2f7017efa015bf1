"""What the server's handlers share, below all of them.

:class:`ServerContext` holds the pieces every handler reaches for — the
settings, the fast path, the store, the router, one writer per shard, the
output batch, the ack floors — and the few things done with them
(:meth:`~ServerContext.writer_for`, :meth:`~ServerContext.spawn`,
:meth:`~ServerContext.append_to_users`). :class:`~relay.server.app.RelayServer`
builds one and hands it to the request handlers, the groups, the key
directory, the parking lot and every connection; none of them sees the
server itself. Modules import only downward::

    app  ->  connection  ->  parking, groups, keys, auth  ->  requests, wire_errors  ->  context
                                                        (router, writer, reactor, flush, clock)

A handler that needs another handler gets it in its constructor (``Groups``
and ``Keys`` register on the ``RequestHandler``; a ``Connection`` is handed
the handlers it serves events with). :class:`Caller` is the connection as
the handlers see it, so they need not import it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Protocol

import trio

from relay.config import Settings
from relay.errors import FrameError
from relay.server.flush import OutputBatch
from relay.server.reactor import Reactor
from relay.server.router import Router
from relay.server.writer import GroupCommitWriter
from relay.store.base import Appended, AppendEntries, Store, group_of_body

log = logging.getLogger(__name__)


class Caller(Protocol):
    """The connection a request or a SEND_GROUP came from, as handlers use it."""

    user: str | None
    device: int | None

    def queue_sent(self, msg_id: bytes, ts: int) -> None: ...

    def queue_error(self, error: FrameError) -> None: ...


@dataclass(eq=False, slots=True)
class ServerContext:
    """The store, router and writers of one relay, and what handlers do with them."""

    settings: Settings
    fastpath: ModuleType
    store: Store
    router: Router
    writers: list[GroupCommitWriter]
    output_batch: OutputBatch
    # The data path's loop: live sockets' input and commit completions.
    reactor: Reactor
    # (user, device) -> seq acked but whose delete is not committed yet, so
    # a reconnect right after an ACK does not see those entries again.
    ack_floors: dict[tuple[str, int], int] = field(default_factory=dict)
    # Set by RelayServer.shutdown(): writers may refuse ops from now on.
    shutting_down: bool = False
    # The server's nursery, for jobs that outlive a connection (set while running).
    nursery: trio.Nursery | None = None

    def writer_for(self, user: str) -> GroupCommitWriter:
        return self.writers[self.store.shard_of(user)]

    def writer_for_group_body(self, body_key: bytes) -> GroupCommitWriter:
        return self.writer_for(group_of_body(body_key))

    def close_frame(self, code: int, reason: str = "") -> bytes:
        """A WebSocket close frame (``reason`` cut to 120 bytes)."""
        fp = self.fastpath
        payload = code.to_bytes(2, "big") + reason.encode()[:120]
        return fp.encode_frame(fp.OP_CLOSE, payload)

    def spawn(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run a job that must outlive the connection that started it."""
        assert self.nursery is not None
        try:
            self.nursery.start_soon(fn, *args)
        except RuntimeError:
            # The nursery is closed: the relay is stopping and the job is
            # dropped (every such job is one a restart redoes or can lose).
            log.debug("dropped %r during shutdown", fn)

    async def append_to_users(self, users: tuple[str, ...] | list[str], type_: int, count: int, tail: bytes, created: int) -> None:
        """Append one entry to every device inbox of ``users``; return once all committed."""
        remaining = len(users)
        done = trio.Event()

        def committed(user: str, result: object) -> None:
            nonlocal remaining
            if isinstance(result, Appended):
                self.router.deliver(user, result.entries)
            remaining -= 1
            if remaining == 0:
                done.set()

        if not users:
            return
        for user in users:
            op = AppendEntries(user, type_, count, [tail], created)
            await self.writer_for(user).submit(op, functools.partial(committed, user))
        await done.wait()
