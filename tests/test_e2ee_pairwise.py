"""Pairwise sessions: prekeys, X3DH, the Double Ratchet and the payload, as
two devices use them (no relay: payloads are handed over directly, in any
order the test likes, as h11's ConnectionPair does with bytes)."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from relay.e2ee import pairwise
from relay.e2ee.errors import (
    BadKeyError,
    BadMacError,
    BadSignatureError,
    DecodeError,
    E2EEError,
    IdentityMismatchError,
    NoSessionError,
    ReplayError,
    TooManySkippedError,
    UnknownPrekeyError,
)
from relay.e2ee.prekeys import OPK_BATCH, SPK_KEEP_MS, SPK_ROTATE_MS, PrekeyStore
from relay.e2ee.primitives import X25519KeyPair, sign
from relay.e2ee.ratchet import MAX_SKIP, MAX_SKIPPED_KEYS, SKIPPED_KEY_TTL_MS, Session
from relay.e2ee.x3dh import Bundle, initiate, respond

T0 = 1_700_000_000_000
# Small-order X25519 points: 0, 1, and a point of order 8 (every DH with them is all zeros).
LOW_ORDER = [
    bytes(32),
    b"\x01" + bytes(31),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
]
PROPERTY = settings(max_examples=50, deadline=None)


def counter_random(seed: int) -> Callable[[int], bytes]:
    """A deterministic ``random`` so that failures reproduce."""
    counter = itertools.count()

    def draw(n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(b"%d/%d" % (seed, next(counter))).digest()
        return out[:n]

    return draw


def roundtrip(data: dict) -> dict:
    """Through msgpack and back, as a caller persists it."""
    return msgpack.unpackb(msgpack.packb(data, use_bin_type=True), raw=False)


@dataclass
class Device:
    name: str
    identity: SigningKey
    prekeys: PrekeyStore = field(default_factory=PrekeyStore)
    peer: pairwise.PeerSessions | None = None
    inbox: list[tuple[bytes, bytes]] = field(default_factory=list)

    @property
    def key(self) -> bytes:
        return bytes(self.identity.verify_key)

    def bundle(self, with_opk: bool = True) -> Bundle:
        spk = self.prekeys.current_signed_prekey
        assert spk is not None
        opks = self.prekeys.one_time_prekeys_after(0)
        return Bundle.from_wire({
            "device": 1,
            "identity_key": self.key,
            "signed_prekey": spk.public(),
            "prekey": opks[0].public() if with_opk and opks else None,
        })


def make_device(name: str, seed: int) -> Device:
    dev = Device(name, SigningKey(counter_random(seed)(32)))
    dev.prekeys.new_signed_prekey(dev.identity, T0, counter_random(seed + 1))
    dev.prekeys.new_one_time_prekeys(5, counter_random(seed + 2))
    return dev


class Pair:
    """Alice and Bob, with an inbox each; every message's plaintext is unique."""

    def __init__(self, simultaneous: bool = False) -> None:
        self.alice = make_device("alice", 100)
        self.bob = make_device("bob", 200)
        self.alice.peer = pairwise.start_session(self.alice.identity, self.bob.bundle(), None, counter_random(1))
        if simultaneous:
            self.bob.peer = pairwise.start_session(self.bob.identity, self.alice.bundle(), None, counter_random(2))
        self.sent = 0
        self.delivered: list[bytes] = []
        self.now = T0

    def other(self, dev: Device) -> Device:
        return self.bob if dev is self.alice else self.alice

    def send(self, dev: Device) -> bool:
        if dev.peer is None:
            return False  # a responder says nothing before it has heard something
        text = b"%s #%d" % (dev.name.encode(), self.sent)
        self.sent += 1
        self.other(dev).inbox.append((pairwise.encrypt(dev.peer, text, counter_random(1000 + self.sent)), text))
        return True

    def receive(self, dev: Device, payload: bytes) -> pairwise.Decrypted:
        return pairwise.decrypt(dev.identity, dev.peer, payload, self.other(dev).key, dev.prekeys, self.now)

    def deliver(self, dev: Device, index: int = 0, check_replay: bool = True) -> None:
        payload, text = dev.inbox.pop(index % len(dev.inbox))
        before = (None if dev.peer is None else dev.peer.to_dict(), dev.prekeys.to_dict())
        out = self.receive(dev, payload)
        # decrypt changes neither what it is given
        assert (None if dev.peer is None else dev.peer.to_dict(), dev.prekeys.to_dict()) == before
        assert out.plaintext == text
        dev.peer = out.peer
        if out.used_one_time_prekey is not None:
            dev.prekeys.remove_one_time_prekey(out.used_one_time_prekey)
        self.delivered.append(text)
        if check_replay:
            with pytest.raises(ReplayError):
                self.receive(dev, payload)

    def persist(self, dev: Device) -> None:
        if dev.peer is not None:
            data = dev.peer.to_dict()
            dev.peer = pairwise.PeerSessions.from_dict(roundtrip(data))
            assert dev.peer.to_dict() == data
        data = dev.prekeys.to_dict()
        dev.prekeys = PrekeyStore.from_dict(roundtrip(data))
        assert dev.prekeys.to_dict() == data

    def drain(self) -> None:
        while self.alice.inbox or self.bob.inbox:
            for dev in (self.alice, self.bob):
                if dev.inbox:
                    self.deliver(dev)


