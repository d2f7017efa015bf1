"""Group commit: one writer task per shard, one transaction and one sync per batch.

Connections :meth:`submit` write ops with a callback; the writer takes every
op waiting, applies them in one transaction in a worker thread
(``trio.to_thread``, the transaction opened and closed inside that one call)
and then runs the callbacks on the event loop, so a SENT goes out only after
its batch is durable. While one batch syncs, the next one gathers: under
load, batches grow by themselves and the cost of a sync is shared.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from relay.store.base import Store, WriteOp

log = logging.getLogger(__name__)

Callback = Callable[[object], None]


class GroupCommitWriter:
    def __init__(self, store: Store, shard: int, max_batch: int = 4096, queue_size: int = 4096) -> None:
        self.store = store
        self.shard = shard
        self.max_batch = max_batch
        self._send, self._receive = trio.open_memory_channel[tuple[WriteOp, Callback | None] | None](queue_size)
        # Ops that commit callbacks queue (the next step of an ACK or a
        # fan-out): kept in commit order and taken first, without a task.
        self._followups: deque[tuple[WriteOp, Callback | None]] = deque()
        self.batches = 0
        self.ops = 0

    async def submit(self, op: WriteOp, on_done: Callback | None = None) -> None:
        """Queue ``op``; waits only while the queue is full (backpressure).

        ``on_done(result)`` runs on the event loop after the commit, with the
        op's result or the exception it ended with. It must not block.
        Raises ``trio.ClosedResourceError`` once the relay is shutting down.
        """
        try:
            # Skips a scheduler round trip when there is room (the usual case);
            # FIFO order holds because a full buffer refuses every nowait.
            self._send.send_nowait((op, on_done))
        except trio.WouldBlock:
            await self._send.send((op, on_done))

    def submit_nowait(self, op: WriteOp, on_done: Callback | None = None) -> None:
        """Queue ``op`` if there is room; raises ``trio.WouldBlock`` when full and
        ``trio.ClosedResourceError`` once the relay is shutting down."""
        self._send.send_nowait((op, on_done))

    def submit_followup(self, op: WriteOp, on_done: Callback | None = None) -> None:
        """Queue ``op`` from a commit callback: never blocks, keeps call order.

        Bounded by what caused it (each follow-up is the next step of an op
        that was itself admitted through :meth:`submit`), so it skips the
        queue limit. Dropped silently once the relay is stopping.
        """
        if self._closed:
            return
        self._followups.append((op, on_done))
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            self._send.send_nowait(None)  # wake an idle writer; a busy one looks anyway

    async def call(self, op: WriteOp) -> object:
        """Submit ``op`` and wait for its committed result (or exception, returned)."""
        done = trio.Event()
        box: list[object] = []

        def finished(result: object) -> None:
            box.append(result)
            done.set()

        await self.submit(op, finished)
        await done.wait()
        return box[0]

    def close(self) -> None:
        """No new ops; :meth:`run` commits what is queued and returns."""
        self._send.close()

    _closed = False

    def statistics(self) -> dict[str, Any]:
        return {"shard": self.shard, "batches": self.batches, "ops": self.ops, "queued": self._receive.statistics().current_buffer_used}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        receive = self._receive
        task_status.started()
        followups = self._followups
        async with receive:
            while True:
                if not followups:
                    try:
                        first = await receive.receive()
                    except trio.EndOfChannel:
                        self._closed = True
                        if not followups:
                            return
                        first = None
                    batch: list[tuple[WriteOp, Callback | None]] = [] if first is None else [first]
                else:
                    batch = []
                # Follow-ups first: they continue work admitted earlier.
                if followups:
                    batch[:0] = [followups.popleft() for _ in range(min(len(followups), self.max_batch))]
                while len(batch) < self.max_batch:
                    try:
                        item = receive.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    if item is not None:
                        batch.append(item)
                if not batch:
                    continue
                ops = [op for op, _ in batch]
                # Not cancellable: a commit in progress is finished, never abandoned.
                results = await trio.to_thread.run_sync(self.store.apply_batch, self.shard, ops)
                self.batches += 1
                self.ops += len(ops)
                for (_, on_done), result in zip(batch, results, strict=True):
                    if on_done is not None:
                        try:
                            on_done(result)
                        except Exception:  # a bug in one callback must not stop the shard
                            log.exception("write callback failed")
