"""Group commit: one writer per shard, one transaction and one sync per batch.

Connections :meth:`submit` write ops with a callback; at the end of the
reactor's turn the writer takes every op waiting and hands them to the
shard's commit thread (:class:`CommitThread`, the transaction opened and
closed inside that one call). The thread posts the outcome back to the
reactor, whose next turn runs the callbacks, so a SENT goes out only after
its batch is durable. While one batch syncs, the next one gathers: under
load, batches grow by themselves and the cost of a sync is shared. No task
of the writer's own runs per batch: everything happens in reactor turns.
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
from relay.server.reactor import Reactor, Timer
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

    The writer hands a batch over through a queue; the thread applies it and
    posts the outcome to the reactor (one eventfd write, read in the
    reactor's next turn with every other ready socket and commit). Against
    ``trio.to_thread.run_sync`` per commit this saves the thread cache's
    hand-off, the thread renaming per job, its locks and a task switch.
    """

    def __init__(self, store: Store, shard: int) -> None:
        self.store = store
        self.shard = shard
        self._jobs: queue.SimpleQueue[tuple[list[WriteOp], Callable[[outcome.Outcome[list[object]]], None]] | None] = (
            queue.SimpleQueue()
        )
        self._reactor: Reactor | None = None
        self._thread: threading.Thread | None = None

    def start(self, reactor: Reactor) -> None:
        self._reactor = reactor
        self._thread = threading.Thread(target=self._work, name=f"relay-commit-{self.shard}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Let the thread end once the batch it may be applying is done."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    def apply(self, ops: list[WriteOp], done: Callable[[outcome.Outcome[list[object]]], None]) -> None:
        """``store.apply_batch(shard, ops)`` in the thread; ``done(outcome)`` runs
        in a reactor turn afterwards. A commit is never abandoned."""
        assert self._thread is not None, "start() the commit thread first"
        self._jobs.put((ops, done))

    def _work(self) -> None:
        assert self._reactor is not None
        post, jobs, apply_batch, shard = self._reactor.post, self._jobs, self.store.apply_batch, self.shard
        while True:
            job = jobs.get()
            if job is None:
                return
            ops, done = job
            post(done, outcome.capture(apply_batch, shard, ops))


class GroupCommitWriter:
    def __init__(
        self,
        store: Store,
        shard: int,
        max_batch: int = 4096,
        queue_size: int = 4096,
        reactor: Reactor | None = None,
        deliver: Deliver | None = None,
    ) -> None:
        self.store = store
        self.deliver = deliver
        # Batches are dispatched and their callbacks run in the reactor's
        # turns, so the output of a whole commit leaves in one turn. Without
        # one given (a writer on its own, in tests), run() runs its own.
        self._own_reactor = reactor is None
        self.reactor = reactor if reactor is not None else Reactor()
        self.shard = shard
        self.max_batch = max_batch
        self.queue_size = queue_size
        # Ops from connections, in submit order; a batch takes them all at
        # once. A deque and an Event instead of a memory channel: a channel
        # costs a method call and its bookkeeping per op on both ends.
        self._queue: deque[tuple[WriteOp, Callback | None]] = deque()
        # A batch is at the commit thread; the next one gathers meanwhile.
        self._busy = False
        # A dispatch is due at the end of the reactor's turn.
        self._scheduled = False
        # The lazy deletes' timer is set, and whether it has fired.
        self._lazy_timer: Timer | None = None
        self._lazy_due = False
        self._finished = trio.Event()
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
        """Dispatch at the end of the reactor's turn, unless a batch is at the
        thread (its completion dispatches the next)."""
        if not self._busy and not self._scheduled:
            self._scheduled = True
            self.reactor.soon(self._dispatch)

    def _admit_blocked(self) -> None:
        blocked, queue = self._blocked, self._queue
        while blocked and len(queue) < self.queue_size:
            task = next(iter(blocked))
            queue.append(blocked.pop(task))
            trio.lowlevel.reschedule(task)

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
        """No new ops; what is queued is committed, then :meth:`run` returns."""
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
        """Start the commit thread; return once :meth:`close` has been called
        and everything queued is committed."""
        async with trio.open_nursery() as nursery:
            if self._own_reactor:
                await nursery.start(self.reactor.run)
            self._committer.start(self.reactor)
            try:
                task_status.started()
                await self._finished.wait()
            finally:
                self._committer.stop()
            nursery.cancel_scope.cancel()

    def _dispatch(self) -> None:
        """Hand everything waiting to the commit thread as one batch."""
        self._scheduled = False
        if self._busy or self._finished.is_set():
            return
        queue, followups = self._queue, self._followups
        flush_lazy = self._lazy_due
        if not queue and not followups and not self._receipts and self._closing:
            self._closed = True
            flush_lazy = True
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
        if self._lazy_pending() and (batch or flush_lazy):
            batch.extend(self._take_lazy())
        if not self._lazy_pending():
            self._lazy_due = False
            if self._lazy_timer is not None:
                self._lazy_timer.cancel()
                self._lazy_timer = None
        if not batch:
            if self._closed:
                self._finished.set()
            elif self._lazy_pending() and self._lazy_timer is None:
                self._lazy_timer = self.reactor.call_later(LAZY_DELETE_S, self._lazy_fired)
            return
        self._busy = True
        self._committer.apply([op for op, _ in batch], functools.partial(self._completed, batch))

    def _lazy_fired(self) -> None:
        self._lazy_timer = None
        self._lazy_due = True
        self._kick()

    def _completed(self, batch: list[tuple[WriteOp, Callback | None]], result: outcome.Outcome[list[object]]) -> None:
        """In a reactor turn: the batch is durable (or failed); run its callbacks."""
        self._busy = False
        self.batches += 1
        self.ops += len(batch)
        try:
            results = result.unwrap()
        except Exception as exc:  # the store failed as a whole: every op gets the error
            log.exception("commit failed on shard %d", self.shard)
            results = [exc] * len(batch)
        for (_, on_done), op_result in zip(batch, results, strict=True):
            if on_done is not None:
                try:
                    on_done(op_result)
                except Exception:  # a bug in one callback must not stop the shard
                    log.exception("write callback failed")
        if self._queue or self._followups or self._receipts or self._closing or self._lazy_pending():
            self._kick()