ACTIONS = st.lists(
    st.tuples(st.sampled_from(["send", "send", "deliver", "persist"]), st.booleans(), st.integers(0, 63)),
    max_size=40,
)


def run_actions(pair: Pair, actions: list[tuple[str, bool, int]]) -> None:
    for kind, is_alice, index in actions:
        dev = pair.alice if is_alice else pair.bob
        if kind == "send":
            pair.send(dev)
        elif kind == "deliver" and dev.inbox:
            pair.deliver(dev, index)
        elif kind == "persist":
            pair.persist(dev)
    pair.drain()
    # Every message was read exactly once (each replay was refused in deliver).
    assert sorted(pair.delivered) == sorted(set(pair.delivered))
    assert len(pair.delivered) == pair.sent


# -- (a) any order, exactly once; (d) persistence mid-conversation -----------


@PROPERTY
@given(ACTIONS)
def test_any_delivery_order_decrypts_each_message_once(actions: list[tuple[str, bool, int]]) -> None:
    run_actions(Pair(), [("send", True, 0), *actions])


@PROPERTY
@given(ACTIONS)
def test_simultaneous_initiation_any_order(actions: list[tuple[str, bool, int]]) -> None:
    pair = Pair(simultaneous=True)
    run_actions(pair, [("send", True, 0), ("send", False, 0), *actions])
    # And afterwards they still talk, both ways.
    for _ in range(3):
        assert pair.send(pair.alice) and pair.send(pair.bob)
        pair.drain()


# -- (f) simultaneous initiation, the two orders that matter -----------------


@pytest.mark.parametrize("cross_over", [False, True])
def test_simultaneous_initiation(cross_over: bool) -> None:
    pair = Pair(simultaneous=True)
    pair.send(pair.alice)
    pair.send(pair.bob)
    pair.drain()  # each now has a responder session current, its own as previous
    if cross_over:  # both answer before hearing the answer
        pair.send(pair.alice)
        pair.send(pair.bob)
        pair.drain()
    for _ in range(4):
        pair.send(pair.alice)
        pair.drain()
        pair.send(pair.bob)
        pair.drain()
    assert pair.alice.peer is not None and pair.bob.peer is not None
    assert len(pair.alice.peer.records()) == 2
    assert pair.alice.peer.pending_prekey is None and pair.bob.peer.pending_prekey is None


# -- (b) tampering -------------------------------------------------------------


def conversation_mid_way() -> tuple[Pair, bytes, bytes]:
    """Bob has a session; returns it, a genuine normal payload and its plaintext."""
    pair = Pair()
    pair.send(pair.alice)
    pair.deliver(pair.bob)
    pair.send(pair.bob)
    pair.deliver(pair.alice)
    pair.send(pair.alice)
    pair.send(pair.alice)
    payload, text = pair.bob.inbox.pop()  # the second: a skipped key is kept for the first
    return pair, payload, text


