"""Fast unit tests of the pure core: router, window, session, handshake, store ops."""

from __future__ import annotations

import base64

import msgpack
import pytest

from relay.errors import CLOSE_POLICY, FrameError
from relay.protocol import frames
from relay.protocol.handshake import ServerHandshake, accept_key
from relay.protocol.session import MAX_MALFORMED, Session, SessionState
from relay.protocol.window import DeliveryWindow
from relay.server.router import Router
from relay.store.base import (
    AppendEntries,
    DeleteUpTo,
    ExpireEntries,
    InboxEntry,
    RegisterUser,
    Stored,
    StoreMessage,
)
from relay.store.lmdb_store import LmdbStore


def pack(*objs: object) -> bytes:
    return b"".join(msgpack.packb(o, use_bin_type=True) for o in objs)


# --- router -------------------------------------------------------------------


class FakeConn:
    """A Routable that records what the router asked of it."""

    def __init__(self, user: str, device: int | None) -> None:
        self.user = user
        self.device = device
        self.calls: list[object] = []

    def wake(self) -> None:
        self.calls.append("wake")

    def offer(self, entry: InboxEntry) -> None:
        self.calls.append(entry.seq)

    def push_ephemeral(self, frame: bytes) -> bool:
        return True

    def replace(self) -> None:
        pass

    def abort(self) -> None:
        pass


def entry(seq: int) -> InboxEntry:
    return InboxEntry(seq, 0, 0, 0, b"")


def test_router_one_device_then_several_then_none():
    router = Router()
    a1, a2, a1_again = FakeConn("alice", 1), FakeConn("alice", 2), FakeConn("alice", 1)
    assert router.attach(a1, "alice", 1) is None
    assert router.connection("alice", 1) is a1 and router.connection("alice", 2) is None
    assert router.attach(a1_again, "alice", 1) is a1  # replaced
    router.detach(a1, "alice", 1)  # the replaced one leaves: nothing changes
    assert router.connection("alice", 1) is a1_again
    assert router.attach(a2, "alice", 2) is None
    assert router.connection("alice", 1) is a1_again and router.connection("alice", 2) is a2
    assert sorted(c.device or 0 for c in router.devices_online("alice")) == [1, 2]
    assert router.count() == 2 and len(router.all()) == 2
    router.deliver("alice", ((1, entry(5)), (2, entry(6)), (3, entry(7))))
    router.wake("alice", [2, 3])
    router.wake("alice")
    assert a1_again.calls == [5, "wake"] and a2.calls == [6, "wake", "wake"]
    router.detach(a1_again, "alice", 1)
    router.detach(a2, "alice", 2)
    assert router.count() == 0 and router.devices_online("alice") == []
    router.deliver("alice", ((1, entry(8)),))  # nobody online: nothing to do
    router.wake("alice")


def test_router_files_a_connection_by_the_device_it_is_attached_as():
    # One whose device attribute does not say (a session not authenticated
    # yet) is filed under the device it was attached as, all the same.
    router = Router()
    anonymous, bob2 = FakeConn("bob", None), FakeConn("bob", 2)
    router.attach(anonymous, "bob", 1)
    assert router.connection("bob", 1) is anonymous and router.connection("bob", 2) is None
    router.deliver("bob", ((1, entry(1)),))
    assert anonymous.calls == [1]
    router.attach(bob2, "bob", 2)
    assert router.connection("bob", 2) is bob2
    router.detach(anonymous, "bob", 1)
    assert router.devices_online("bob") == [bob2]
    router.detach(bob2, "bob", 1)  # not its device: nothing changes
    assert router.devices_online("bob") == [bob2]


# --- window -------------------------------------------------------------------


def test_window_capacity_and_cumulative_ack():
    w = DeliveryWindow(3)
    for seq in (1, 2, 5):
        w.pushed(seq)
    assert w.capacity() == 0
    assert w.ack(2) == 2 and w.capacity() == 2
    assert w.ack(2) is None
    assert w.ack(100) == 5, "an ack beyond what was pushed covers only what was pushed"
    assert w.capacity() == 3
    with pytest.raises(ValueError):
        w.pushed(5)


# --- session ------------------------------------------------------------------


def test_session_requires_auth_first_and_closes():
    s = Session()
    (item,) = s.receive_message(pack([14, 1]))
    assert isinstance(item, FrameError) and item.code == 401 and item.close == CLOSE_POLICY
    assert s.state is SessionState.CLOSED
    assert s.receive_message(pack([14, 1])) == []


def test_session_auth_then_frames_and_batch_with_bad_frame():
    s = Session()
    (auth,) = s.receive_message(pack([1, "alice", 1, b"x" * 64]))
    assert isinstance(auth, frames.Auth)
    s.authenticated("alice", 1)
    items = s.receive_message(pack([14, 3], [99], [14, 4]))
    assert isinstance(items[0], frames.Ack) and items[0].seq == 3
    assert isinstance(items[1], FrameError) and items[1].code == 400 and items[1].ref == 99
    assert isinstance(items[2], frames.Ack) and items[2].seq == 4


