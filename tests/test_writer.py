"""The group-commit writer: follow-ups keep their order, ACK deletes merge per device."""

from __future__ import annotations

import threading
from typing import TypeVar

import pytest
import trio
import trio.testing

from relay.server.writer import LAZY_DELETE_S, GroupCommitWriter
from relay.store.base import (
    Appended,
    AppendEntries,
    DeleteUpTo,
    InboxEntry,
    RegisterUser,
    ReleaseBodies,
    StoreMessage,
)
from relay.store.lmdb_store import LmdbStore

T = TypeVar("T")


def _spy_ops(store: LmdbStore, kind: type[T]) -> list[T]:
    """The ops of type ``kind`` the store commits from now on, in order."""
    seen: list[T] = []
    real_apply = store.apply_batch

    def spy(shard: int, ops: list[object]) -> list[object]:
        seen.extend(op for op in ops if isinstance(op, kind))
        return real_apply(shard, ops)  # type: ignore[arg-type]

    store.apply_batch = spy  # type: ignore[method-assign]
    return seen


async def test_deletes_merge_per_device_and_ride_along(tmp_path):
    store = LmdbStore(tmp_path / "s", shards=1, map_size=32 << 20)
    writer = GroupCommitWriter(store, 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        assert await writer.call(RegisterUser("bob", b"k" * 32, 1)) is True
        for i in range(6):
            await writer.call(StoreMessage("alice", 1, bytes([i]) * 16, "bob", {1: b"x"}, i))
        ops_before = writer.ops
        results: list[object] = []
        for seq in (2, 4, 3):
            writer.submit_delete(DeleteUpTo("bob", 1, seq), results.append)
        # Nothing else to commit: the merged delete goes on its own after the delay.
        with trio.fail_after(5):
            while len(results) < 3:
                await trio.sleep(LAZY_DELETE_S / 4)
        assert results == [4, 4, 4], "one delete, up to the highest acked seq, answers every ACK"
        assert writer.ops == ops_before + 1
        assert [e.seq for e in store.read_inbox("bob", 1, 0, 10)] == [5, 6]
        # A pending delete rides along with the next ordinary batch.
        writer.submit_delete(DeleteUpTo("bob", 1, 5), results.append)
        await writer.call(StoreMessage("alice", 1, b"z" * 16, "bob", {1: b"y"}, 9))
        assert results[-1] == 1
        writer.close()
    store.close()


async def test_body_releases_sum_per_body_into_one_op(tmp_path):
    """Released group-body references are summed per body and committed as one
    ReleaseBodies, with the next batch or on their own after the delay."""
    store = LmdbStore(tmp_path / "s", shards=1, map_size=32 << 20)
    applied = _spy_ops(store, ReleaseBodies)
    writer = GroupCommitWriter(store, 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        writer.submit_release({b"g\x00a": 1})
        writer.submit_release({b"g\x00a": 2, b"g\x00b": 1})
        writer.submit_release({b"g\x00b": 4})
        with trio.fail_after(5):
            while not applied:
                await trio.sleep(LAZY_DELETE_S / 4)
        await trio.sleep(LAZY_DELETE_S * 2)
        assert len(applied) == 1
        assert applied[0].counts == {b"g\x00a": 3, b"g\x00b": 5}  # type: ignore[attr-defined]
        # Pending releases ride along with an ordinary batch.
        writer.submit_release({b"g\x00c": 1})
        await writer.call(RegisterUser("bob", b"k" * 32, 1))
        assert len(applied) == 2 and applied[1].counts == {b"g\x00c": 1}  # type: ignore[attr-defined]
        writer.close()
    store.close()


async def test_receipts_merge_per_sender_devices_in_order(tmp_path):
    """Receipts from several ACKs for one sender commit as one AppendEntries,
    tails in ACK order; each ACK's callback runs once, after the commit, and
    the stored entries are delivered once."""
    store = LmdbStore(tmp_path / "s", shards=1, map_size=32 << 20)
    appends = _spy_ops(store, AppendEntries)
    delivered: list[tuple[str, tuple[tuple[int, InboxEntry], ...]]] = []
    writer = GroupCommitWriter(store, 0, deliver=lambda user, entries: delivered.append((user, entries)))
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        assert await writer.call(RegisterUser("ann", b"k" * 32, 1)) is True
        done: list[tuple[str, object]] = []
        writer.submit_receipts("ann", None, [b"r1", b"r2"], 5, lambda r: done.append(("a", r)))
        writer.submit_receipts("ann", None, [b"r3"], 7, lambda r: done.append(("b", r)))
        writer.submit_receipts("ann", 1, [b"self"], 6, lambda r: done.append(("c", r)))
        with trio.fail_after(5):
            while len(done) < 3:
                await trio.sleep(0.01)
        merged = [op for op in appends if op.skip_device is None]
        assert len(merged) == 1 and merged[0].tails == [b"r1", b"r2", b"r3"] and merged[0].created == 7
        assert [op.tails for op in appends if op.skip_device == 1] == [[b"self"]]
        assert [name for name, _ in done] == ["a", "b", "c"]
        assert all(isinstance(result, Appended) for _, result in done)
        # Device 1 is ann's only device: the skipped one gets nothing.
        assert [(user, [e.tail for _, e in entries]) for user, entries in delivered] == [
            ("ann", [b"r1", b"r2", b"r3"]),
            ("ann", []),
        ]
        assert [e.tail for e in store.read_inbox("ann", 1, 0, 10)] == [b"r1", b"r2", b"r3"]
        writer.close()
    store.close()


async def test_a_full_queue_pushes_back_in_order_and_close_releases_waiters(tmp_path):
    """submit_nowait refuses a full queue, submit waits for room and keeps the
    order it was called in, and close() wakes a waiting submitter with
    ClosedResourceError after the queued ops are committed."""
    store = LmdbStore(tmp_path / "s", shards=1, map_size=32 << 20)
    gate = threading.Event()
    real_apply = store.apply_batch
    batches: list[list[bytes]] = []

    def gated(shard: int, ops: list[object]) -> list[object]:
        gate.wait(10)
        batches.append([op.msg_id for op in ops if isinstance(op, StoreMessage)])
        return real_apply(shard, ops)  # type: ignore[arg-type]

    store.apply_batch = gated  # type: ignore[method-assign]
    writer = GroupCommitWriter(store, 0, queue_size=2)
    done: list[bytes] = []

    def op(i: int) -> StoreMessage:
        return StoreMessage("alice", 1, bytes([i]) * 16, "bob", {1: b"x"}, i)

    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        writer.submit_nowait(op(0), lambda r: done.append(b"0"))
        await trio.testing.wait_all_tasks_blocked()  # the writer holds op 0 in the gated commit
        writer.submit_nowait(op(1), lambda r: done.append(b"1"))
        writer.submit_nowait(op(2), lambda r: done.append(b"2"))
        with pytest.raises(trio.WouldBlock):
            writer.submit_nowait(op(3))

        async def submit(i: int) -> None:
            await writer.submit(op(i), lambda r: done.append(bytes([48 + i])))

        nursery.start_soon(submit, 3)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(submit, 4)
        await trio.testing.wait_all_tasks_blocked()
        # A waiting submitter keeps its place: no nowait gets ahead of it.
        assert writer.statistics()["queued"] == 2
        with pytest.raises(trio.WouldBlock):
            writer.submit_nowait(op(5))
        gate.set()
        with trio.fail_after(10):
            while len(done) < 5:
                await trio.sleep(0.01)
        assert done == [b"0", b"1", b"2", b"3", b"4"]
        assert [ids[0][0] for ids in batches] == [0, 1, 3]

        # Closing wakes a submitter waiting for room; what was queued commits.
        gate.clear()
        writer.submit_nowait(op(6), lambda r: done.append(b"6"))
        await trio.testing.wait_all_tasks_blocked()
        writer.submit_nowait(op(7), lambda r: done.append(b"7"))
        writer.submit_nowait(op(8), lambda r: done.append(b"8"))
        refused: list[BaseException] = []

        async def refused_submit() -> None:
            try:
                await writer.submit(op(9))
            except trio.ClosedResourceError as exc:
                refused.append(exc)

        nursery.start_soon(refused_submit)
        await trio.testing.wait_all_tasks_blocked()
        writer.close()
        await trio.testing.wait_all_tasks_blocked()
        assert len(refused) == 1
        with pytest.raises(trio.ClosedResourceError):
            writer.submit_nowait(op(10))
        gate.set()
    assert done[-3:] == [b"6", b"7", b"8"]
    store.close()