def flip(data: bytes, index: int, mask: int) -> bytes:
    index %= len(data)
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1 :]


@PROPERTY
@given(st.integers(0, 10_000), st.integers(1, 255), st.booleans())
def test_flipped_payload_byte_is_refused(index: int, mask: int, prekey_form: bool) -> None:
    if prekey_form:
        pair = Pair()
        pair.send(pair.alice)
        payload, text = pair.bob.inbox.pop()
    else:
        pair, payload, text = conversation_mid_way()
    with pytest.raises(E2EEError):
        pair.receive(pair.bob, flip(payload, index, mask))
    out = pair.receive(pair.bob, payload)
    assert out.plaintext == text


@PROPERTY
@given(st.integers(0, 10_000), st.integers(1, 255), st.booleans())
def test_flipped_header_or_ciphertext_leaves_session_usable(index: int, mask: int, in_header: bool) -> None:
    pair, payload, text = conversation_mid_way()
    assert pair.bob.peer is not None
    session = pair.bob.peer.session
    msg = pairwise.decode_payload(payload)
    before = session.to_dict()
    header, ciphertext = msg.header, msg.ciphertext
    if in_header:
        header = flip(header, index, mask)
    else:
        ciphertext = flip(ciphertext, index, mask)
    with pytest.raises(E2EEError):
        session.decrypt(header, ciphertext, T0)
    assert session.to_dict() == before
    assert session.decrypt(msg.header, msg.ciphertext, T0) == text


# -- (c) forward secrecy -----------------------------------------------------


@PROPERTY
@given(st.integers(1, 6), st.integers(0, 3), st.booleans())
def test_saved_state_cannot_read_earlier_messages(count: int, later: int, ratchet_step: bool) -> None:
    pair = Pair()
    for _ in range(count):
        pair.send(pair.alice)
    early = list(pair.bob.inbox)
    while pair.bob.inbox:
        pair.deliver(pair.bob, check_replay=False)
    if ratchet_step:
        pair.send(pair.bob)
        pair.drain()
    for _ in range(later):
        pair.send(pair.alice)
    pending = list(pair.bob.inbox)
    assert pair.bob.peer is not None
    stolen = pairwise.PeerSessions.from_dict(roundtrip(pair.bob.peer.to_dict()))
    stolen_keys = PrekeyStore.from_dict(roundtrip(pair.bob.prekeys.to_dict()))
    for payload, _ in early:
        with pytest.raises(E2EEError):
            pairwise.decrypt(pair.bob.identity, stolen, payload, pair.alice.key, stolen_keys, T0)
    # (Messages still in flight are readable, as they must be for Bob.)
    for payload, text in pending:
        assert pairwise.decrypt(pair.bob.identity, stolen, payload, pair.alice.key, stolen_keys, T0).plaintext == text


def test_used_message_keys_are_not_in_saved_state() -> None:
    pair = Pair()
    pair.send(pair.alice)
    pair.send(pair.alice)
    pair.deliver(pair.bob, 1)  # skips 0: its key is kept
    assert pair.bob.peer is not None
    assert pair.bob.peer.session.skipped_count == 1
    pair.deliver(pair.bob, 0)  # uses it: gone
    assert pair.bob.peer.session.skipped_count == 0


def test_replay_from_a_finished_chain() -> None:
    pair = Pair()
    pair.send(pair.alice)
    pair.send(pair.alice)
    m0, m1 = pair.bob.inbox[0][0], pair.bob.inbox[1][0]
    pair.deliver(pair.bob, 1)  # m1 first: m0's key is kept as skipped
    pair.send(pair.bob)
    pair.deliver(pair.alice)
    pair.send(pair.alice)  # a new chain: Alice's first ratchet key is finished
    pair.deliver(pair.bob, 1)
    pair.deliver(pair.bob, 0)  # m0, from the finished chain's skipped key
    for payload in (m0, m1):
        with pytest.raises(ReplayError):
            pair.receive(pair.bob, payload)

