"""The key directory: keys.publish / keys.fetch / keys.count and EVENT keys.low,
over real loopback sockets and LMDB, plus the store ops and the fetch limiter."""

from __future__ import annotations

import os

import msgpack
import nacl.signing
import pytest
import trio

from relay.errors import FrameError
from relay.protocol import frames
from relay.protocol.limits import KeyedBuckets
from relay.server.app import open_relay
from relay.store.base import (
    ENTRY_EVENT,
    ExpireEntries,
    FetchBundles,
    PublishKeys,
    RegisterUser,
    SignedPrekey,
)
from relay.store.lmdb_store import LmdbStore
from tests.test_groups import fails, ok, register_all
from tests.wire import User, WireClient

EVENT = 22


def signed_prekey(user: User, spk_id: int = 1, key: bytes | None = None) -> dict:
    key = key if key is not None else os.urandom(32)
    return {"id": spk_id, "key": key, "sig": user.key.sign(key).signature}


def prekeys(ids: range | list[int]) -> list[dict]:
    return [{"id": i, "key": os.urandom(32)} for i in ids]


async def publish(client: WireClient, user: User, ids: range | list[int], req_id: int = 1, spk_id: int = 1) -> int:
    args = {"signed_prekey": signed_prekey(user, spk_id), "prekeys": prekeys(ids)}
    result = await ok(client, req_id, "keys.publish", args)
    return result["count"]


def keys_low_events(store: LmdbStore, user: str, device: int = 1) -> list[dict]:
    out = []
    for entry in store.read_inbox(user, device, 0, 1000):
        if entry.type == ENTRY_EVENT:
            kind, body, _ts = frames.decode_tail(entry.tail)
            if kind == "keys.low":
                out.append(body)
    return out


# --- over the wire ---------------------------------------------------------------


async def test_publish_fetch_count_round_trip(relay):
    ann, ben = await register_all(relay.url, "ann", "ben")
    async with ann.online(relay.url) as a, ben.online(relay.url) as b:
        assert await ok(a, 1, "keys.count", {}) == 0
        # A device that never published is left out of a fetch.
        assert await ok(b, 2, "keys.fetch", {"user": "ann"}) == {"devices": []}
        spk = signed_prekey(ann, 7)
        opks = prekeys([30, 10, 20])
        assert await ok(a, 3, "keys.publish", {"signed_prekey": spk, "prekeys": opks}) == {"count": 3}
        assert await ok(a, 4, "keys.count", {}) == 3
        got = await ok(b, 5, "keys.fetch", {"user": "ann"})
        assert got == {
            "devices": [
                {
                    "device": 1,
                    "identity_key": bytes(ann.key.verify_key),
                    "signed_prekey": spk,
                    "prekey": opks[1],  # the lowest id first
                }
            ]
        }
        assert await ok(a, 6, "keys.count", {}) == 2
        # Refill without a signed prekey; then a new signed prekey replaces the old one.
        assert await ok(a, 7, "keys.publish", {"prekeys": prekeys([40])}) == {"count": 3}
        assert await ok(a, 8, "keys.publish", {"signed_prekey": spk}) == {"count": 3}, "same id, same key: fine"
        spk2 = signed_prekey(ann, 8)
        assert await ok(a, 9, "keys.publish", {"signed_prekey": spk2, "prekeys": None}) == {"count": 3}
        got = await ok(b, 10, "keys.fetch", {"user": "ann", "devices": [1, 9]})
        assert [d["signed_prekey"] for d in got["devices"]] == [spk2]
        assert got["devices"][0]["prekey"]["id"] == 20
        assert await ok(b, 11, "keys.fetch", {"user": "ann", "devices": [9]}) == {"devices": []}
        assert await ok(b, 12, "keys.fetch", {"user": "ann", "devices": []}) == {"devices": []}
        # Fetching one's own user leaves the calling device out (and its prekeys alone).
        assert await ok(a, 13, "keys.fetch", {"user": "ann"}) == {"devices": []}
        assert await ok(a, 14, "keys.count", {}) == 2
        # Exhausted: the bundle still comes, with prekey nil.
        for req_id in (15, 16):
            assert (await ok(b, req_id, "keys.fetch", {"user": "ann"}))["devices"][0]["prekey"] is not None
        last = await ok(b, 17, "keys.fetch", {"user": "ann"})
        assert last["devices"][0]["prekey"] is None and last["devices"][0]["signed_prekey"] == spk2
        assert await ok(a, 18, "keys.count", {}) == 0