def test_session_too_many_frames_drops_message():
    s = Session(max_frames_per_message=4)
    s.authenticated("a", 1)
    (item,) = s.receive_message(pack(*([[14, 1]] * 5)))
    assert isinstance(item, FrameError) and item.code == 413 and item.close is None


def test_session_malformed_budget_closes():
    s = Session()
    s.authenticated("a", 1)
    closes = []
    for _ in range(MAX_MALFORMED + 1):
        for item in s.receive_message(pack(["nope"])):
            assert isinstance(item, FrameError)
            closes.append(item.close)
    assert closes[-1] == CLOSE_POLICY and all(c is None for c in closes[:-1])


def test_session_garbage_after_good_frame():
    s = Session()
    s.authenticated("a", 1)
    items = s.receive_message(pack([14, 1]) + b"\xc1")
    assert isinstance(items[0], frames.Ack)
    assert isinstance(items[1], FrameError) and items[1].ref is None


def test_send_ref_is_msg_id_when_readable():
    mid = b"m" * 16
    with pytest.raises(FrameError) as info:
        frames.parse_frame([10, mid, "Bad User", {1: b""}])
    assert info.value.ref == mid
    with pytest.raises(FrameError) as info:
        frames.parse_frame([10, b"short", "bob", {1: b""}])
    assert info.value.ref == frames.SEND


# --- handshake ----------------------------------------------------------------

