"""Acceptance (group messaging, point 3): kill -9 during a large fan-out; after
restart every member receives the message exactly once.

A SEND_GROUP is three committed steps (docs/protocol.md "Groups",
relay/server/groups.py): the body is stored once in the group's shard
(incomplete), every member shard commits its references together with a
fan-out marker, then the body is completed and only then SENT goes out. These
tests run ``relay serve`` as a subprocess (tests/relayproc.py) with 4 shards
and a group of 1,024 (the owner and 1,023 members, registered straight in the
store before the relay starts), pipeline 5 SEND_GROUPs and SIGKILL the relay
in the middle of their fan-out.

Hitting the middle: the 5 messages move through the steps together (the
writers batch them); the fan-out of 5 x 1,023 references starts ~3-18 ms
after the write and completes ~25-85 ms after it (2-CPU machine, ext4). Fixed
timings, 12 kills each per fast path: right after the write 0/12 landed
mid-fan-out (nothing stored yet), on the first SENT 0/12 (all complete), a
20 ms sleep 11-12/12 but only 7-8/12 with some shards done and others not,
40 ms 4-5/12; and the spread moves with the machine's load. So the test
watches the relay's LMDB files read-only from the test process (LMDB allows
readers in other processes; the test never writes while the relay runs) and
kills as soon as a body is still incomplete while at least one member shard
has committed its part: 24/24 kills landed mid-fan-out with some shards done
and others not. If a whole batch got SENT first (a miss), it is just a
delivered message and another batch is tried. After the kill a fresh view
records, per message, how far it got: body stored or not, complete or not,
which shards had fanned out.

Everything is counted at the wire level: MSG frames per (member, msg_id), no
client-side de-duplication; RECEIPTs per (msg_id, member) at the owner.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import pytest
import trio
from trio_websocket import ConnectionClosed

from relay.server.clock import now_ms
from relay.store.base import ENTRY_MSG_REF, RegisterUser, WriteOp, body_key, group_of_body, shard_of
from relay.store.lmdb_store import LmdbStore
from tests.relayproc import RelayProcess, spawn_relay
from tests.wire import User, WireClient

pytestmark = pytest.mark.slow

SHARDS = 4
MEMBERS = 1023  # plus the owner: a group of 1,024, the member limit
BATCH = 5  # SEND_GROUPs pipelined in one WebSocket message
MAX_ATTEMPTS = 4  # batches tried until the kill lands mid-fan-out
CONCURRENT_MEMBERS = 64
ERROR, SENT, MSG, RECEIPT, RES, EVENT = 4, 12, 13, 15, 21, 22
RELAY_ARGS = ["--shards", str(SHARDS)]

# Value layouts of the bodies / fanout / inbox databases (relay/store/lmdb_store.py).
_BODY_HEAD = struct.Struct(">qQB")  # refs (signed), created, complete
_ENTRY_HEAD = struct.Struct(">BBQ")  # type, count, created


@dataclass
class Message:
    msg_id: bytes
    payload: bytes
    key: bytes  # body key in the store


@dataclass
class AtKill:
    """How far one SEND_GROUP got when the relay died."""

    body: tuple[int, int, bool] | None  # (refs, created, complete), None: not stored
    shards_done: frozenset[int]  # member shards whose fan-out had committed

    @property
    def mid_fanout(self) -> bool:
        return self.body is not None and not self.body[2]

    def describe(self) -> str:
        if self.body is None:
            return "not stored"
        if self.body[2]:
            return "complete"
        return f"incomplete, {len(self.shards_done)}/{SHARDS} shards fanned out"


@dataclass
class Scenario:
    data: Path
    fastpath: str
    owner: User
    members: list[User]
    group: str = ""
    messages: list[Message] = field(default_factory=list)
    sent: dict[bytes, int] = field(default_factory=dict)  # msg_id -> ts of SENT
    at_kill: dict[bytes, AtKill] = field(default_factory=dict)
    attempts: int = 0


class StoreView:
    """A read-only view of a relay's LMDB shards, opened in the test process.

    LMDB supports readers in other processes, so this can watch a running
    relay; it never writes. Close it before opening the store for writing in
    this process (two environments on one path in one process break LMDB's
    locks).
    """

    def __init__(self, data: Path, shards: int = SHARDS) -> None:
        self.shards = shards
        self.envs = [
            lmdb.open(
                str(data / f"shard-{i:03d}"),
                readonly=True,
                lock=True,
                max_dbs=8,
                map_size=8 << 30,
                readahead=False,
            )
            for i in range(shards)
        ]
        self.dbs = [
            {
                name: env.open_db(name.encode(), create=False)
                for name in ("users", "inbox", "meta", "bodies", "fanout")
            }
            for env in self.envs
        ]

    def close(self) -> None:
        for env in self.envs:
            env.close()

    def body(self, key: bytes) -> tuple[int, int, bool] | None:
        i = shard_of(group_of_body(key), self.shards)
        with self.envs[i].begin(db=self.dbs[i]["bodies"]) as txn:
            raw = txn.get(key)
        if raw is None:
            return None
        refs, created, complete = _BODY_HEAD.unpack_from(raw)
        return refs, created, bool(complete)

    def shards_done(self, key: bytes) -> frozenset[int]:
        done = set()
        for i, env in enumerate(self.envs):
            with env.begin(db=self.dbs[i]["fanout"]) as txn:
                if txn.get(key) is not None:
                    done.add(i)
        return frozenset(done)

    def at_kill(self, key: bytes) -> AtKill:
        return AtKill(self.body(key), self.shards_done(key))

    def counts(self) -> dict[str, int]:
        """Entries per database, summed over the shards."""
        total: Counter[str] = Counter()
        for i, env in enumerate(self.envs):
            with env.begin() as txn:
                for name, db in self.dbs[i].items():
                    total[name] += txn.stat(db)["entries"]
        return dict(total)

    def inbox_refs(self) -> Counter[tuple[str, bytes]]:
        """(user, body key) -> references waiting in that user's inboxes."""
        refs: Counter[tuple[str, bytes]] = Counter()
        for i, env in enumerate(self.envs):
            with env.begin(db=self.dbs[i]["inbox"]) as txn:
                for key, value in txn.cursor():
                    if value[0] == ENTRY_MSG_REF:
                        user = bytes(key).split(b"\x00", 1)[0].decode()
                        refs[(user, bytes(value[_ENTRY_HEAD.size :]))] += 1
        return refs