async def test_bad_signed_prekey_signature_is_400_and_stores_nothing(relay):
    ann, ben = await register_all(relay.url, "ann", "ben")
    async with ann.online(relay.url) as a:
        key = os.urandom(32)
        by_ben = {"id": 1, "key": key, "sig": ben.key.sign(key).signature}
        other_bytes = {"id": 1, "key": key, "sig": ann.key.sign(os.urandom(32)).signature}
        for req_id, spk in enumerate((by_ben, other_bytes), 1):
            res = await a.request(req_id, "keys.publish", {"signed_prekey": spk, "prekeys": prekeys(range(5))})
            assert res[2] is False and res[3]["code"] == 400 and "signature" in res[3]["reason"], res
        assert await ok(a, 3, "keys.count", {}) == 0
        assert relay.store.signed_prekey("ann", 1) is None


async def test_prekeys_handed_out_once_under_concurrent_fetches(settings):
    async with open_relay(settings) as relay:
        users = await register_all(relay.url, "ann", *[f"f{i}" for i in range(5)])
        ann, fetchers = users[0], users[1:]
        async with ann.online(relay.url) as a:
            assert await publish(a, ann, range(1, 51)) == 50
        handed: list[int | None] = []

        async def fetcher(user: User) -> None:
            async with user.online(relay.url) as c:
                for req_id in range(20):
                    got = await ok(c, req_id, "keys.fetch", {"user": "ann"})
                    (bundle,) = got["devices"]
                    handed.append(None if bundle["prekey"] is None else bundle["prekey"]["id"])

        async with trio.open_nursery() as nursery:
            for user in fetchers:
                nursery.start_soon(fetcher, user)
        ids = [i for i in handed if i is not None]
        assert len(handed) == 100
        assert sorted(ids) == list(range(1, 51)), "every prekey handed out exactly once"
        assert relay.store.prekey_count("ann", 1) == 0
        assert keys_low_events(relay.store, "ann") == [{"count": 9}], "one crossing, one event"


async def test_prekeys_handed_out_once_across_a_restart(settings):
    ann, ben = User("ann"), User("ben")
    async with open_relay(settings) as relay:
        await ann.register(relay.url)
        await ben.register(relay.url)
        async with ann.online(relay.url) as a, ben.online(relay.url) as b:
            await publish(a, ann, range(1, 6))
            first = [(await ok(b, i, "keys.fetch", {"user": "ann"}))["devices"][0]["prekey"]["id"] for i in range(2)]
    async with open_relay(settings) as relay, ben.online(relay.url) as b:
        after = [(await ok(b, i, "keys.fetch", {"user": "ann"}))["devices"][0]["prekey"] for i in range(4)]
        assert first == [1, 2]
        assert [p["id"] for p in after[:3]] == [3, 4, 5] and after[3] is None
        assert relay.store.prekey_count("ann", 1) == 0


async def test_keys_low_once_per_crossing_and_rearmed_by_a_refill(settings):
    settings.keys_low_threshold = 3
    async with open_relay(settings) as relay:
        ann, ben = await register_all(relay.url, "ann", "ben")
        async with ann.online(relay.url) as a, ben.online(relay.url) as b:
            await publish(a, ann, range(1, 6))  # 5

            async def fetch_n(n: int) -> None:
                for _ in range(n):
                    await ok(b, 1, "keys.fetch", {"user": "ann"})

            await fetch_n(2)  # 5 -> 3: not below yet
            assert keys_low_events(relay.store, "ann") == []
            await fetch_n(1)  # 3 -> 2: crosses
            event = await a.recv_type(EVENT)
            assert event[2:4] == ["keys.low", {"count": 2}], "pushed to the online device after the commit"
            await fetch_n(4)  # 2 -> 0, then none left: no new crossing
            assert keys_low_events(relay.store, "ann") == [{"count": 2}]
            # A refill that stays below the threshold does not re-arm it...
            assert await ok(a, 2, "keys.publish", {"prekeys": prekeys([10])}) == {"count": 1}
            await fetch_n(1)
            assert keys_low_events(relay.store, "ann") == [{"count": 2}]
            # ...one that lifts the count to the threshold or above does.
            assert await ok(a, 3, "keys.publish", {"prekeys": prekeys(range(20, 24))}) == {"count": 4}
            await fetch_n(2)  # 4 -> 2
            assert keys_low_events(relay.store, "ann") == [{"count": 2}, {"count": 2}]
            await a.send([14, event[1]])
            event = await a.recv_type(EVENT)
            assert event[2:4] == ["keys.low", {"count": 2}]


