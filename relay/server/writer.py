"""Group commit: one writer task per shard, one transaction and one sync per batch.

Connections :meth:`submit` write ops with a callback; the writer takes every
op waiting, applies them in one transaction in the shard's commit thread
(:class:`CommitThread`, the transaction opened and closed inside that one
call) and then runs the callbacks on the event loop, so a SENT goes out only
after its batch is durable. While one batch syncs, the next one gathers:
under load, batches grow by themselves and the cost of a sync is shared.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import outcome
import trio

from relay.protocol.frames import RECEIPT, RECEIPT_FIELDS
from relay.server.flush import OutputBatch
from relay.store.base import (
    Appended,
    AppendEntries,
    DeleteUpTo,
    InboxEntry,
    ReleaseBodies,
    Store,
    WriteOp,
)

log = logging.getLogger(__name__)

LAZY_DELETE_S = 0.02


def _call_all(callbacks: list[Callback], result: object) -> None:
    for callback in callbacks:
        callback(result)

Callback = Callable[[object], None]
# Where stored receipts go: (user, the (device, entry) pairs appended).
Deliver = Callable[[str, tuple[tuple[int, InboxEntry], ...]], None]


class CommitThread:
    """One long-lived OS thread that applies a shard's batches.

    The writer task hands a batch over through a queue and sleeps; the
    thread applies it and reschedules the task through trio's token (one
    write to the wakeup socket trio already polls). Against
    ``trio.to_thread.run_sync`` per commit this saves the thread cache's
    hand-off, the thread renaming per job and its locks.
    """

    def __init__(self, store: Store, shard: int) -> None:
        self.store = store
        self.shard = shard
        self._jobs: queue.SimpleQueue[tuple[list[WriteOp], trio.lowlevel.Task] | None] = queue.SimpleQueue()
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._work, name=f"relay-commit-{self.shard}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Let the thread end once the batch it may be applying is done."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    async def apply(self, ops: list[WriteOp]) -> list[object]:
        """``store.apply_batch(shard, ops)`` in the thread. Not cancellable:
        a commit in progress is finished, never abandoned."""
        assert self._thread is not None, "start() the commit thread first"
        self._jobs.put((ops, trio.lowlevel.current_task()))

        def abort(_: object) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED

        results: list[object] = await trio.lowlevel.wait_task_rescheduled(abort)
        return results

    def _work(self) -> None:
        assert self._token is not None
        token, jobs = self._token, self._jobs
        while True:
            job = jobs.get()
            if job is None:
                return
            ops, task = job
            result = outcome.capture(self.store.apply_batch, self.shard, ops)
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)


class GroupCommitWriter:
    def __init__(
        self,
        store: Store,
        shard: int,
        max_batch: int = 4096,
        queue_size: int = 4096,
        output_batch: OutputBatch | None = None,
        deliver: Deliver | None = None,
    ) -> None:
        self.store = store
        self.deliver = deliver
        # The callbacks of one commit queue output on many connections: it is
        # written once, when they have all run.
        self.output_batch = output_batch if output_batch is not None else OutputBatch()
        self.shard = shard
        self.max_batch = max_batch
        self.queue_size = queue_size
        # Ops from connections, in submit order; a batch takes them all at
        # once. A deque and an Event instead of a memory channel: a channel
        # costs a method call and its bookkeeping per op on both ends.
        self._queue: deque[tuple[WriteOp, Callback | None]] = deque()
        # The Event the writer waits on while it has nothing to do.
        self._idle: trio.Event | None = None
        # submit() callers waiting for room in a full queue, with their ops:
        # the writer moves those into the queue in call order, then wakes the
        # task (as trio's memory channels do; a woken task appending its own
        # op could overtake another, trio runs woken tasks in any order).
        self._blocked: dict[trio.lowlevel.Task, tuple[WriteOp, Callback | None]] = {}
        self._closing = False
        # Ops that commit callbacks queue (the next step of an ACK or a
        # fan-out): kept in commit order and taken first, without a task.
        self._followups: deque[tuple[WriteOp, Callback | None]] = deque()
        # Inbox deletes after ACKs, one per device (a later ACK replaces an
        # earlier one): they ride along with the next batch, or commit on
        # their own after LAZY_DELETE_S. Acked entries are already hidden by
        # the server's ack floors, so nothing waits on them.
        self._deletes: dict[tuple[str, int], tuple[DeleteUpTo, list[Callback]]] = {}
        # Group-body references released by those deletes, summed per body
        # (a fan-out to N members releases N times): committed with them.
        self._releases: dict[bytes, int] = {}
        # Delivered receipts by (sender, device to skip), merged across ACKs:
        # [tails, callbacks, created]. A fan-out to N members makes N receipts
        # for one sender; they commit as one op per batch, not N.
        self._receipts: dict[tuple[str, int | None], tuple[list[bytes], list[Callback], list[int]]] = {}
        self.batches = 0
        self.ops = 0
        self._committer = CommitThread(store, shard)

    async def submit(self, op: WriteOp, on_done: Callback | None = None) -> None:
        """Queue ``op``; waits only while the queue is full (backpressure).

        ``on_done(result)`` runs on the event loop after the commit, with the
        op's result or the exception it ended with. It must not block.
        Raises ``trio.ClosedResourceError`` once the relay is shutting down.
        """
        if self._closing:
            raise trio.ClosedResourceError("the writer is closed")
        # FIFO: nobody gets ahead of a submitter already waiting for room.
        if len(self._queue) < self.queue_size and not self._blocked:
            self._queue.append((op, on_done))
            self._kick()
            return
        task = trio.lowlevel.current_task()
        self._blocked[task] = (op, on_done)

        def abort(_: object) -> trio.lowlevel.Abort:
            # Only called while the op still waits here: it is never queued.
            del self._blocked[task]
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def submit_nowait(self, op: WriteOp, on_done: Callback | None = None) -> None:
        """Queue ``op`` if there is room; raises ``trio.WouldBlock`` when full and
        ``trio.ClosedResourceError`` once the relay is shutting down."""
        if self._closing:
            raise trio.ClosedResourceError("the writer is closed")
        if len(self._queue) >= self.queue_size or self._blocked:
            raise trio.WouldBlock
        self._queue.append((op, on_done))
        self._kick()

    def _kick(self) -> None:
        """Wake the writer if it waits for work (a busy one looks anyway)."""
        idle = self._idle
        if idle is not None:
            self._idle = None
            idle.set()

    def _admit_blocked(self) -> None:
        blocked, queue = self._blocked, self._queue
        while blocked and len(queue) < self.queue_size:
            task = next(iter(blocked))
            queue.append(blocked.pop(task))
            trio.lowlevel.reschedule(task)

    async def _wait_for_work(self) -> None:
        idle = self._idle = trio.Event()
        try:
            await idle.wait()
        finally:
            self._idle = None

    def submit_followup(self, op: WriteOp, on_done: Callback | None = None) -> None:
        """Queue ``op`` from a commit callback: never blocks, keeps call order.

        Bounded by what caused it (each follow-up is the next step of an op
        that was itself admitted through :meth:`submit`), so it skips the
        queue limit. Dropped silently once the relay is stopping.
        """
        if self._closed:
            return
        self._followups.append((op, on_done))
        self._kick()

    def submit_delete(self, op: DeleteUpTo, on_done: Callback) -> None:
        """Queue a cumulative inbox delete; merged with any pending one for the
        same device. ``on_done`` gets the merged op's result."""
        if self._closed:
            return
        key = (op.user, op.device)
        pending = self._deletes.get(key)
        if pending is None:
            self._deletes[key] = (op, [on_done])
            self._kick()  # an idle writer starts its timer
            return
        previous, callbacks = pending
        callbacks.append(on_done)
        if op.seq > previous.seq:
            self._deletes[key] = (op, callbacks)

    def submit_release(self, counts: dict[bytes, int]) -> None:
        """Queue group-body references to release; summed with pending ones and
        committed like the lazy deletes, as one :class:`ReleaseBodies`."""
        if self._closed:
            return
        releases = self._releases
        if not releases and not self._deletes:
            self._kick()  # an idle writer starts its timer
        for key, count in counts.items():
            releases[key] = releases.get(key, 0) + count

    def submit_receipts(self, user: str, skip_device: int | None, tails: list[bytes], created: int, on_done: Callback) -> None:
        """Queue RECEIPT tails for every device of ``user`` but ``skip_device``,
        merged with other receipts pending for the same devices; taken first
        by the next batch like follow-ups (never blocks, bounded by the ACKs
        that cause them). After the commit the appended entries go to
        ``deliver`` and ``on_done`` gets the merged op's result."""
        if self._closed:
            return
        key = (user, skip_device)
        pending = self._receipts.get(key)
        if pending is None:
            if not self._receipts:
                self._kick()
            self._receipts[key] = (list(tails), [on_done], [created])
            return
        pending[0].extend(tails)
        pending[1].append(on_done)
        pending[2][0] = max(pending[2][0], created)

    def _take_receipts(self) -> list[tuple[WriteOp, Callback | None]]:
        receipts = self._receipts
        self._receipts = {}
        return [
            (
                AppendEntries(user, RECEIPT, RECEIPT_FIELDS, tails, created[0], skip_device=skip),
                functools.partial(self._receipts_done, user, callbacks),
            )
            for (user, skip), (tails, callbacks, created) in receipts.items()
        ]

    def _receipts_done(self, user: str, callbacks: list[Callback], result: object) -> None:
        if isinstance(result, Appended) and self.deliver is not None:
            self.deliver(user, result.entries)
        for callback in callbacks:
            callback(result)

    def _lazy_pending(self) -> bool:
        return bool(self._deletes or self._releases)

    def _take_lazy(self) -> list[tuple[WriteOp, Callback | None]]:
        deletes = self._deletes
        self._deletes = {}
        taken: list[tuple[WriteOp, Callback | None]] = [
            (op, functools.partial(_call_all, callbacks)) for op, callbacks in deletes.values()
        ]
        if self._releases:
            taken.append((ReleaseBodies(self._releases), None))
            self._releases = {}
        return taken

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
        self._closing = True
        self._kick()
        blocked = self._blocked
        self._blocked = {}
        for task in blocked:
            trio.lowlevel.reschedule(task, outcome.Error(trio.ClosedResourceError("the writer is closed")))

    _closed = False

    def statistics(self) -> dict[str, Any]:
        return {"shard": self.shard, "batches": self.batches, "ops": self.ops, "queued": len(self._queue)}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._committer.start()
        try:
            task_status.started()
            await self._run()
        finally:
            self._committer.stop()

    async def _run(self) -> None:
        followups = self._followups
        queue = self._queue
        while True:
            flush_deletes = False
            if not queue and not followups and not self._receipts:
                if self._closing:
                    self._closed = True
                    if not self._lazy_pending():
                        return
                    flush_deletes = True
                elif self._lazy_pending():
                    with trio.move_on_after(LAZY_DELETE_S) as waited:
                        await self._wait_for_work()
                    flush_deletes = waited.cancelled_caught
                else:
                    await self._wait_for_work()
            # Follow-ups first: they continue work admitted earlier.
            batch: list[tuple[WriteOp, Callback | None]] = []
            if followups:
                batch = [followups.popleft() for _ in range(min(len(followups), self.max_batch))]
            if self._receipts:
                batch.extend(self._take_receipts())
            room = self.max_batch - len(batch)
            if queue and room > 0:
                if len(queue) <= room:
                    batch.extend(queue)
                    queue.clear()
                else:
                    batch.extend([queue.popleft() for _ in range(room)])
                if self._blocked:
                    self._admit_blocked()
            if self._lazy_pending() and (batch or flush_deletes):
                batch.extend(self._take_lazy())
            if not batch:
                continue
            ops = [op for op, _ in batch]
            results = await self._committer.apply(ops)
            self.batches += 1
            self.ops += len(ops)
            with self.output_batch:
                for (_, on_done), result in zip(batch, results, strict=True):
                    if on_done is not None:
                        try:
                            on_done(result)
                        except Exception:  # a bug in one callback must not stop the shard
                            log.exception("write callback failed")