def seed_store(data: Path) -> tuple[User, list[User]]:
    """Register the owner and the members straight in a new store (the relay is not running)."""
    owner = User("owner")
    members = [User(f"m{i:04d}") for i in range(MEMBERS)]
    store = LmdbStore(data, shards=SHARDS)
    try:
        by_shard: dict[int, list[WriteOp]] = {}
        now = now_ms()
        for user in (owner, *members):
            by_shard.setdefault(store.shard_of(user.name), []).append(
                RegisterUser(user.name, bytes(user.key.verify_key), now)
            )
        for shard, ops in by_shard.items():
            assert all(result is True for result in store.apply_batch(shard, ops))
    finally:
        store.close()
    return owner, members


def new_scenario(tmp_path: Path, fastpath: str) -> Scenario:
    data = tmp_path / "data"
    owner, members = seed_store(data)
    return Scenario(data, fastpath, owner, members)


async def read_owner(o: WireClient, sent: dict[bytes, int]) -> None:
    """Collect SENTs until the relay dies under us (anything but SENT/EVENT is a failure)."""
    with contextlib.suppress(ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
        while True:
            frame = await o.recv(timeout=120)
            assert frame[0] in (SENT, EVENT), f"owner got {frame!r}"
            if frame[0] == SENT:
                assert frame[1] not in sent, "SENT twice for one msg_id"
                sent[frame[1]] = frame[2]


async def kill_mid_fanout(
    relay: RelayProcess, view: StoreView, batch: list[Message], sent: dict[bytes, int]
) -> bool:
    """SIGKILL as soon as a body of ``batch`` is incomplete and at least one shard
    has committed its references; False if the whole batch got SENT first."""
    with trio.fail_after(30):
        while True:
            for message in batch:
                body = view.body(message.key)
                if body is not None and not body[2] and view.shards_done(message.key):
                    relay.kill()
                    return True
            if all(m.msg_id in sent for m in batch):
                return False
            await trio.sleep(0.0005)


async def crash_mid_fanout(sc: Scenario) -> StoreView:
    """Start the relay, create the group, pipeline SEND_GROUPs and SIGKILL it
    mid-fan-out; return a fresh view of the dead relay's store.

    Why fresh: LMDB readers take the latest transaction id from the shared
    lock file, which a writer updates only after its (synchronous) meta-page
    write. A writer killed inside that write leaves a commit that is durable
    and that a restarted relay uses, but that readers of a lock region kept
    open across the crash (the watcher) do not see. The first process to open
    an environment re-reads the newest meta page, so the watcher is closed
    once the relay is dead and the view that records the state at the kill
    (and stays open through the restart) is opened afterwards.
    """
    watcher = StoreView(sc.data)
    try:
        await _crash(sc, watcher)
    finally:
        watcher.close()
    view = StoreView(sc.data)
    try:
        _record_kill(sc, view)
    except BaseException:
        view.close()
        raise
    return view


async def _crash(sc: Scenario, view: StoreView) -> None:
    async with (
        spawn_relay(sc.data, fastpath=sc.fastpath, extra_args=RELAY_ARGS) as relay,
        sc.owner.online(relay.url) as o,
    ):
        names = [m.name for m in sc.members]
        res = await o.request(1, "group.create", {"name": "everyone", "members": names})
        assert res[2] is True, res
        sc.group = res[3]["group"]
        assert len(res[3]["members"]) == MEMBERS + 1
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_owner, o, sc.sent)
            for attempt in range(1, MAX_ATTEMPTS + 1):
                sc.attempts = attempt
                batch = []
                for _ in range(BATCH):
                    msg_id = os.urandom(16)
                    payload = b"%03d:" % len(sc.messages) + os.urandom(60)
                    message = Message(msg_id, payload, body_key(sc.group, "owner", 1, msg_id))
                    batch.append(message)
                    sc.messages.append(message)
                await o.send(*[[11, m.msg_id, sc.group, m.payload] for m in batch])
                if await kill_mid_fanout(relay, view, batch, sc.sent):
                    break
                # A miss: the batch is delivered like any message. Let its
                # markers go so they cannot be taken for the next batch's.
                with trio.fail_after(10):
                    while any(view.shards_done(m.key) for m in batch):
                        await trio.sleep(0.005)
            else:
                pytest.fail(
                    f"{MAX_ATTEMPTS} batches of {BATCH} SEND_GROUPs all completed before the kill"
                )
            assert await relay.wait() == -signal.SIGKILL
            nursery.cancel_scope.cancel()


