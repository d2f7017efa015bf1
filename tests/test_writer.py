"""The group-commit writer: follow-ups keep their order, ACK deletes merge per device."""

from __future__ import annotations

import trio

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
    applied: list[object] = []
    real_apply = store.apply_batch

    def spy(shard: int, ops: list[object]) -> list[object]:
        applied.extend(op for op in ops if isinstance(op, ReleaseBodies))
        return real_apply(shard, ops)  # type: ignore[arg-type]

    store.apply_batch = spy  # type: ignore[method-assign]
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
    appends: list[AppendEntries] = []
    real_apply = store.apply_batch

    def spy(shard: int, ops: list[object]) -> list[object]:
        appends.extend(op for op in ops if isinstance(op, AppendEntries))
        return real_apply(shard, ops)  # type: ignore[arg-type]

    store.apply_batch = spy  # type: ignore[method-assign]
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