# -- (e) skip bounds and the skipped-key store -------------------------------


def ratchet_pair() -> tuple[Session, Session]:
    sk, ad, spk = bytes(range(32)), bytes(64), X25519KeyPair(bytes(range(32, 64)))
    return Session.initiator(sk, ad, spk.public, counter_random(7)), Session.responder(sk, ad, spk)


def test_too_many_skipped_is_refused_and_changes_nothing() -> None:
    alice, bob = ratchet_pair()
    msgs = [alice.encrypt(b"%d" % i, counter_random(i)) for i in range(MAX_SKIP + 3)]
    assert bob.decrypt(*msgs[0], T0) == b"0"
    before = bob.to_dict()
    with pytest.raises(TooManySkippedError):
        bob.decrypt(*msgs[MAX_SKIP + 2], T0)  # needs 1001 skipped keys
    assert bob.to_dict() == before
    assert bob.decrypt(*msgs[1], T0) == b"1"
    assert bob.decrypt(*msgs[MAX_SKIP + 2], T0) == b"%d" % (MAX_SKIP + 2)  # exactly 1000 now
    assert bob.skipped_count == MAX_SKIP


def test_too_many_skipped_in_pairwise_payload() -> None:
    pair = Pair()
    pair.send(pair.alice)
    pair.deliver(pair.bob)
    for _ in range(MAX_SKIP + 2):
        pair.send(pair.alice)
    payload, _ = pair.bob.inbox[-1]
    assert pair.bob.peer is not None
    before = pair.bob.peer.to_dict()
    with pytest.raises(TooManySkippedError):
        pair.receive(pair.bob, payload)
    assert pair.bob.peer.to_dict() == before


def test_skipped_keys_evict_the_oldest_beyond_the_cap() -> None:
    alice, bob = ratchet_pair()
    chains = []
    for r in range(3):
        n = MAX_SKIP + 1 if r < 2 else 11
        chain = [alice.encrypt(b"x", counter_random(10_000 * r + i)) for i in range(n)]
        assert bob.decrypt(*chain[-1], T0) == b"x"
        chains.append(chain)
        alice.decrypt(*bob.encrypt(b"back", counter_random(99 + r)), T0)
    assert bob.skipped_count == MAX_SKIPPED_KEYS
    for header, ct in chains[0][:10]:  # the ten oldest were evicted
        with pytest.raises(ReplayError):
            bob.decrypt(header, ct, T0)
    assert bob.decrypt(*chains[0][10], T0) == b"x"
    assert bob.decrypt(*chains[2][0], T0) == b"x"


def test_skipped_keys_expire_after_30_days() -> None:
    alice, bob = ratchet_pair()
    first, second, third = (alice.encrypt(b"%d" % i, counter_random(i)) for i in range(3))
    bob.decrypt(*third, T0)
    assert bob.decrypt(*second, T0 + SKIPPED_KEY_TTL_MS - 1) == b"1"
    with pytest.raises(ReplayError):
        bob.decrypt(*first, T0 + SKIPPED_KEY_TTL_MS)


def test_responder_cannot_send_first() -> None:
    _, bob = ratchet_pair()
    with pytest.raises(NoSessionError):
        bob.encrypt(b"too early")


def test_session_from_dict_refuses_garbage() -> None:
    alice, _ = ratchet_pair()
    good = alice.to_dict()
    for bad in [None, [], {**good, "v": 2}, {**good, "rk": b"short"}, {**good, "ns": -1},
                {**good, "ns": True}, {**good, "skipped": [[b"x" * 32, 0, b"k"]]}, {**good, "dhs": None}]:
        with pytest.raises(DecodeError):
            Session.from_dict(bad)


# -- (g) prekey message refusals ---------------------------------------------


def test_prekey_message_from_another_identity_is_refused() -> None:
    pair = Pair()
    pair.send(pair.alice)
    payload, _ = pair.bob.inbox.pop()
    mallory = SigningKey(counter_random(5)(32))
    with pytest.raises(IdentityMismatchError):
        pairwise.decrypt(pair.bob.identity, None, payload, bytes(mallory.verify_key), pair.bob.prekeys, T0)