def _record_kill(sc: Scenario, view: StoreView) -> None:
    for m in sc.messages:
        sc.at_kill[m.msg_id] = view.at_kill(m.key)
    states = Counter(a.describe() for a in sc.at_kill.values())
    print(
        f"\n[{sc.fastpath}] kill after attempt {sc.attempts}: "
        + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        + f"; SENT before the kill: {len(sc.sent)}"
    )
    assert any(a.mid_fanout for a in sc.at_kill.values()), "the kill did not land mid-fan-out"
    for m in sc.messages:
        state = sc.at_kill[m.msg_id]
        if m.msg_id in sc.sent:
            assert state.body is not None and state.body[2], "SENT for a body that was not complete"


def fanned_out_to(sc: Scenario, message: Message, name: str) -> bool:
    """Did ``name`` have a reference to ``message`` when the relay died?"""
    state = sc.at_kill[message.msg_id]
    if state.body is None:
        return False
    return state.body[2] or shard_of(name, SHARDS) in state.shards_done


def check_inboxes_at_kill(sc: Scenario, view: StoreView) -> None:
    """A shard's fan-out is all or nothing: its marker and its references commit together."""
    refs = view.inbox_refs()
    for m in sc.messages:
        for member in sc.members:
            expected = 1 if fanned_out_to(sc, m, member.name) else 0
            got = refs[(member.name, m.key)]
            assert got == expected, (
                f"{member.name} holds {got} references to message {m.payload[:3]!r}, expected {expected}"
            )