async def test_fetch_rate_limit_per_requester_and_target(settings):
    settings.keys_fetch_burst = 3
    settings.keys_fetch_per_s = 0.01
    async with open_relay(settings) as relay:
        ann, ben, cat = await register_all(relay.url, "ann", "ben", "cat")
        async with ben.online(relay.url) as b, cat.online(relay.url) as c:
            for req_id in range(3):
                await ok(b, req_id, "keys.fetch", {"user": "ann"})
            res = await b.request(9, "keys.fetch", {"user": "ann"})
            assert res[2] is False and res[3]["code"] == 429, res
            await ok(b, 10, "keys.fetch", {"user": "cat"})  # another target has its own bucket
            await ok(c, 11, "keys.fetch", {"user": "ann"})  # another requester too
            assert await fails(b, 12, "keys.fetch", {"user": "ghost"}) == 404, "unknown users before the limit"


async def test_unknown_user_404_and_conflicts_409(relay):
    ann, ben = await register_all(relay.url, "ann", "ben")
    async with ann.online(relay.url) as a:
        assert await fails(a, 1, "keys.fetch", {"user": "ghost"}) == 404
        # No signed prekey stored and none given.
        assert await fails(a, 2, "keys.publish", {"prekeys": prekeys([1])}) == 409
        assert await publish(a, ann, range(1, 4), spk_id=5) == 3
        # Repeated within the request, or already stored: nothing of the request is stored.
        assert await fails(a, 3, "keys.publish", {"prekeys": prekeys([10, 11, 10])}) == 409
        assert await fails(a, 4, "keys.publish", {"prekeys": prekeys([12, 2])}) == 409
        spk = signed_prekey(ann, 6)
        assert await fails(a, 5, "keys.publish", {"signed_prekey": spk, "prekeys": prekeys([13, 3])}) == 409
        assert relay.store.signed_prekey("ann", 1).id == 5
        # The same signed prekey id with another key.
        assert await fails(a, 6, "keys.publish", {"signed_prekey": signed_prekey(ann, 5)}) == 409
        assert await ok(a, 7, "keys.count", {}) == 3


async def test_limits_413(relay):
    (ann,) = await register_all(relay.url, "ann")
    async with ann.online(relay.url) as a:
        spk = signed_prekey(ann)
        assert await fails(a, 1, "keys.publish", {"signed_prekey": spk, "prekeys": prekeys(range(201))}) == 413
        assert relay.store.signed_prekey("ann", 1) is None
        for i in range(5):
            args = {"signed_prekey": spk, "prekeys": prekeys(range(i * 200, (i + 1) * 200))}
            assert await ok(a, 2 + i, "keys.publish", args) == {"count": (i + 1) * 200}
        assert await fails(a, 10, "keys.publish", {"prekeys": prekeys([5000])}) == 413
        assert await ok(a, 11, "keys.count", {}) == 1000


async def test_malformed_args_are_400_and_the_connection_stays(relay):
    (ann,) = await register_all(relay.url, "ann")
    good_key = os.urandom(32)
    good = {"id": 1, "key": good_key, "sig": ann.key.sign(good_key).signature}
    bad_publishes = [
        {"signed_prekey": "x"},
        {"signed_prekey": {**good, "id": -1}},
        {"signed_prekey": {**good, "id": 2**32}},
        {"signed_prekey": {**good, "id": True}},
        {"signed_prekey": {**good, "id": "1"}},
        {"signed_prekey": {**good, "key": good_key[:31]}},
        {"signed_prekey": {**good, "key": "k" * 32}},
        {"signed_prekey": {**good, "sig": b"s" * 63}},
        {"signed_prekey": {"id": 1, "key": good_key}},
        {"signed_prekey": good, "prekeys": {"id": 1, "key": good_key}},
        {"signed_prekey": good, "prekeys": [[1, good_key]]},
        {"signed_prekey": good, "prekeys": [{"id": 1}]},
        {"signed_prekey": good, "prekeys": [{"id": 1, "key": good_key}, {"id": 2, "key": b""}]},
    ]
    bad_fetches = [
        {},
        {"user": "Ann"},
        {"user": 7},
        {"user": "ann", "devices": 1},
        {"user": "ann", "devices": [0]},
        {"user": "ann", "devices": [256]},
        {"user": "ann", "devices": ["1"]},
        {"user": "ann", "devices": list(range(1, 257))},
    ]
    async with ann.online(relay.url) as a:
        req_id = 0
        for args in bad_publishes:
            req_id += 1
            res = await a.request(req_id, "keys.publish", args)
            assert res[1:3] == [req_id, False] and res[3]["code"] == 400 and res[3]["reason"], (args, res)
        for args in bad_fetches:
            req_id += 1
            res = await a.request(req_id, "keys.fetch", args)
            assert res[1:3] == [req_id, False] and res[3]["code"] == 400, (args, res)
        # More bad requests than the malformed-frame budget, and the connection still serves.
        assert await ok(a, 100, "keys.publish", {"signed_prekey": good, "prekeys": prekeys([1])}) == {"count": 1}
        assert await ok(a, 101, "keys.count", {}) == 1
        assert relay.store.signed_prekey("ann", 1) == SignedPrekey(1, good["key"], good["sig"])