def test_used_one_time_prekey_is_refused() -> None:
    pair = Pair()
    bundle = pair.bob.bundle()
    pair.send(pair.alice)
    pair.deliver(pair.bob)  # uses and removes the OPK
    # Alice starts over with the same (now used) bundle: a new EK_A, the same OPK id.
    assert pair.alice.peer is not None
    again = pairwise.start_session(pair.alice.identity, bundle, pair.alice.peer, counter_random(77))
    payload = pairwise.encrypt(again, b"again", counter_random(78))
    with pytest.raises(UnknownPrekeyError):
        pair.receive(pair.bob, payload)


def test_unknown_signed_prekey_is_refused() -> None:
    pair = Pair()
    bob = pair.bob
    spk = bob.prekeys.current_signed_prekey
    assert spk is not None
    forged = Bundle(bob.key, spk.id + 7, spk.key_pair.public, spk.signature, None, None)
    peer = pairwise.start_session(pair.alice.identity, forged, None, counter_random(3))
    with pytest.raises(UnknownPrekeyError):
        pair.receive(bob, pairwise.encrypt(peer, b"hi", counter_random(4)))


def test_later_prekey_messages_do_not_use_the_prekey_again() -> None:
    pair = Pair()
    pair.send(pair.alice)
    pair.send(pair.alice)
    first, _ = pair.bob.inbox[0]
    out = pair.receive(pair.bob, first)
    assert out.used_one_time_prekey == 1
    pair.bob.peer = out.peer
    pair.bob.prekeys.remove_one_time_prekey(1)
    second, text = pair.bob.inbox[1]
    out = pair.receive(pair.bob, second)
    assert (out.plaintext, out.used_one_time_prekey) == (text, None)


def test_new_session_replaces_current_only_once_it_decrypts() -> None:
    pair = Pair()
    pair.send(pair.alice)
    pair.drain()
    assert pair.bob.peer is not None
    old = pair.bob.peer.to_dict()
    # Alice starts a new session (say she lost hers); a garbled first message changes nothing.
    pair.alice.peer = pairwise.start_session(pair.alice.identity, pair.bob.bundle(), None, counter_random(9))
    payload = pairwise.encrypt(pair.alice.peer, b"new", counter_random(10))
    with pytest.raises(BadMacError):
        pair.receive(pair.bob, payload[:-1] + bytes([payload[-1] ^ 1]))
    assert pair.bob.peer.to_dict() == old
    out = pair.receive(pair.bob, payload)
    assert out.plaintext == b"new"
    assert len(out.peer.records()) == 2
    assert out.peer.previous[0].origin == pair.bob.peer.current.origin  # the old one, kept


def test_normal_message_without_session() -> None:
    pair, payload, _ = conversation_mid_way()
    with pytest.raises(NoSessionError):
        pairwise.decrypt(pair.bob.identity, None, payload, pair.alice.key, pair.bob.prekeys, T0)


def test_bad_spk_signature_is_refused() -> None:
    bob = make_device("bob", 200)
    alice = make_device("alice", 100)
    good = bob.bundle()
    other = SigningKey(counter_random(11)(32))
    for sig in (bytes(64), sign(other, good.spk), good.spk_sig[:-1] + bytes([good.spk_sig[-1] ^ 1])):
        bad = Bundle(good.identity_key, good.spk_id, good.spk, sig, good.opk_id, good.opk)
        with pytest.raises(BadSignatureError):
            initiate(alice.identity, bad)