async def retry_unsent(
    o: WireClient, sc: Scenario, messages: Iterable[Message]
) -> dict[bytes, int]:
    """Re-send SEND_GROUPs with their msg_id (as the client library does); every one ends with SENT."""
    messages = list(messages)
    if not messages:
        return {}
    await o.send(*[[11, m.msg_id, sc.group, m.payload] for m in messages])
    retried: dict[bytes, int] = {}
    kept: list[list[object]] = []  # receipts and events, left for owner_drains_receipts
    with trio.fail_after(30):
        while len(retried) < len(messages):
            frame = await o.recv(timeout=30)
            if frame[0] in (EVENT, RECEIPT):
                kept.append(frame)
                continue
            assert frame[0] == SENT, f"retry answered {frame!r}"
            assert frame[1] not in retried, "SENT twice for one retry"
            retried[frame[1]] = frame[2]
    o.buffer[:0] = kept
    assert set(retried) == {m.msg_id for m in messages}
    for m in messages:
        state = sc.at_kill.get(m.msg_id)
        if state is not None and state.body is not None:
            assert retried[m.msg_id] == state.body[1], "a retry must answer the original ts"
    return retried


async def members_receive(
    url: str,
    sc: Scenario,
    expected: Callable[[User], set[bytes]],
    event: bool,
    deliveries: Counter[tuple[str, bytes]],
) -> None:
    """Every member AUTHs (at most CONCURRENT_MEMBERS at once), takes what READY
    announces, counts MSG frames per msg_id and acks; ``event``: the
    group.changed of the creation is still waiting (ignored, acked)."""
    by_id = {m.msg_id: m for m in sc.messages}
    limiter = trio.CapacityLimiter(CONCURRENT_MEMBERS)

    async def one(member: User) -> None:
        want = expected(member)
        async with limiter, member.online(url) as c:
            assert c.ready is not None
            pending = c.ready[3]
            mine: Counter[bytes] = Counter()
            last_seq = 0
            for _ in range(pending):
                frame = await c.recv(timeout=20)
                assert frame[1] > last_seq, "seq not increasing"
                last_seq = frame[1]
                if frame[0] == EVENT:
                    assert frame[2] == "group.changed" and event, frame
                    continue
                assert frame[0] == MSG, frame
                _, _seq, msg_id, from_user, from_device, group, _ts, payload = frame
                assert (from_user, from_device, group) == ("owner", 1, sc.group)
                assert msg_id in by_id and payload == by_id[msg_id].payload, (
                    "a MSG that was never sent"
                )
                mine[msg_id] += 1
            if last_seq:
                await c.send([14, last_seq])
            # Nothing beyond what READY announced (a duplicate would show here
            # or in ``pending``); the pause also lets the ACK be read.
            await c.expect_nothing(0.1)
        for msg_id, n in mine.items():
            deliveries[(member.name, msg_id)] += n
        assert pending == len(want) + (1 if event else 0), (
            f"{member.name} (shard {shard_of(member.name, SHARDS)}): READY pending {pending}, expected {len(want)} MSG; "
            f"got {[by_id[i].payload[:3] for i in mine]}; at kill {[(by_id[i].payload[:3], sorted(a.shards_done)) for i, a in sc.at_kill.items()]}"
        )
        assert want <= set(mine), f"{member.name} is missing {len(want - set(mine))} messages"

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for member in sc.members:
                nursery.start_soon(one, member)


def assert_exactly_once(
    deliveries: Counter[tuple[str, bytes]], expected: Callable[[User], set[bytes]], sc: Scenario
) -> None:
    twice = {k: n for k, n in deliveries.items() if n != 1}
    assert not twice, f"{len(twice)} (member, message) pairs delivered more than once"
    want = {(member.name, msg_id) for member in sc.members for msg_id in expected(member)}
    assert set(deliveries) == want, (
        f"{len(want - set(deliveries))} deliveries missing, {len(set(deliveries) - want)} unexpected"
    )


async def owner_drains_receipts(
    o: WireClient, sc: Scenario, deliveries: Counter[tuple[str, bytes]]
) -> None:
    """The owner takes every delivered RECEIPT (one per member per message it got) and acks."""
    receipts: Counter[tuple[str, bytes]] = Counter()
    expected = sum(deliveries.values())
    last_seq = 0
    with trio.fail_after(60):
        while sum(receipts.values()) < expected:
            frame = await o.recv(timeout=20)
            if frame[0] == RECEIPT:
                _, _seq, msg_id, by_user, by_device, status, _ts = frame
                assert by_device == 1 and status == 1, frame
                receipts[(by_user, msg_id)] += 1
            else:
                assert frame[0] == EVENT, frame
            last_seq = frame[1]
            if not o.buffer:
                await o.send([14, last_seq])
        await o.send([14, last_seq])
    await o.expect_nothing(0.3)
    assert receipts == deliveries, "one delivered receipt per member and message"