# --- the store ops ---------------------------------------------------------------


@pytest.fixture
def store(tmp_path, fastpath_name):
    s = LmdbStore(tmp_path / "store", shards=2, map_size=64 << 20, sync=False, fastpath=fastpath_name)
    yield s
    s.close()


def _apply(store: LmdbStore, op):
    (result,) = store.apply_batch(store.shard_of(op.user), [op])
    return result


def _add_device(store: LmdbStore, user: str, device: int, key: bytes) -> None:
    """device.link does not exist yet: write the second device into the record."""
    shard = store._shards[store.shard_of(user)]
    record = store.get_user(user)
    assert record is not None
    devices = {**record.devices, device: key}
    with shard.env.begin(write=True, db=shard.users) as txn:
        txn.put(user.encode(), msgpack.packb({"devices": devices, "created": record.created}, use_bin_type=True))


def _spk(key: nacl.signing.SigningKey, spk_id: int, fill: bytes | None = None) -> SignedPrekey:
    pub = os.urandom(32) if fill is None else fill * 32
    return SignedPrekey(spk_id, pub, key.sign(pub).signature)


def test_store_fetch_per_device_and_keys_low_per_device(store):
    k1, k2 = nacl.signing.SigningKey.generate(), nacl.signing.SigningKey.generate()
    assert _apply(store, RegisterUser("ann", bytes(k1.verify_key), 1)) is True
    _add_device(store, "ann", 2, bytes(k2.verify_key))
    _add_device(store, "ann", 3, b"\x03" * 32)  # never publishes
    assert _apply(store, PublishKeys("ann", 1, _spk(k1, 1), [(5, b"a" * 32), (2, b"b" * 32)], 1000)) == 2
    assert _apply(store, PublishKeys("ann", 2, _spk(k2, 1), [(9, b"c" * 32)], 1000)) == 1
    got = _apply(store, FetchBundles("ann", "ben", 1, None, 2, 1234))
    assert [(b.device, b.identity_key, b.prekey) for b in got.bundles] == [
        (1, bytes(k1.verify_key), (2, b"b" * 32)),
        (2, bytes(k2.verify_key), (9, b"c" * 32)),
    ]
    # Device 1 went 2 -> 1 (crossed 2), device 2 went 1 -> 0 (was already below).
    assert [(d, e.seq, frames.decode_tail(e.tail)) for d, e in got.entries] == [(1, 1, ["keys.low", {"count": 1}, 1234])]
    assert store.read_inbox("ann", 1, 0, 10)[0].tail == got.entries[0][1].tail
    assert store.pending("ann", 1) == 1 and store.pending("ann", 2) == 0
    # Device 2 fetching its own user gets device 1 only; the filter narrows further.
    own = _apply(store, FetchBundles("ann", "ann", 2, None, 2, 1))
    assert [(b.device, b.prekey) for b in own.bundles] == [(1, (5, b"a" * 32))]
    assert _apply(store, FetchBundles("ann", "ben", 1, (2, 3, 200), 2, 1)).bundles[0].prekey is None
    assert (store.prekey_count("ann", 1), store.prekey_count("ann", 2), store.prekey_count("ann", 3)) == (0, 0, 0)