@pytest.mark.parametrize("point", LOW_ORDER, ids=["zero", "one", "order8"])
def test_low_order_keys_are_refused(point: bytes) -> None:
    bob = make_device("bob", 200)
    alice = make_device("alice", 100)
    good = bob.bundle()
    # The owner signs a small-order SPK: the signature is fine, the DH is not.
    bad_spk = Bundle(good.identity_key, good.spk_id, point, sign(bob.identity, point), None, None)
    with pytest.raises(BadKeyError):
        initiate(alice.identity, bad_spk)
    bad_opk = Bundle(good.identity_key, good.spk_id, good.spk, good.spk_sig, 9, point)
    with pytest.raises(BadKeyError):
        initiate(alice.identity, bad_opk)
    spk = bob.prekeys.current_signed_prekey
    assert spk is not None
    with pytest.raises(BadKeyError):
        respond(bob.identity, alice.key, point, spk.key_pair, None)
    # A ratchet header carrying it.
    pair, payload, _ = conversation_mid_way()
    msg = pairwise.decode_payload(payload)
    assert pair.bob.peer is not None
    with pytest.raises(BadKeyError):
        pair.bob.peer.session.copy().decrypt(point + msg.header[32:], msg.ciphertext, T0)


def test_identity_key_libsodium_refuses() -> None:
    bob = make_device("bob", 200)
    spk = bob.prekeys.current_signed_prekey
    assert spk is not None
    with pytest.raises(BadKeyError):  # the Ed25519 neutral element: small order
        respond(bob.identity, b"\x01" + bytes(31), X25519KeyPair(bytes(32)).public, spk.key_pair, None)


# -- decoding ----------------------------------------------------------------