def leftover_markers(sc: Scenario) -> int:
    """Fan-out markers no retry will drop: those of messages complete at the kill.

    The relay drops a message's markers right after step 3; a kill between
    the two leaves them until the retention sweep (they are no longer needed:
    the body, or its idempotency record, answers a retry)."""
    return sum(len(a.shards_done) for a in sc.at_kill.values() if a.body is not None and a.body[2])


async def wait_clean(view: StoreView, bodies: int = 0, fanout: int = 0) -> dict[str, int]:
    """Wait until the inboxes are empty and only ``bodies``/``fanout`` records remain."""
    with trio.fail_after(20):
        while True:
            counts = view.counts()
            if counts["inbox"] == 0 and counts["bodies"] == bodies and counts["fanout"] == fanout:
                return counts
            await trio.sleep(0.05)


def final_store_check(sc: Scenario, fanout: int = 0, idem: int | None = None) -> dict[str, int]:
    """With the relay stopped: the store itself says nothing is left (but
    ``fanout`` markers and ``idem`` idempotency records, when given)."""
    store = LmdbStore(sc.data, shards=SHARDS)
    try:
        stats = store.stats()
        totals: Counter[str] = Counter()
        for shard in stats.values():
            totals.update(shard)
        assert totals["inbox"] == 0 and totals["bodies"] == 0 and totals["fanout"] == fanout, dict(
            totals
        )
        if idem is not None:
            assert totals["idem"] == idem, f"{totals['idem']} idempotency records, expected {idem}"
        assert all(store.pending(user.name, 1) == 0 for user in (sc.owner, *sc.members))
        return dict(totals)
    finally:
        store.close()


async def test_kill_mid_fanout_retry_delivers_exactly_once(
    tmp_path: Path, fastpath_name: str
) -> None:
    """The acceptance: kill -9 mid-fan-out, restart, the owner retries every
    SEND_GROUP without SENT (same msg_id); each ends with SENT (original ts),
    every member receives every message exactly once, the store ends clean."""
    sc = new_scenario(tmp_path, fastpath_name)
    view = await crash_mid_fanout(sc)
    try:
        check_inboxes_at_kill(sc, view)
        async with spawn_relay(sc.data, fastpath=fastpath_name, extra_args=RELAY_ARGS) as relay:
            async with sc.owner.online(relay.url) as o:
                unsent = [m for m in sc.messages if m.msg_id not in sc.sent]
                retried = await retry_unsent(o, sc, unsent)
                # SENT means every reference is there, once: one per member.
                for m in sc.messages:
                    refs, _created, complete = view.body(m.key) or (None, 0, False)
                    assert (refs, complete) == (MEMBERS, True), (
                        f"body {m.payload[:3]!r}: refs {refs}, complete {complete}"
                    )
                everything = {m.msg_id for m in sc.messages}
                deliveries: Counter[tuple[str, bytes]] = Counter()
                await members_receive(relay.url, sc, lambda _m: everything, True, deliveries)
                assert_exactly_once(deliveries, lambda _m: everything, sc)
                await owner_drains_receipts(o, sc, deliveries)
            await wait_clean(view, fanout=leftover_markers(sc))
            relay.terminate()
            assert await relay.wait(timeout=10) == 0
    finally:
        view.close()
    # Every body is gone; what stays is one idempotency record per message
    # (a retry from now on still gets the original SENT), swept with retention.
    totals = final_store_check(sc, fanout=leftover_markers(sc), idem=len(sc.messages))
    print(
        f"[{fastpath_name}] retried {len(retried)} of {len(sc.messages)}; "
        f"{sum(deliveries.values())} deliveries to {MEMBERS} members, each once; store after: {totals}"
    )