def test_store_publish_checks_before_writing(store):
    k = nacl.signing.SigningKey.generate()
    _apply(store, RegisterUser("ann", bytes(k.verify_key), 1))
    spk = _spk(k, 4)
    for op, code in (
        (PublishKeys("ann", 1, None, [(1, b"k" * 32)], 1000), 409),
        (PublishKeys("ann", 2, spk, [], 1000), 404),
        (PublishKeys("nobody", 1, spk, [], 1000), 404),
        (PublishKeys("ann", 1, spk, [(1, b"k" * 32)] * 2, 1000), 409),
        (PublishKeys("ann", 1, spk, [(i, b"k" * 32) for i in range(11)], 10), 413),
    ):
        result = _apply(store, op)
        assert isinstance(result, FrameError) and result.code == code, (op, result)
    assert store.stats()[f"shard-{store.shard_of('ann'):03d}"]["prekeys"] == 0
    assert _apply(store, PublishKeys("ann", 1, spk, [(1, b"k" * 32)], 1000)) == 1
    stale = _apply(store, PublishKeys("ann", 1, SignedPrekey(4, b"x" * 32, spk.sig), [(2, b"k" * 32)], 1000))
    assert isinstance(stale, FrameError) and stale.code == 409 and "another key" in stale.reason
    taken = _apply(store, PublishKeys("ann", 1, None, [(i, b"j" * 32) for i in range(20)], 1000))
    assert isinstance(taken, FrameError) and taken.reason == "prekey ids already stored with another key: [1]"
    assert store.prekey_count("ann", 1) == 1 and store.signed_prekey("ann", 1) == spk
    # The same id with the same key is a resend: nothing changes, nothing is refused.
    assert _apply(store, PublishKeys("ann", 1, spk, [(1, b"k" * 32), (2, b"k" * 32)], 1000)) == 2
    assert _apply(store, PublishKeys("ann", 1, spk, [(1, b"k" * 32), (2, b"k" * 32)], 1000)) == 2


def test_store_publish_replace_starts_over(store):
    k = nacl.signing.SigningKey.generate()
    _apply(store, RegisterUser("ann", bytes(k.verify_key), 1))
    _apply(store, PublishKeys("ann", 1, _spk(k, 1), [(i, b"o" * 32) for i in range(1, 6)], 1000))
    # A device that lost its private keys publishes again from id 1, other keys.
    new_spk = _spk(k, 1, b"n")
    again = PublishKeys("ann", 1, new_spk, [(1, b"n" * 32), (2, b"n" * 32)], 1000)
    refused = _apply(store, again)
    assert isinstance(refused, FrameError) and refused.code == 409
    again.replace = True
    assert _apply(store, again) == 2
    assert store.signed_prekey("ann", 1) == new_spk
    bundles = _apply(store, FetchBundles("ann", "ben", 1, None, 10, 1))
    assert [b.prekey for b in bundles.bundles] == [(1, b"n" * 32)]
    assert isinstance(_apply(store, FetchBundles("nobody", "ann", 1, None, 10, 1)), FrameError)


def test_store_prekeys_survive_expiry(store):
    k = nacl.signing.SigningKey.generate()
    _apply(store, RegisterUser("ann", bytes(k.verify_key), 1))
    _apply(store, PublishKeys("ann", 1, _spk(k, 1), [(1, b"k" * 32)], 1000))
    store.apply_batch(store.shard_of("ann"), [ExpireEntries(2**62, 10_000)])
    assert store.prekey_count("ann", 1) == 1


# --- the fetch limiter -------------------------------------------------------------


def test_keyed_buckets_limit_per_key_and_stay_bounded():
    limits: KeyedBuckets[tuple[str, str]] = KeyedBuckets(rate=1.0, burst=2, max_keys=100)
    assert [limits.take(("ben", "ann"), 0.0) for _ in range(3)] == [True, True, False]
    assert limits.take(("ben", "cat"), 0.0), "per target"
    assert limits.take(("ben", "ann"), 1.0) and not limits.take(("ben", "ann"), 1.0), "one per second"
    # Cycling through names never grows the table past max_keys...
    for i in range(1000):
        limits.take(("ben", f"u{i}"), 1.0)
    assert len(limits) == 100
    # ...and buckets that have refilled are forgotten as time passes.
    limits.take(("ben", "zed"), 100.0)
    assert len(limits) == 1


def test_key_settings_from_env_and_validated():
    from relay.config import Settings
    from relay.errors import ConfigError

    settings = Settings.from_env({"RELAY_KEYS_FETCH_PER_S": "0.5", "RELAY_KEYS_LOW_THRESHOLD": "3"})
    assert (settings.keys_fetch_per_s, settings.keys_low_threshold, settings.keys_fetch_burst) == (0.5, 3, 20)
    for bad in ({"keys_fetch_burst": 0}, {"keys_fetch_per_s": 0.0}, {"keys_low_threshold": -1}, {"max_prekeys_per_publish": 2000}):
        with pytest.raises(ConfigError):
            Settings.from_env({}, **bad)