REQUEST = (
    b"GET /v1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


def test_handshake_accepts_and_keeps_trailing_bytes():
    outcome = ServerHandshake().receive_data(REQUEST + b"Sec-WebSocket-Protocol: relay.v1\r\n\r\n\x82\x80")
    assert outcome is not None and outcome.accepted
    assert outcome.trailing == b"\x82\x80"
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in outcome.response
    assert accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_handshake_needs_subprotocol_and_path():
    outcome = ServerHandshake().receive_data(REQUEST + b"\r\n")
    assert outcome is not None and not outcome.accepted and outcome.response.startswith(b"HTTP/1.1 400")
    outcome = ServerHandshake().receive_data(REQUEST.replace(b"/v1", b"/v2") + b"Sec-WebSocket-Protocol: relay.v1\r\n\r\n")
    assert outcome is not None and outcome.response.startswith(b"HTTP/1.1 404")


def test_handshake_incremental():
    hs = ServerHandshake()
    data = REQUEST + b"Sec-WebSocket-Protocol: x, relay.v1\r\n\r\n"
    for i in range(len(data) - 1):
        assert hs.receive_data(data[i : i + 1]) is None
    outcome = hs.receive_data(data[-1:])
    assert outcome is not None and outcome.accepted
    assert base64.b64decode(outcome.response.split(b"sec-websocket-accept: ")[1].split(b"\r\n")[0])


# --- store --------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    s = LmdbStore(tmp_path / "store", shards=2, map_size=64 << 20)
    yield s
    s.close()


def _apply(store: LmdbStore, op):
    (result,) = store.apply_batch(store.shard_of(getattr(op, "user", None) or op.to), [op])
    return result


def test_store_message_idempotent_and_ordered(store):
    assert _apply(store, RegisterUser("bob", b"k" * 32, 1)) is True
    assert isinstance(_apply(store, RegisterUser("bob", b"k" * 32, 1)), FrameError)
    op = StoreMessage("alice", 1, b"i" * 16, "bob", {1: b"p1"}, 1000)
    first = _apply(store, op)
    assert (first.ts, first.duplicate, first.devices) == (1000, False, (1,))
    assert [(d, e.seq) for d, e in first.entries] == [(1, 1)]
    again = _apply(store, StoreMessage("alice", 1, b"i" * 16, "bob", {1: b"other"}, 2000))
    assert again.duplicate and again.ts == 1000
    other_device = _apply(store, StoreMessage("alice", 2, b"i" * 16, "bob", {1: b"p2"}, 3000))
    assert not other_device.duplicate
    entries = store.read_inbox("bob", 1, 0, 10)
    assert [e.seq for e in entries] == [1, 2]
    assert frames.decode_tail(entries[1].tail)[-1] == b"p2"
    assert store.pending("bob", 1) == 2


def test_store_device_mismatch_and_unknown_user(store):
    _apply(store, RegisterUser("bob", b"k" * 32, 1))
    bad = _apply(store, StoreMessage("alice", 1, b"j" * 16, "bob", {1: b"", 7: b""}, 1))
    assert isinstance(bad, FrameError) and bad.code == 409 and bad.reason == "missing []; extra [7]"
    unknown = _apply(store, StoreMessage("alice", 1, b"j" * 16, "nobody", {1: b""}, 1))
    assert isinstance(unknown, FrameError) and unknown.code == 404
    assert store.pending("bob", 1) == 0


def test_store_delete_up_to_and_append(store):
    _apply(store, RegisterUser("bob", b"k" * 32, 1))
    for i in range(5):
        _apply(store, StoreMessage("alice", 1, bytes([i]) * 16, "bob", {1: b"x"}, i))
    assert _apply(store, DeleteUpTo("bob", 1, 3)) == 3
    assert [e.seq for e in store.read_inbox("bob", 1, 0, 10)] == [4, 5]
    assert store.pending("bob", 1) == 2
    appended = _apply(store, AppendEntries("bob", frames.RECEIPT, 5, [b"", b""], 9))
    assert appended.devices == (1,) and [e.seq for _, e in appended.entries] == [6, 7]
    assert [e.seq for e in store.read_inbox("bob", 1, 0, 10)] == [4, 5, 6, 7], "seq keeps increasing after deletes"


def test_store_expiry(store):
    _apply(store, RegisterUser("bob", b"k" * 32, 1))
    for i, ts in enumerate((100, 200, 5000)):
        _apply(store, StoreMessage("alice", 1, bytes([i]) * 16, "bob", {1: b"x"}, ts))
    shard = store.shard_of("bob")
    resume, deleted = store.apply_batch(shard, [ExpireEntries(1000, 1)])[0]
    assert deleted == 0 or resume is not None
    total = deleted
    while resume is not None:
        resume, deleted = store.apply_batch(shard, [ExpireEntries(1000, 1, resume)])[0]
        total += deleted
    assert total == 2
    assert [e.seq for e in store.read_inbox("bob", 1, 0, 10)] == [3]
    assert store.pending("bob", 1) == 1


def test_store_reopen_keeps_shard_count(tmp_path):
    s = LmdbStore(tmp_path / "s", shards=3, map_size=16 << 20)
    s.close()
    s = LmdbStore(tmp_path / "s", shards=7, map_size=16 << 20)
    assert s.shards == 3
    s.close()


def test_store_full_gives_store_full_error(tmp_path):
    from relay.errors import StoreFullError

    s = LmdbStore(tmp_path / "tiny", shards=1, map_size=256 << 10)
    _apply(s, RegisterUser("bob", b"k" * 32, 1))
    results = []
    for i in range(200):
        results.append(_apply(s, StoreMessage("alice", 1, i.to_bytes(16, "big"), "bob", {1: b"z" * 4000}, i)))
        if isinstance(results[-1], StoreFullError):
            break
    assert isinstance(results[-1], StoreFullError)
    stored = sum(isinstance(r, Stored) for r in results)
    assert len(s.read_inbox("bob", 1, 0, 1000)) == stored, "nothing acknowledged is lost"
    assert _apply(s, DeleteUpTo("bob", 1, 2)) == 2, "acks still work when full"
    s.close()


def test_fan_out_hands_over_the_entries_a_read_would_return(tmp_path):
    """Step 2 of SEND_GROUP returns, per member device, the MSG its pump would
    otherwise read back (reference resolved to the body): same seq, same bytes."""
    from relay.protocol.groups import GroupInfo
    from relay.store.base import CreateGroup, FannedOut, FanOut, GroupPrepared, PrepareGroupMessage

    s = LmdbStore(tmp_path / "store", shards=2, map_size=64 << 20)
    try:
        users = ["ann", "ben", "cat"]
        for user in users:
            s.apply_batch(s.shard_of(user), [RegisterUser(user, b"k" * 32, 1)])
        group = "g." + "A" * 22
        info = GroupInfo(group, "team", 1, tuple(users), ("ann",))
        g = s.shard_of(group)
        assert s.apply_batch(g, [CreateGroup(info, 1)]) == [info]
        # Something already waiting in ben's inbox: the reference gets seq 2.
        s.apply_batch(s.shard_of("ben"), [StoreMessage("cat", 1, b"m" * 16, "ben", {1: b"earlier"}, 5)])
        msg_id = b"i" * 16
        (prepared,) = s.apply_batch(g, [PrepareGroupMessage(group, "ann", 1, msg_id, b"secret", 7)])
        assert isinstance(prepared, GroupPrepared) and prepared.tail
        assert frames.decode_tail(prepared.tail) == [msg_id, "ann", 1, group, 7, b"secret"]
        for member in ("ben", "cat"):
            (fanned,) = s.apply_batch(
                s.shard_of(member), [FanOut(prepared.body_key, "ann", 1, [member], 7, prepared.tail)]
            )
            assert isinstance(fanned, FannedOut) and fanned.refs == 1
            ((user, ((device, handed),)),) = fanned.entries
            assert (user, device) == (member, 1)
            assert s.read_inbox(member, 1, handed.seq - 1, 1) == [handed]
        # A retry of the prepare (body stored, fan-out not complete) hands over the stored body.
        (again,) = s.apply_batch(g, [PrepareGroupMessage(group, "ann", 1, msg_id, b"secret", 99)])
        assert again.tail == prepared.tail and not again.complete
    finally:
        s.close()