def packed(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


HEADER, CT, KEY = bytes(40), bytes(40), bytes(32)
BAD_PAYLOADS = [
    b"",
    b"\xc1",
    packed([1, HEADER, CT]) + b"\x00",  # trailing bytes
    packed([1, HEADER]),
    packed([1, HEADER, CT, None]),
    packed([3, HEADER, CT]),
    packed([True, HEADER, CT]),
    packed({"1": HEADER}),
    packed([1, HEADER[:-1], CT]),
    packed([1, HEADER, CT[:-1]]),
    packed([1, HEADER.decode("latin-1"), CT]),
    packed([2, KEY, KEY, 1, 1, HEADER]),
    packed([2, KEY[:-1], KEY, 1, 1, HEADER, CT]),
    packed([2, KEY, KEY, -1, 1, HEADER, CT]),
    packed([2, KEY, KEY, 1, 2**32, HEADER, CT]),
    packed([2, KEY, KEY, 1, b"1", HEADER, CT]),
]


@pytest.mark.parametrize("payload", BAD_PAYLOADS)
def test_decode_payload_is_strict(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        pairwise.decode_payload(payload)


def test_payload_roundtrip() -> None:
    for p in (
        pairwise.Payload(HEADER, CT),
        pairwise.Payload(HEADER, CT + b"more", pairwise.PrekeyInfo(KEY, KEY, 2**32 - 1, None)),
        pairwise.Payload(HEADER, CT, pairwise.PrekeyInfo(KEY, KEY, 0, 7)),
    ):
        assert pairwise.decode_payload(pairwise.encode_payload(p)) == p


def bundle_entry(**changes: object) -> dict:
    bob = make_device("bob", 200)
    spk = bob.prekeys.current_signed_prekey
    assert spk is not None
    entry: dict = {
        "device": 3,
        "identity_key": bob.key,
        "signed_prekey": spk.public(),
        "prekey": {"id": 5, "key": KEY},
    }
    entry.update(changes)
    return entry


@pytest.mark.parametrize(
    "changes",
    [
        {"device": 0}, {"device": 256}, {"device": "1"}, {"identity_key": KEY[:-1]},
        {"identity_key": KEY.hex()}, {"signed_prekey": None}, {"signed_prekey": {"id": 1, "key": KEY}},
        {"signed_prekey": {"id": -1, "key": KEY, "sig": bytes(64)}},
        {"signed_prekey": {"id": 1, "key": KEY, "sig": bytes(63)}},
        {"prekey": {"id": 2**32, "key": KEY}}, {"prekey": {"id": 1, "key": bytes(33)}},
        {"prekey": [1, KEY]}, {"prekey": {"id": False, "key": KEY}},
    ],
)
def test_bundle_from_wire_is_strict(changes: dict) -> None:
    with pytest.raises(DecodeError):
        Bundle.from_wire(bundle_entry(**changes))


def test_bundle_from_wire() -> None:
    b = Bundle.from_wire(bundle_entry())
    assert (b.opk_id, b.opk) == (5, KEY)
    b = Bundle.from_wire(bundle_entry(prekey=None, extra="ignored"))
    assert (b.opk_id, b.opk) == (None, None)
    with pytest.raises(DecodeError):
        Bundle.from_wire("not a map")


# -- the prekey store --------------------------------------------------------


def test_prekey_ids_and_rotation() -> None:
    identity = SigningKey(bytes(32))
    store = PrekeyStore()
    assert store.needs_rotation(T0) and store.current_signed_prekey is None
    first = store.new_signed_prekey(identity, T0)
    assert first.id == 1 and store.current_signed_prekey is first
    assert not store.needs_rotation(T0 + SPK_ROTATE_MS - 1)
    assert store.needs_rotation(T0 + SPK_ROTATE_MS)
    second = store.new_signed_prekey(identity, T0 + SPK_ROTATE_MS)
    assert second.id == 2
    assert store.signed_prekey(1) is first  # still answers old bundles
    store.expire(T0 + SPK_KEEP_MS - 1)
    assert store.signed_prekey(1) is first
    store.expire(T0 + SPK_KEEP_MS)
    with pytest.raises(UnknownPrekeyError):
        store.signed_prekey(1)
    store.expire(T0 + 10 * SPK_KEEP_MS)  # never the current one
    assert store.signed_prekey(2) is second
    assert store.new_signed_prekey(identity, T0).id == 3  # ids are never reused

    batch = store.new_one_time_prekeys(OPK_BATCH)
    assert [p.id for p in batch] == list(range(1, OPK_BATCH + 1))
    assert store.one_time_count == OPK_BATCH
    assert store.one_time_prekey(OPK_BATCH) is batch[-1]  # lookup does not remove
    store.remove_one_time_prekey(OPK_BATCH)
    store.remove_one_time_prekey(OPK_BATCH)  # twice is harmless
    with pytest.raises(UnknownPrekeyError):
        store.one_time_prekey(OPK_BATCH)
    assert [p.id for p in store.new_one_time_prekeys(2)] == [OPK_BATCH + 1, OPK_BATCH + 2]
    assert [p.id for p in store.one_time_prekeys_after(OPK_BATCH - 2)] == [OPK_BATCH - 1, OPK_BATCH + 1, OPK_BATCH + 2]
    assert first.public().keys() == {"id", "key", "sig"} and batch[0].public().keys() == {"id", "key"}

    restored = PrekeyStore.from_dict(roundtrip(store.to_dict()))
    assert restored.to_dict() == store.to_dict()
    assert restored.new_one_time_prekeys(1)[0].id == OPK_BATCH + 3
    assert restored.new_signed_prekey(identity, T0).id == 4


@pytest.mark.parametrize(
    "change",
    [
        {"v": 9}, {"last_spk_id": -1}, {"signed": None}, {"signed": [[1, bytes(31), bytes(64), 0]]},
        {"one_time": [[999, bytes(32)]]}, {"current_spk": 42}, {"one_time": [[1, bytes(32)], [1, bytes(32)]]},
    ],
)
def test_prekey_store_from_dict_refuses_garbage(change: dict) -> None:
    store = PrekeyStore()
    store.new_signed_prekey(SigningKey(bytes(32)), T0)
    store.new_one_time_prekeys(2)
    with pytest.raises(DecodeError):
        PrekeyStore.from_dict({**store.to_dict(), **change})
    with pytest.raises(DecodeError):
        PrekeyStore.from_dict([])


def test_peer_sessions_from_dict_refuses_garbage() -> None:
    pair = Pair()
    assert pair.alice.peer is not None
    good = pair.alice.peer.to_dict()
    for bad in [None, {**good, "v": 0}, {**good, "sessions": []}, {**good, "sessions": [good["sessions"][0]] * 5},
                {**good, "their_identity_key": b""}, {**good, "sessions": [{**good["sessions"][0], "pending": 1}]}]:
        with pytest.raises(DecodeError):
            pairwise.PeerSessions.from_dict(bad)