async def test_kill_mid_fanout_without_retry(
    tmp_path: Path, fastpath_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner never retries: a member whose shard had committed its part of
    the fan-out receives the message exactly once, the others never do.

    What happens to the incomplete body: the acks of the members who got it
    take its reference count below zero, but an incomplete body is never
    deleted by acks (only CompleteGroupMessage, which a retry would run, makes
    it deletable), so it stays, with the fan-out markers, until the retention
    period; the expiry sweep then deletes both. Shown here by a restart with
    a 1 s retention.
    """
    sc = new_scenario(tmp_path, fastpath_name)
    view = await crash_mid_fanout(sc)
    try:
        check_inboxes_at_kill(sc, view)

        def expected(member: User) -> set[bytes]:
            return {m.msg_id for m in sc.messages if fanned_out_to(sc, m, member.name)}

        incomplete = [m for m in sc.messages if sc.at_kill[m.msg_id].mid_fanout]
        async with spawn_relay(sc.data, fastpath=fastpath_name, extra_args=RELAY_ARGS) as relay:
            async with sc.owner.online(relay.url) as o:
                deliveries: Counter[tuple[str, bytes]] = Counter()
                await members_receive(relay.url, sc, expected, True, deliveries)
                assert_exactly_once(deliveries, expected, sc)
                await owner_drains_receipts(o, sc, deliveries)
            # Nobody drops the markers that were there at the kill (only a retry would).
            markers = sum(len(a.shards_done) for a in sc.at_kill.values())
            await wait_clean(view, bodies=len(incomplete), fanout=markers)
            for m in incomplete:
                got = sum(1 for (_name, msg_id) in deliveries if msg_id == m.msg_id)
                at_kill = sc.at_kill[m.msg_id].body
                assert at_kill is not None
                assert view.body(m.key) == (-got, at_kill[1], False), (
                    "an incomplete body stays, its count down by the acks"
                )
        print(
            f"[{fastpath_name}] no retry: {len(incomplete)} incomplete bodies; members that got each: "
            f"{[sum(1 for (_n, i) in deliveries if i == m.msg_id) for m in incomplete]}"
        )
        # Retention: a relay with a 1 s retention sweeps the leftovers away.
        monkeypatch.setenv("RELAY_SWEEP_INTERVAL_S", "0.2")
        async with spawn_relay(
            sc.data, fastpath=fastpath_name, extra_args=[*RELAY_ARGS, "--retention", "1"]
        ):
            await wait_clean(view)
    finally:
        view.close()
    final_store_check(sc)


async def test_late_retry_after_members_acked_delivers_nothing_twice(
    tmp_path: Path, fastpath_name: str
) -> None:
    """The owner retries only after the members who had a reference have taken
    and acked it (the body's count is then negative): the others receive it,
    nobody twice, and the store ends clean. Then the owner retries once more
    (its SENTs lost again) after everything was acked and the bodies deleted:
    the original SENT comes back and nothing is delivered or stored again.

    That last step used to fan every message out a second time with a new ts
    (the body was the only idempotency record); fixed in the store, which now
    keeps an idempotency record when it deletes a complete body."""
    sc = new_scenario(tmp_path, fastpath_name)
    view = await crash_mid_fanout(sc)
    try:

        def first_round(member: User) -> set[bytes]:
            return {m.msg_id for m in sc.messages if fanned_out_to(sc, m, member.name)}

        def second_round(member: User) -> set[bytes]:
            return {m.msg_id for m in sc.messages if not fanned_out_to(sc, m, member.name)}

        async with spawn_relay(sc.data, fastpath=fastpath_name, extra_args=RELAY_ARGS) as relay:
            deliveries: Counter[tuple[str, bytes]] = Counter()
            await members_receive(relay.url, sc, first_round, True, deliveries)
            async with sc.owner.online(relay.url) as o:
                unsent = [m for m in sc.messages if m.msg_id not in sc.sent]
                retried = await retry_unsent(o, sc, unsent)
                await members_receive(relay.url, sc, second_round, False, deliveries)
                assert_exactly_once(deliveries, lambda _m: {m.msg_id for m in sc.messages}, sc)
                await owner_drains_receipts(o, sc, deliveries)
                await wait_clean(view, fanout=leftover_markers(sc))
                # Every reference acked, every body gone. A retry now must still
                # be idempotent: the original ts, nothing stored, nothing delivered.
                again = await retry_unsent(o, sc, sc.messages)
                assert again == {**sc.sent, **retried}, "a late retry answers the original SENT"
                counts = view.counts()
                assert counts["inbox"] == 0 and counts["bodies"] == 0, (
                    f"a late retry stored something: {counts}"
                )
                await o.expect_nothing(0.3)
    finally:
        view.close()
    final_store_check(sc, fanout=leftover_markers(sc), idem=len(sc.messages))
