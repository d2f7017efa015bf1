"""Client library tests: the pure bookkeeping, identity and CLI helpers, then the
trio client against a scripted fake relay on loopback (no real relay needed),
for what a real relay will not do on demand: drop a connection at an exact
point, close 4409, answer 409 or 429, redeliver entries."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import pytest
import trio
import trio_websocket
from nacl.signing import SigningKey, VerifyKey

from relay.client import (
    AuthError,
    ConnectionClosed,
    DeviceIdentity,
    Event,
    Message,
    Receipt,
    ReceiptTally,
    RequestError,
    SendError,
    Signal,
    auth_signature,
    open_transport,
)
from relay.client.bookkeeping import (
    AckTracker,
    DedupeWindow,
    DeviceDirectory,
    InboxCursor,
    Outbox,
    OutgoingSend,
    ReadQueue,
)
from relay.client.cli import entry_to_json, parse_members
from relay.client.client import MAX_FRAMES_PER_MESSAGE, decode_frames, pack_messages
from relay.client.identity import normalize_server_url

# ------------------------------------------------------------------ identity


def test_identity_round_trip(tmp_path):
    ident = DeviceIdentity.generate("ws://127.0.0.1:9/v1", "alice")
    path = ident.save(tmp_path / "st")
    assert path.name == "state.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "st").st_mode) == 0o700
    assert os.listdir(tmp_path / "st") == ["state.json"]  # no temp file left
    loaded = DeviceIdentity.load(tmp_path / "st")
    assert (loaded.server_url, loaded.user, loaded.device) == (ident.server_url, "alice", 1)
    assert bytes(loaded.signing_key) == bytes(ident.signing_key)
    assert loaded.identity_key == bytes(ident.signing_key.verify_key)
    # Saving again replaces atomically and keeps the mode.
    loaded.device = 7
    loaded.save(tmp_path / "st")
    assert DeviceIdentity.load(tmp_path / "st").device == 7
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_identity_repr_hides_seed():
    ident = DeviceIdentity.generate("ws://h:1", "bob")
    seed_hex = bytes(ident.signing_key).hex()
    assert seed_hex not in repr(ident)
    assert ident.server_url == "ws://h:1/v1"


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"version": 2, "server_url": "ws://h/v1", "user": "a", "device": 1, "seed": ""},
        {"version": 1, "server_url": "ws://h/v1", "user": "a", "device": 0, "seed": "AAAA"},
        {"version": 1, "server_url": "ws://h/v1", "user": "a", "device": 1, "seed": "AAAA"},
        {"version": 1, "server_url": "ws://h/v1", "user": "a", "device": 1, "seed": "!!"},
    ],
)
def test_identity_rejects_bad_state(tmp_path, data):
    (tmp_path / "state.json").write_text(json.dumps(data))
    with pytest.raises(ValueError):
        DeviceIdentity.load(tmp_path)


def test_identity_missing_state(tmp_path):
    with pytest.raises(FileNotFoundError):
        DeviceIdentity.load(tmp_path)


def test_identity_rejects_bad_names():
    for bad in ["", "Alice", "a" * 65, "a b", "é"]:
        with pytest.raises(ValueError):
            DeviceIdentity.generate("ws://h:1/v1", bad)
    with pytest.raises(ValueError):
        DeviceIdentity.generate("http://h:1/v1", "alice")


def test_normalize_server_url():
    assert normalize_server_url("ws://h:1") == "ws://h:1/v1"
    assert normalize_server_url("wss://h/") == "wss://h/v1"
    assert normalize_server_url("ws://h:1/custom/v1") == "ws://h:1/custom/v1"


def test_auth_signature():
    key = SigningKey(bytes(range(32)))
    challenge = bytes(32)
    sig = auth_signature(key, "relay", challenge)
    assert len(sig) == 64
    VerifyKey(bytes(key.verify_key)).verify(b"relay-auth-v1" + b"relay" + challenge, sig)
    # Ed25519 is deterministic: the same inputs give the same signature, and
    # the server name is part of what is signed.
    assert auth_signature(key, "relay", challenge) == sig
    assert auth_signature(key, "other", challenge) != sig


# ------------------------------------------------------------------ dedupe / acks


def test_dedupe_window_is_bounded():
    window = DedupeWindow(3)
    assert window.add("a") and window.add("b") and window.add("c")
    assert not window.add("a")
    assert window.add("d")  # evicts "a"
    assert len(window) == 3
    assert "a" not in window and "d" in window
    assert window.add("a")  # forgotten, so new again


def test_ack_batches_by_count():
    acks = AckTracker(batch=3, delay=0.1)
    for seq in (1, 2, 3):
        acks.seen(seq, 0.0)
    assert acks.take(1, 0.0) is True  # became pending: wake the writer
    assert acks.take(2, 0.0) is False
    assert not acks.due(0.0)
    assert acks.take(3, 0.0) is True  # batch reached
    assert acks.due(0.0)
    assert acks.flush(0.0) == 3
    assert acks.pending() is None and acks.flush(1.0) is None


def test_ack_batches_by_time():
    acks = AckTracker(batch=100, delay=0.1)
    acks.seen(5, 10.0)
    acks.take(5, 10.0)
    assert acks.deadline() == pytest.approx(10.1)
    assert not acks.due(10.05) and acks.flush(10.05) is None
    assert acks.flush(10.05, force=True) == 5  # piggyback on other frames
    acks.seen(6, 11.0)
    acks.take(6, 11.0)
    assert acks.flush(11.2) == 6


def test_ack_is_clamped_to_what_this_connection_saw():
    acks = AckTracker(batch=2, delay=0.1)
    acks.seen(1, 0.0)
    acks.seen(2, 0.0)
    acks.take(1, 0.0)
    acks.take(2, 0.0)
    acks.new_connection()  # the ACK may have been lost with the old one
    assert acks.pending() is None  # nothing pushed here yet: an ACK would cover nothing
    assert acks.seen(1, 5.0) is True  # redelivered: ack it again
    assert acks.pending() == 1
    acks.seen(2, 5.0)
    assert acks.flush(5.2) == 2


def test_inbox_cursor_swallows_redeliveries():
    inbox = InboxCursor(batch=10, delay=0.1, dedupe_capacity=100)
    for seq in (1, 2):
        inbox.acks.seen(seq, 0.0)
    assert inbox.take(1, ("a", 1, b"m1"), 0.0)[0]
    assert inbox.take(2, None, 0.0)[0]  # a receipt
    assert not inbox.take(2, None, 0.0)[0]  # same seq again
    # The same message stored twice under another seq is still a duplicate.
    inbox.acks.seen(3, 0.0)
    assert not inbox.take(3, ("a", 1, b"m1"), 0.0)[0]
    assert inbox.duplicates == 2
    assert inbox.acks.pending() == 3  # duplicates are acked all the same
    # Another device's message with the same id is another message.
    inbox.acks.seen(4, 0.0)
    assert inbox.take(4, ("a", 2, b"m1"), 0.0)[0]


def test_read_queue_resends_recent_reads_after_a_drop():
    reads = ReadQueue(capacity=2, resend_window=10.0)
    reads.push(b"r1")
    reads.push(b"r2")
    assert reads.full()
    assert reads.take(0.0, limit=1) == [b"r1"]
    assert reads.take(5.0, limit=10) == [b"r2"]
    reads.push(b"r3")
    # r1 was written long enough ago to have been handled; r2 maybe not.
    assert reads.connection_lost(12.0) == 1
    assert reads.take(12.0, limit=10) == [b"r2", b"r3"]
    assert reads.connection_lost(30.0) == 0


# ------------------------------------------------------------------ outbox


def _decode(frame: bytes) -> list[Any]:
    return msgpack.unpackb(frame, raw=False, strict_map_key=False)


def _ids(batch) -> list[bytes]:
    return [item.msg_id for item, _ in batch.frames]


def _mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def test_outbox_looks_up_then_sends_in_order():
    outbox, directory = Outbox(), DeviceDirectory()
    for n in range(3):
        outbox.add(OutgoingSend(_mid(n), "bob", b"p%d" % n))
    outbox.add(OutgoingSend(_mid(9), "g." + "A" * 22, b"grp", group=True))
    batch = outbox.next_batch(directory, 1, 0.0)
    assert batch.lookups == {"bob"}
    assert _ids(batch) == [_mid(9)]  # a group needs no lookup and is not behind bob
    directory.start_fetch("bob")
    assert outbox.next_batch(directory, 1, 0.0).lookups == set()  # already fetching
    directory.set("bob", [2, 1])
    batch = outbox.next_batch(directory, 1, 0.0)
    assert _ids(batch) == [_mid(0), _mid(1), _mid(2)]
    assert _decode(batch.frames[0][1]) == [10, _mid(0), "bob", {1: b"p0", 2: b"p0"}]
    # On the wire now: nothing more to send on this connection...
    assert outbox.next_batch(directory, 1, 0.0).frames == []
    # ...but everything again, same ids, same order, on the next one.
    assert _ids(outbox.next_batch(directory, 2, 0.0)) == [_mid(0), _mid(1), _mid(2), _mid(9)]
    assert outbox.on_sent(_mid(1)).msg_id == _mid(1)
    assert outbox.on_sent(_mid(1)) is None
    assert len(outbox) == 3
    with pytest.raises(ValueError):
        outbox.add(OutgoingSend(_mid(0), "bob", b""))


def test_outbox_conflict_refreshes_and_keeps_order():
    outbox, directory = Outbox(max_conflicts=2), DeviceDirectory()
    directory.set("bob", [1])
    for n in range(3):
        outbox.add(OutgoingSend(_mid(n), "bob", b"x"))
    assert len(outbox.next_batch(directory, 1, 0.0).frames) == 3
    # The relay says bob has other devices: the first 409 drops the cache...
    verdict = outbox.on_error(_mid(0), 409, "missing [2]", directory, 0.0)
    assert verdict is not None and not verdict.final
    assert directory.get("bob") is None
    batch = outbox.next_batch(directory, 1, 0.0)
    assert batch.lookups == {"bob"} and batch.frames == []
    directory.start_fetch("bob")
    directory.set("bob", [1, 2])
    # ...msg 0 goes again with the new set; 1 and 2 were built from the old
    # set and are still on the wire: they wait for their own 409.
    batch = outbox.next_batch(directory, 1, 0.0)
    assert _ids(batch) == [_mid(0)]
    assert _decode(batch.frames[0][1])[3] == {1: b"x", 2: b"x"}
    outbox.on_error(_mid(1), 409, "missing [2]", directory, 0.0)
    assert directory.get("bob") is not None  # already refreshed: no new lookup
    outbox.add(OutgoingSend(_mid(3), "bob", b"x"))
    # 1 goes again; 3 must not overtake 2, still on the wire with the stale set.
    assert _ids(outbox.next_batch(directory, 1, 0.0)) == [_mid(1)]
    outbox.on_error(_mid(2), 409, "missing [2]", directory, 0.0)
    assert _ids(outbox.next_batch(directory, 1, 0.0)) == [_mid(2), _mid(3)]
    # Too many conflicts is final.
    assert not outbox.on_error(_mid(0), 409, "again", directory, 0.0).final
    verdict = outbox.on_error(_mid(0), 409, "and again", directory, 0.0)
    assert verdict.final and _mid(0) not in outbox


def test_outbox_backs_off_on_429_and_fails_other_errors():
    outbox, directory = Outbox(retry_base=1.0, max_retries=1), DeviceDirectory()
    directory.set("bob", [1])
    directory.set("carol", [1])
    outbox.add(OutgoingSend(_mid(0), "bob", b""))
    outbox.add(OutgoingSend(_mid(1), "bob", b""))
    outbox.add(OutgoingSend(_mid(2), "carol", b""))
    outbox.next_batch(directory, 1, 0.0)
    assert not outbox.on_error(_mid(0), 429, "slow down", directory, 10.0).final
    assert outbox.next_deadline() == 11.0
    assert outbox.next_batch(directory, 1, 10.5).frames == []  # 1 waits behind 0
    assert _ids(outbox.next_batch(directory, 1, 11.0)) == [_mid(0)]
    assert outbox.on_error(_mid(0), 503, "full", directory, 12.0).final  # retries used up
    assert outbox.on_error(_mid(2), 404, "no such user", directory, 12.0).final
    assert [i.msg_id for i in outbox] == [_mid(1)]


def test_outbox_excludes_own_device_and_fails_oversized():
    outbox, directory = Outbox(max_frame_bytes=1000), DeviceDirectory()
    directory.set("alice", [1, 2, 3])
    directory.set("bob", [1, 2])
    outbox.add(OutgoingSend(_mid(0), "alice", b"note"))
    outbox.add(OutgoingSend(_mid(1), "bob", b"x" * 600))  # 2 copies > 1000 bytes
    outbox.add(OutgoingSend(_mid(2), "bob", b"x" * 100))
    batch = outbox.next_batch(directory, 1, 0.0, sender=("alice", 2))
    assert _decode(batch.frames[0][1])[3] == {1: b"note", 3: b"note"}
    assert [(i.msg_id, code) for i, code, _ in batch.failed] == [(_mid(1), 413)]
    assert _ids(batch) == [_mid(0), _mid(2)]
    # A note to self from one's only device has nobody to go to.
    outbox.on_sent(_mid(0))
    directory.set("alice", [2])
    outbox.add(OutgoingSend(_mid(3), "alice", b"note"))
    batch = outbox.next_batch(directory, 1, 0.0, sender=("alice", 2))
    assert [(i.msg_id, code) for i, code, _ in batch.failed] == [(_mid(3), 404)]


def test_outbox_batch_limits():
    outbox, directory = Outbox(), DeviceDirectory()
    directory.set("bob", [1])
    for n in range(10):
        outbox.add(OutgoingSend(_mid(n), "bob", b"y" * 100))
    assert len(outbox.next_batch(directory, 1, 0.0, max_frames=4).frames) == 4
    assert len(outbox.next_batch(directory, 1, 0.0, max_bytes=300).frames) == 2
    assert _ids(outbox.next_batch(directory, 1, 0.0))[0] == _mid(6)


def test_pack_messages_and_decode_frames():
    frames = [msgpack.packb([14, n]) for n in range(MAX_FRAMES_PER_MESSAGE + 5)]
    messages = pack_messages(frames)
    assert len(messages) == 2
    decoded = [f for m in messages for f in decode_frames(m)]
    assert decoded == [[14, n] for n in range(MAX_FRAMES_PER_MESSAGE + 5)]
    # Non-frames are dropped; garbage ends the message but keeps what came before.
    data = msgpack.packb([12, b"x", 1]) + msgpack.packb("str") + b"\xc1" + msgpack.packb([3])
    assert decode_frames(data) == [[12, b"x", 1]]


# ------------------------------------------------------------------ CLI helpers


def test_entry_to_json():
    text = {"type": "text", "ts": 5, "body": "yo"}
    msg = Message(4, b"\x01" * 16, "alice", 2, None, 123, b"ct", plaintext=text)
    assert entry_to_json(msg) == {
        "type": "message",
        "from": "alice",
        "device": 2,
        "msg_id": "01" * 16,
        "ts": 123,
        "text": "yo",
    }
    group = "g." + "a" * 22
    refused = entry_to_json(Message(5, b"\x02" * 16, "alice", 2, group, 1, b"\x00", error="cannot decrypt: BadMacError"))
    assert refused["error"] == "cannot decrypt: BadMacError" and refused["group"] == group
    assert "text" not in refused and "payload" not in refused
    odd = entry_to_json(Message(5, b"\x02" * 16, "eve", 1, None, 1, b"", plaintext={"type": "poll", "ts": 1, "q": b"\xff"}))
    assert odd["unsupported"] == "poll" and odd["plaintext"]["q"] == "/w=="
    flagged = entry_to_json(Message(6, b"\x03" * 16, "bob", 1, None, 1, b"", plaintext=text, identity_changed=True))
    assert flagged["identity_changed"] is True
    receipt = entry_to_json(Receipt(6, b"\x01" * 16, "bob", 1, 2, 9))
    assert receipt["status"] == "read" and receipt["by"] == "bob"
    event = entry_to_json(Event(7, "keys.low", {"count": 3, "k": b"\xff"}, 1))
    assert event["body"] == {"count": 3, "k": "/w=="}
    assert entry_to_json(Signal("bob", "alice", "typing"))["type"] == "signal"


def test_group_event_json_is_strict_json():
    group = "g." + "b" * 22
    body = {
        "group": group,
        "version": 3,
        "name": "team",
        "members": ["ann", "ben"],
        "admins": ["ann"],
        "actor": "ann",
        # Not in a group.changed today; must still print as strict JSON.
        b"k": [b"\x00", float("nan"), msgpack.ExtType(5, b"\x01"), 1.5, None, True],
        7: {"x": float("inf")},
    }
    line = entry_to_json(Event(8, "group.changed", body, 11))
    text = json.dumps(line, allow_nan=False)  # raises on anything not strict JSON
    assert json.loads(text) == {
        "type": "event",
        "kind": "group.changed",
        "ts": 11,
        "body": {
            "group": group,
            "version": 3,
            "name": "team",
            "members": ["ann", "ben"],
            "admins": ["ann"],
            "actor": "ann",
            "aw==": ["AA==", "nan", {"ext": 5, "data": "AQ=="}, 1.5, None, True],
            "7": {"x": "inf"},
        },
    }


def test_parse_members():
    assert parse_members("a,b, c,,") == ["a", "b", "c"]
    assert parse_members("") == []


def _receipt(msg_id: bytes, user: str, device: int, status: int, seq: int = 1) -> Receipt:
    return Receipt(seq, msg_id, user, device, status, 0)


def test_receipt_tally_counts_distinct_devices():
    tally = ReceiptTally()
    m = _mid(1)
    tally.track(m, expected=4)
    assert tally.counts(m).describe() == "delivered to 0 of 4"
    assert tally.add(_receipt(m, "ben", 1, Receipt.DELIVERED))
    assert not tally.add(_receipt(m, "ben", 1, Receipt.DELIVERED)), "a repeat counts once"
    assert tally.add(_receipt(m, "ben", 2, Receipt.DELIVERED)), "another device of ben"
    assert tally.add(_receipt(m, "cat", 1, Receipt.READ)), "read without delivered first"
    assert not tally.add(_receipt(m, "cat", 1, Receipt.DELIVERED)), "late delivered after read"
    assert tally.add(_receipt(m, "ben", 1, Receipt.READ))
    counts = tally.counts(m)
    assert (counts.delivered, counts.read, counts.expected) == (3, 2, 4)
    assert counts.describe() == "delivered to 3 of 4, read by 2"
    assert tally.devices(m) == [("ben", 1), ("ben", 2), ("cat", 1)]
    assert tally.devices(m, Receipt.READ) == [("ben", 1), ("cat", 1)]
    # Status 0 or unknown ids change nothing; status above 2 counts as read.
    assert not tally.add(_receipt(m, "dan", 1, 0))
    assert not tally.add(_receipt(_mid(2), "ben", 1, Receipt.DELIVERED))
    assert tally.add(_receipt(m, "dan", 1, 3))
    assert tally.counts(m).describe() == "delivered to 4 of 4, read by 3"
    # Tracking again keeps the counts, can set expected later.
    tally.track(m)
    assert tally.counts(m).expected == 4
    tally.track(m, expected=5)
    assert tally.counts(m).describe() == "delivered to 4 of 5, read by 3"


def test_receipt_tally_is_bounded():
    tally = ReceiptTally(max_messages=2)
    for n in (1, 2, 3):
        tally.track(_mid(n))
    assert len(tally) == 2 and _mid(1) not in tally and _mid(3) in tally
    assert not tally.add(_receipt(_mid(1), "ben", 1, Receipt.DELIVERED))
    with pytest.raises(KeyError):
        tally.counts(_mid(1))
    assert tally.counts(_mid(2)).describe() == "delivered to 0"
    tally.forget(_mid(2))
    tally.forget(_mid(2))
    assert len(tally) == 1
    with pytest.raises(ValueError):
        ReceiptTally(max_messages=0)
    with pytest.raises(ValueError):
        tally.track(_mid(4), expected=-1)


# ------------------------------------------------------------------ fake relay


def _pack(*frames: Any) -> bytes:
    return b"".join(msgpack.packb(f, use_bin_type=True) for f in frames)


class FakeConn:
    """The relay side of one connection, after READY. ``recv`` answers
    ``devices.list`` from ``relay.devices`` by itself (not returning it) and
    records ACKs (returning them too)."""

    def __init__(self, relay: FakeRelay, ws: trio_websocket.WebSocketConnection, n: int) -> None:
        self.relay = relay
        self.ws = ws
        self.n = n
        self.acks: list[int] = []
        self._buffer: list[list[Any]] = []

    async def send(self, *frames: Any) -> None:
        await self.ws.send_message(_pack(*frames))

    async def recv(self, timeout: float = 5.0) -> list[Any]:
        with trio.fail_after(timeout):
            while True:
                while not self._buffer:
                    data = await self.ws.get_message()
                    self._buffer.extend(decode_frames(data))
                frame = self._buffer.pop(0)
                self.relay.log.append((self.n, frame))
                if frame[0] == 14:
                    self.acks.append(frame[1])
                if frame[0] == 20 and frame[2] == "devices.list" and self.relay.auto_devices:
                    user = frame[3]["user"]
                    if user in self.relay.devices:
                        devices = [
                            {"device": d, "identity_key": bytes(32)}
                            for d in self.relay.devices[user]
                        ]
                        await self.send([21, frame[1], True, {"devices": devices}])
                    else:
                        await self.send(
                            [21, frame[1], False, {"code": 404, "reason": "no such user"}]
                        )
                    continue
                return frame

    async def recv_type(self, ftype: int, timeout: float = 5.0) -> list[Any]:
        while True:
            frame = await self.recv(timeout)
            if frame[0] == ftype:
                return frame

    async def wait_ack(self, seq: int, timeout: float = 5.0) -> None:
        with trio.fail_after(timeout):
            while not self.acks or self.acks[-1] < seq:
                await self.recv(timeout)

    async def idle(self) -> None:
        """Serve devices.list and record ACKs until the client goes away."""
        try:
            while True:
                await self.recv(timeout=3600)
        except trio_websocket.ConnectionClosed:
            pass


Script = Callable[[FakeConn], Awaitable[None]]


class FakeRelay:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.url = ""
        self.users: dict[str, bytes] = {}  # user -> identity key
        self.devices: dict[str, list[int]] = {"bob": [1]}
        self.auto_devices = True
        self.lose_ready = False
        self.drop_handshake = False
        self.connections = 0
        self.pending = 0
        self.log: list[tuple[int, list[Any]]] = []
        self.events: dict[int, trio.Event] = {}

    def reached(self, name: int) -> trio.Event:
        return self.events.setdefault(name, trio.Event())

    async def handler(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept(subprotocol="relay.v1")
        self.connections += 1
        n = self.connections
        challenge = os.urandom(32)
        try:
            await ws.send_message(_pack([0, 1, "fake", challenge, 0]))
            frame = decode_frames(await ws.get_message())[0]
            if self.drop_handshake:  # the connection dies before any reply
                self.drop_handshake = False
                await ws.aclose(1011)
                return
            if frame[0] == 2:
                user, key, sig = frame[1], frame[2], frame[3]
                if user in self.users:
                    await ws.send_message(_pack([4, 2, 409, "user taken"]))
                    await ws.aclose(1008)
                    return
                self.users[user] = key
                device = 1
                if self.lose_ready:  # registered, but the READY never arrives
                    self.lose_ready = False
                    await ws.aclose(1011)
                    return
            else:
                user, device, sig = frame[1], frame[2], frame[3]
                key = self.users.get(user, bytes(32))
            try:
                VerifyKey(key).verify(b"relay-auth-v1fake" + challenge, sig)
            except Exception:
                await ws.send_message(_pack([4, frame[0], 401, "bad signature"]))
                await ws.aclose(1008)
                return
            await ws.send_message(_pack([3, user, device, self.pending]))
            await self.script(FakeConn(self, ws, n))
            await ws.aclose()
        except trio_websocket.ConnectionClosed:
            pass


@asynccontextmanager
async def fake_relay(script: Script) -> AsyncIterator[FakeRelay]:
    relay = FakeRelay(script)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            trio_websocket.serve_websocket, relay.handler, "127.0.0.1", 0, None
        )
        relay.url = f"ws://127.0.0.1:{server.port}/v1"
        yield relay
        nursery.cancel_scope.cancel()


def _alice(relay: FakeRelay) -> DeviceIdentity:
    ident = DeviceIdentity.generate(relay.url, "alice")
    relay.users["alice"] = ident.identity_key
    return ident


async def test_fake_send_receive_and_ack():
    async def script(conn: FakeConn) -> None:
        send = await conn.recv_type(10)
        assert send[2] == "bob" and send[3] == {1: b"hello"}
        await conn.send([12, send[1], 1234])
        await conn.send(
            [13, 1, b"m" * 16, "bob", 1, None, 5, b"hi"],
            [15, 2, send[1], "bob", 1, 1, 6],
            [22, 3, "keys.low", {"count": 2}, 7],
            [31, "bob", "alice", "typing"],
        )
        await conn.wait_ack(3)
        conn.relay.reached(1).set()
        await conn.idle()

    async with fake_relay(script) as relay:
        relay.pending = 4
        async with open_transport(_alice(relay), connect_timeout=5) as client:
            assert client.pending == 4 and client.user == "alice" and client.device == 1
            msg_id, ts = await client.send("bob", b"hello")
            assert ts == 1234 and len(msg_id) == 16
            got = []
            with trio.fail_after(5):
                async for entry in client.entries():
                    got.append(entry)
                    if len(got) == 4:
                        break
            kinds = sorted(type(e).__name__ for e in got)
            assert kinds == ["Event", "Message", "Receipt", "Signal"]
            with trio.fail_after(5):
                await relay.reached(1).wait()  # acked within the 100 ms batching delay
    # Once per batch, not per entry.
    acks = [f for _, f in relay.log if f[0] == 14]
    assert acks == [[14, 3]]


async def test_fake_register_and_auth_errors():
    async def script(conn: FakeConn) -> None:
        await conn.idle()

    async with fake_relay(script) as relay:
        ident = DeviceIdentity.generate(relay.url, "carol")
        async with open_transport(ident, register=True, connect_timeout=5) as client:
            assert client.device == 1
        assert relay.users["carol"] == ident.identity_key
        with pytest.raises(AuthError) as info:
            async with open_transport(DeviceIdentity.generate(relay.url, "carol"), register=True):
                pass
        assert info.value.code == 409
        with pytest.raises(AuthError) as info:
            async with open_transport(DeviceIdentity.generate(relay.url, "carol")):
                pass
        assert info.value.code == 401


async def test_fake_register_whose_ready_was_lost():
    async def script(conn: FakeConn) -> None:
        await conn.idle()

    async with fake_relay(script) as relay:
        relay.lose_ready = True
        ident = DeviceIdentity.generate(relay.url, "dave")
        # The retry's REGISTER gets 409 (the first one worked): AUTH with the key.
        async with open_transport(ident, register=True, connect_timeout=5) as client:
            assert client.device == 1
        assert relay.connections == 3
        # Someone else's name stays taken: 409 from REGISTER, then 401 from the
        # AUTH fallback, reported as 409.
        relay.drop_handshake = True
        with pytest.raises(AuthError) as info:
            async with open_transport(DeviceIdentity.generate(relay.url, "dave"), register=True):
                pass
        assert info.value.code == 409
        assert relay.connections == 6


async def test_fake_cannot_connect():
    ident = DeviceIdentity.generate("ws://127.0.0.1:1/v1", "alice")
    with trio.fail_after(5), pytest.raises(ConnectionClosed) as info:
        async with open_transport(ident, connect_timeout=0.5):
            pass
    assert "cannot connect" in info.value.reason


async def test_fake_reconnect_resends_same_ids_in_order():
    first: list[bytes] = []

    async def script(conn: FakeConn) -> None:
        if conn.n == 1:
            for _ in range(3):
                first.append((await conn.recv_type(10))[1])
            conn.relay.reached(1).set()
            await conn.ws.aclose(1011, "crash")  # no SENT for any of them
            return
        again = [(await conn.recv_type(10))[1] for _ in range(4)]
        assert again[:3] == first  # same ids, same order, before the new one
        for i, msg_id in enumerate(again):
            await conn.send([12, msg_id, 100 + i])
        await conn.idle()

    async with fake_relay(script) as relay, open_transport(_alice(relay), connect_timeout=5) as client:
        ids = [await client.submit("bob", b"%d" % i) for i in range(3)]
        with trio.fail_after(5):
            await relay.reached(1).wait()
        ids.append(await client.submit("bob", b"3"))
        with trio.fail_after(5):
            assert [await client.wait_sent(i) for i in ids] == [100, 101, 102, 103]
        assert ids[:3] == first
        assert client.statistics()["connections"] == 2


async def test_fake_redelivery_is_deduplicated_and_acked():
    async def script(conn: FakeConn) -> None:
        entries = [[13, seq, bytes([seq]) * 16, "bob", 1, None, seq, b"m"] for seq in (1, 2)]
        if conn.n == 1:
            await conn.send(*entries)
            with trio.move_on_after(0.05):  # drop before the (batched) ACK can arrive
                await conn.recv()
            conn.relay.reached(1).set()
            await conn.ws.aclose(1011)
            return
        await conn.send(*entries, [13, 3, b"\x03" * 16, "bob", 1, None, 3, b"m"])
        await conn.wait_ack(3)
        conn.relay.reached(2).set()
        await conn.idle()

    async with fake_relay(script) as relay, open_transport(_alice(relay), connect_timeout=5) as client:
        seen = []
        with trio.fail_after(5):
            async for entry in client.entries():
                seen.append(entry.seq)
                if len(seen) == 3:
                    break
            await relay.reached(2).wait()
        assert seen == [1, 2, 3]


async def test_fake_conflict_refreshes_devices():
    async def script(conn: FakeConn) -> None:
        send = await conn.recv_type(10)
        assert set(send[3]) == {1}
        conn.relay.devices["bob"] = [1, 2]
        await conn.send([4, send[1], 409, "missing [2]"])
        send = await conn.recv_type(10)
        assert set(send[3]) == {1, 2}
        await conn.send([12, send[1], 7])
        await conn.idle()

    async with fake_relay(script) as relay, open_transport(_alice(relay), connect_timeout=5) as client:
        with trio.fail_after(5):
            assert (await client.send("bob", b"x"))[1] == 7
            with pytest.raises(SendError) as info:
                await client.send("nobody", b"x")
            assert info.value.code == 404


async def test_fake_send_error_and_backpressure():
    async def script(conn: FakeConn) -> None:
        send = await conn.recv_type(10)
        await conn.relay.reached(1).wait()
        await conn.send([4, send[1], 403, "nope"])
        await conn.idle()

    async with (
        fake_relay(script) as relay,
        open_transport(_alice(relay), connect_timeout=5, max_in_flight=1) as client,
    ):
        first = await client.submit("bob", b"1")
        with trio.move_on_after(0.2) as scope:
            await client.submit("bob", b"2")  # blocks: one SEND un-answered
        assert scope.cancelled_caught
        relay.reached(1).set()
        with trio.fail_after(5):
            with pytest.raises(SendError) as info:
                await client.wait_sent(first)
            assert (info.value.code, info.value.reason) == (403, "nope")
            await client.submit("bob", b"3")  # the slot is free again


async def test_fake_requests_across_a_drop():
    async def script(conn: FakeConn) -> None:
        if conn.n == 1:
            await conn.recv_type(20)
            await conn.recv_type(20)
            await conn.ws.aclose(1011)
            return
        req = await conn.recv_type(20)
        assert req[2] == "profile.get"
        await conn.send([21, req[1], False, {"code": 404, "reason": "no profile"}])
        await conn.idle()

    async with fake_relay(script) as relay, open_transport(_alice(relay), connect_timeout=5) as client:
        results: dict[str, Any] = {}

        async def call(op: str, retry: bool) -> None:
            try:
                await client.request(op, {}, retry=retry)
            except (ConnectionClosed, RequestError) as exc:
                results[op] = exc

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, "group.create", False)
                await trio.sleep(0.05)
                nursery.start_soon(call, "profile.get", True)
        # Written once, connection lost: may have been applied, so not retried.
        assert isinstance(results["group.create"], ConnectionClosed)
        assert "may or may not" in results["group.create"].reason
        # retry=True: written again on the new connection, answered there.
        assert isinstance(results["profile.get"], RequestError)
        assert results["profile.get"].code == 404


async def test_fake_connected_elsewhere_does_not_reconnect():
    async def script(conn: FakeConn) -> None:
        await conn.send([13, 1, b"a" * 16, "bob", 1, None, 1, b"x"])
        await conn.relay.reached(1).wait()
        await conn.ws.aclose(4409, "connected elsewhere")

    async with fake_relay(script) as relay, open_transport(_alice(relay), connect_timeout=5) as client:
        with trio.fail_after(5):
            entries = client.entries()
            assert isinstance(await entries.__anext__(), Message)
            relay.reached(1).set()
            with pytest.raises(ConnectionClosed) as info:
                await entries.__anext__()
        assert info.value.code == 4409
        with pytest.raises(ConnectionClosed):
            await client.submit("bob", b"x")
        await trio.sleep(0.2)
        assert relay.connections == 1


async def test_fake_mark_read_follows_ack_and_close_flushes():
    async def script(conn: FakeConn) -> None:
        await conn.send([13, 5, b"r" * 16, "bob", 1, None, 1, b"x"])
        read = await conn.recv_type(16)
        assert read == [16, "bob", [b"r" * 16]]
        assert conn.acks == [5]  # the ACK came first
        await conn.idle()

    async with fake_relay(script) as relay:
        async with open_transport(_alice(relay), connect_timeout=5) as client:
            with trio.fail_after(5):
                entry = await client.receive()
                assert isinstance(entry, Message)
                await client.mark_read(entry.from_user, [entry.msg_id])
        # Leaving the block flushed the READ (and ACK) before closing.
        assert [f for _, f in relay.log if f[0] in (14, 16)][:2] == [
            [14, 5],
            [16, "bob", [b"r" * 16]],
        ]


async def test_fake_group_wrappers_send_the_ops_and_check_answers():
    group = "g." + "c" * 22
    info = {
        "group": group,
        "name": "t",
        "version": 1,
        "members": ["alice", "bob"],
        "admins": ["alice"],
    }
    seen: list[tuple[str, dict[str, Any]]] = []

    async def script(conn: FakeConn) -> None:
        while True:
            req = await conn.recv_type(20)
            seen.append((req[2], req[3]))
            if req[3].get("name") == "broken":
                await conn.send([21, req[1], True, {"group": group}])
            elif req[2] == "group.rename":
                await conn.send([21, req[1], False, {"code": 403, "reason": "admins only"}])
            else:
                await conn.send([21, req[1], True, {**info, "extra": 1}])

    async with fake_relay(script) as relay, open_transport(_alice(relay), connect_timeout=5) as client:
        with trio.fail_after(5):
            assert await client.create_group("t", ["bob"]) == info  # only the known fields
            assert await client.group_info(group) == info
            await client.add_members(group, ("bob",))
            await client.remove_members(group, ["bob"])
            await client.promote(group, ["bob"])
            await client.demote(group, ["bob"])
            await client.leave_group(group)
            with pytest.raises(RequestError) as refused:
                await client.rename_group(group, "x")
            assert (refused.value.code, refused.value.reason) == (403, "admins only")
            with pytest.raises(RequestError, match="malformed answer"):
                await client.create_group("broken")
            # Local checks: nothing is written for these.
            with pytest.raises(ValueError):
                await client.group_info("g.short")
            with pytest.raises(ValueError):
                await client.add_members(group, ["Not A User"])
            with pytest.raises(TypeError):
                await client.add_members(group, "bob")
    assert seen == [
        ("group.create", {"name": "t", "members": ["bob"]}),
        ("group.info", {"group": group}),
        ("group.add", {"group": group, "members": ["bob"]}),
        ("group.remove", {"group": group, "members": ["bob"]}),
        ("group.promote", {"group": group, "members": ["bob"]}),
        ("group.demote", {"group": group, "members": ["bob"]}),
        ("group.leave", {"group": group}),
        ("group.rename", {"group": group, "name": "x"}),
        ("group.create", {"name": "broken", "members": []}),
    ]
