"""relay.e2ee.sender_keys: Sender Keys chains, their bounds and the frozen vectors."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl import bindings as sodium
from nacl.signing import SigningKey

from relay.e2ee import plaintext
from relay.e2ee.errors import (
    BadKeyError,
    BadMacError,
    BadSignatureError,
    DecodeError,
    E2EEError,
    NoSessionError,
    ReplayError,
    TooManySkippedError,
)
from relay.e2ee.sender_keys import (
    MAX_CHAINS,
    MAX_JUMP,
    MAX_SKIPPED,
    MIN_PAYLOAD_BYTES,
    OwnChain,
    SenderChains,
    peek_chain_id,
)

GROUP = "g.cmVsYXktdjEgdmVjdG9ycw"
OTHER_GROUP = "g.AAAAAAAAAAAAAAAAAAAAAA"
VECTORS = json.loads((Path(__file__).parent / "vectors" / "sender_keys.json").read_text())


def seeded(seed: int) -> Callable[[int], bytes]:
    """A deterministic ``random`` (SHA-256 in counter mode), so hypothesis can replay."""
    counter = [0]

    def draw(n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(b"%d/%d" % (seed, counter[0])).digest()
            counter[0] += 1
        return out[:n]

    return draw


def pair(seed: int = 0) -> tuple[OwnChain, SenderChains]:
    sender = OwnChain.generate(seeded(seed))
    receiver = SenderChains()
    receiver.add(plaintext.decode(plaintext.encode(sender.distribution(GROUP, 1))))
    return sender, receiver


def body(i: int) -> bytes:
    return plaintext.encode(plaintext.text(f"message {i}", i))


def send(sender: OwnChain, count: int, seed: int = 0) -> list[bytes]:
    rnd = seeded(seed + 1000)
    return [sender.encrypt(GROUP, body(i), rnd) for i in range(count)]


def snapshot(receiver: SenderChains) -> bytes:
    packed: bytes = msgpack.packb(receiver.to_dict(), use_bin_type=True)
    return packed


# --- delivery order, replays, tampering -------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.permutations(range(n))), st.integers(0, 2**16))
def test_any_order_decrypts_each_once(order: list[int], seed: int) -> None:
    sender, receiver = pair(seed)
    payloads = send(sender, len(order), seed)
    for i in order:
        assert receiver.decrypt(GROUP, payloads[i]) == body(i)
    for i in order:
        before = snapshot(receiver)
        with pytest.raises(ReplayError):
            receiver.decrypt(GROUP, payloads[i])
        assert snapshot(receiver) == before


@settings(max_examples=80, deadline=None)
@given(st.data(), st.integers(0, 2**16))
def test_any_flipped_byte_is_refused_and_the_chain_goes_on(data: st.DataObject, seed: int) -> None:
    sender, receiver = pair(seed)
    payloads = send(sender, 3, seed)
    # The next message, one ahead (keys to skip), or one behind (a skipped key).
    path = data.draw(st.sampled_from(["next", "ahead", "skipped"]))
    if path == "skipped":
        receiver.decrypt(GROUP, payloads[2])
    target = {"next": 0, "ahead": 2, "skipped": 0}[path]
    genuine = payloads[target]
    index = data.draw(st.integers(0, len(genuine) - 1))  # signature bytes included
    mask = data.draw(st.integers(1, 255))
    forged = bytearray(genuine)
    forged[index] ^= mask
    before = snapshot(receiver)
    with pytest.raises(E2EEError):
        receiver.decrypt(GROUP, bytes(forged))
    assert snapshot(receiver) == before
    assert receiver.decrypt(GROUP, genuine) == body(target)


def test_flips_are_caught_by_the_signature_before_decrypting() -> None:
    sender, receiver = pair()
    (payload,) = send(sender, 1)
    for index in range(4, len(payload)):  # past chain_id, which only finds no chain
        forged = bytearray(payload)
        forged[index] ^= 0x80
        with pytest.raises(BadSignatureError):
            receiver.decrypt(GROUP, bytes(forged))
    forged = bytearray(payload)
    forged[0] ^= 0x80
    with pytest.raises(NoSessionError):
        receiver.decrypt(GROUP, bytes(forged))
    assert receiver.decrypt(GROUP, payload) == body(0)


def test_truncated_or_empty_payloads_are_decode_errors() -> None:
    sender, receiver = pair()
    (payload,) = send(sender, 1)
    for cut in (0, 3, 4, MIN_PAYLOAD_BYTES - 1):
        with pytest.raises(DecodeError):
            receiver.decrypt(GROUP, payload[:cut])
        with pytest.raises(DecodeError):
            peek_chain_id(payload[:cut])
    assert peek_chain_id(payload) == sender.chain_id
    # An empty plaintext makes the smallest payload.
    assert len(sender.encrypt(GROUP, b"")) == MIN_PAYLOAD_BYTES


def test_another_group_or_a_bad_group_id_is_refused() -> None:
    sender, receiver = pair()
    (payload,) = send(sender, 1)
    with pytest.raises(BadMacError):  # the group id is in the AD
        receiver.decrypt(OTHER_GROUP, payload)
    # The same on the skipped-key path: the key stays for the genuine message.
    (_, later) = send(sender, 2, seed=5)
    assert receiver.decrypt(GROUP, later) == body(1)
    before = snapshot(receiver)
    with pytest.raises(BadMacError):
        receiver.decrypt(OTHER_GROUP, payload)
    assert snapshot(receiver) == before
    with pytest.raises(DecodeError):
        receiver.decrypt("g.short", payload)
    with pytest.raises(ValueError):
        sender.encrypt("not-a-group", b"x")
    with pytest.raises(ValueError):
        sender.distribution("g.short", 1)
    assert receiver.decrypt(GROUP, payload) == body(0)


def test_signature_by_another_key_fails() -> None:
    sender, receiver = pair()
    # Same chain key and chain_id, another signing key: a member who knows the
    # chain key (every member does) cannot forge the sender's messages.
    impostor = OwnChain(sender.chain_id, sender.chain_key, b"\x55" * 32)
    forged = impostor.encrypt(GROUP, body(0))
    before = snapshot(receiver)
    with pytest.raises(BadSignatureError):
        receiver.decrypt(GROUP, forged)
    assert snapshot(receiver) == before
    # A valid body re-signed by the impostor fails too.
    (genuine,) = send(sender, 1)
    resigned = genuine[:-64] + SigningKey(b"\x55" * 32).sign(genuine[:-64]).signature
    with pytest.raises(BadSignatureError):
        receiver.decrypt(GROUP, resigned)
    assert receiver.decrypt(GROUP, genuine) == body(0)


# --- bounds -----------------------------------------------------------------------


def test_jump_over_1000_is_refused_with_state_unchanged() -> None:
    sender, receiver = pair()
    payloads = send(sender, MAX_JUMP + 2)
    before = snapshot(receiver)
    with pytest.raises(TooManySkippedError):
        receiver.decrypt(GROUP, payloads[MAX_JUMP + 1])  # skips 1001
    assert snapshot(receiver) == before
    assert receiver.decrypt(GROUP, payloads[MAX_JUMP]) == body(MAX_JUMP)  # skips exactly 1000
    assert receiver.decrypt(GROUP, payloads[0]) == body(0)
    assert receiver.decrypt(GROUP, payloads[MAX_JUMP + 1]) == body(MAX_JUMP + 1)


def test_at_most_2000_skipped_keys_oldest_evicted() -> None:
    sender, receiver = pair()
    payloads = send(sender, 3 * MAX_JUMP + 3)
    for i in (MAX_JUMP, 2 * MAX_JUMP + 1, 3 * MAX_JUMP + 2):  # 3000 keys skipped in all
        receiver.decrypt(GROUP, payloads[i])
    assert len(receiver.to_dict()["skipped"]) == MAX_SKIPPED
    with pytest.raises(ReplayError):
        receiver.decrypt(GROUP, payloads[0])  # evicted
    with pytest.raises(ReplayError):
        receiver.decrypt(GROUP, payloads[MAX_JUMP - 1])  # evicted
    assert receiver.decrypt(GROUP, payloads[MAX_JUMP + 1]) == body(MAX_JUMP + 1)  # kept
    assert receiver.decrypt(GROUP, payloads[3 * MAX_JUMP + 1]) == body(3 * MAX_JUMP + 1)


def test_previous_five_chains_still_decrypt_late_messages() -> None:
    receiver = SenderChains()
    chains, late = [], []
    # The profile's numbers, not the module's constants: current + previous 5.
    assert MAX_CHAINS == 1 + 5 and MAX_JUMP == 1000 and MAX_SKIPPED == 2000
    for n in range(1 + 5 + 1):  # 7 chains: the first one falls out
        chain = OwnChain.generate(seeded(100 + n))
        receiver.add(chain.distribution(GROUP, n))
        chains.append(chain)
        late.append(chain.encrypt(GROUP, body(n)))
    assert receiver.current_chain_id == chains[-1].chain_id
    assert receiver.chain_ids == [c.chain_id for c in chains[1:]]
    with pytest.raises(NoSessionError):
        receiver.decrypt(GROUP, late[0])
    for n in range(1, 1 + 5 + 1):
        assert receiver.decrypt(GROUP, late[n]) == body(n)


def test_evicted_chain_takes_its_skipped_keys_along() -> None:
    receiver = SenderChains()
    first = OwnChain.generate(seeded(1))
    receiver.add(first.distribution(GROUP, 0))
    payloads = [first.encrypt(GROUP, body(i)) for i in range(5)]
    receiver.decrypt(GROUP, payloads[4])
    assert len(receiver.to_dict()["skipped"]) == 4
    for n in range(MAX_CHAINS):
        receiver.add(OwnChain.generate(seeded(50 + n)).distribution(GROUP, 0))
    assert receiver.to_dict()["skipped"] == []


# --- membership changes -------------------------------------------------------------


def test_removed_member_cannot_read_the_new_chain() -> None:
    alice_old = OwnChain.generate(seeded(1))
    bob, carol = SenderChains(), SenderChains()  # both receive alice's chains
    for member in (bob, carol):
        member.add(plaintext.decode(plaintext.encode(alice_old.distribution(GROUP, 1))))
    first = alice_old.encrypt(GROUP, body(0))
    assert bob.decrypt(GROUP, first) == carol.decrypt(GROUP, first) == body(0)

    # Carol is removed: Alice starts a new chain and tells Bob only.
    alice_new = OwnChain.generate(seeded(2))
    assert alice_new.chain_id != alice_old.chain_id
    bob.add(alice_new.distribution(GROUP, 2))
    after = alice_new.encrypt(GROUP, body(1))
    assert bob.decrypt(GROUP, after) == body(1)
    before = snapshot(carol)
    with pytest.raises(NoSessionError):
        carol.decrypt(GROUP, after)
    assert snapshot(carol) == before
    # Even given the payload's chain_id, the old chain's keys do not open it.
    forged = alice_old.chain_id.to_bytes(4, "big") + after[4:]
    with pytest.raises(BadSignatureError):
        carol.decrypt(GROUP, forged)


def test_generate_avoids_previous_chain_ids() -> None:
    first = OwnChain.generate(seeded(4))
    again = OwnChain.generate(seeded(4), avoid={first.chain_id})
    assert again.chain_id != first.chain_id
    assert OwnChain.generate(seeded(4)).chain_id == first.chain_id


def test_readding_a_known_chain_keeps_what_we_have() -> None:
    sender, receiver = pair()
    payloads = send(sender, 6)
    assert receiver.decrypt(GROUP, payloads[2]) == body(2)
    kept = snapshot(receiver)
    # Ahead (the sender re-sends its current state, e.g. to a new member)...
    receiver.add(sender.distribution(GROUP, 9))
    assert snapshot(receiver) == kept
    # ... or behind (a replayed old skdm must not reopen used iterations).
    receiver.add({**sender.distribution(GROUP, 9), "iteration": 0, "chain_key": bytes(32)})
    assert snapshot(receiver) == kept
    assert receiver.decrypt(GROUP, payloads[0]) == body(0)
    with pytest.raises(ReplayError):
        receiver.decrypt(GROUP, payloads[2])
    # A known chain that is not current does not become current again.
    newer = OwnChain.generate(seeded(9))
    receiver.add(newer.distribution(GROUP, 1))
    receiver.add(sender.distribution(GROUP, 2))
    assert receiver.current_chain_id == newer.chain_id


def test_distribution_joins_mid_chain() -> None:
    sender = OwnChain.generate(seeded(3))
    early = send(sender, 3)
    skdm = sender.distribution(GROUP, 42)
    assert skdm == {
        "type": "skdm",
        "ts": 42,
        "group": GROUP,
        "chain_id": sender.chain_id,
        "iteration": 3,
        "chain_key": sender.chain_key,
        "signing_key": sender.signing_key,
    }
    late_joiner = SenderChains()
    late_joiner.add(skdm)
    later = sender.encrypt(GROUP, body(3))
    assert late_joiner.decrypt(GROUP, later) == body(3)
    with pytest.raises(ReplayError):  # before its distribution: never had the keys
        late_joiner.decrypt(GROUP, early[0])


@pytest.mark.parametrize(
    "change",
    [
        {"type": "text"},
        {"chain_id": -1},
        {"iteration": 2**32},
        {"chain_key": b"short"},
        {"signing_key": "00" * 32},
        {"group": "g.bad"},
        {"ts": None},
    ],
)
def test_add_refuses_bad_skdm(change: dict) -> None:
    sender, receiver = pair()
    other = OwnChain.generate(seeded(5))
    before = snapshot(receiver)
    with pytest.raises(DecodeError):
        receiver.add({**other.distribution(GROUP, 1), **change})
    assert snapshot(receiver) == before


def test_add_refuses_a_signing_key_libsodium_refuses() -> None:
    receiver = SenderChains()
    small_order = bytes([1] + [0] * 31)  # the identity point
    skdm = {**OwnChain.generate(seeded(6)).distribution(GROUP, 1), "signing_key": small_order}
    with pytest.raises(BadKeyError):
        receiver.add(skdm)
    assert receiver.chain_ids == []


def test_payload_without_any_chain_is_no_session() -> None:
    sender = OwnChain.generate(seeded(7))
    with pytest.raises(NoSessionError):
        SenderChains().decrypt(GROUP, sender.encrypt(GROUP, b"x"))


# --- persistence ----------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 30), max_size=12), st.integers(0, 2**16))
def test_to_dict_from_dict_round_trips(delivered: list[int], seed: int) -> None:
    sender, receiver = pair(seed)
    payloads = send(sender, 31, seed)
    for i in dict.fromkeys(delivered):
        receiver.decrypt(GROUP, payloads[i])
    stored = msgpack.unpackb(snapshot(receiver), raw=False)
    copy = SenderChains.from_dict(stored)
    assert snapshot(copy) == snapshot(receiver)
    # The copy behaves exactly as the original from here on.
    for i in range(31):
        if i in delivered:
            with pytest.raises(ReplayError):
                receiver.decrypt(GROUP, payloads[i])
            with pytest.raises(ReplayError):
                copy.decrypt(GROUP, payloads[i])
        else:
            assert (
                copy.decrypt(GROUP, payloads[i]) == receiver.decrypt(GROUP, payloads[i]) == body(i)
            )

    own = OwnChain.from_dict(msgpack.unpackb(msgpack.packb(sender.to_dict()), raw=False))
    assert own.to_dict() == sender.to_dict()
    assert own.encrypt(GROUP, b"x", seeded(1)) == sender.encrypt(GROUP, b"x", seeded(1))


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        {},
        {"v": 2, "chains": [], "skipped": []},
        {"v": 1, "chains": "x", "skipped": []},
        {"v": 1, "chains": [1], "skipped": []},
        {"v": 1, "chains": [{"chain_id": 1}], "skipped": []},
        {"v": 1, "chains": [], "skipped": [[1, 0, bytes(32)]]},  # a key of no chain
    ],
)
def test_sender_chains_from_dict_refuses_garbage(bad: object) -> None:
    with pytest.raises(DecodeError):
        SenderChains.from_dict(bad)


def test_from_dict_refuses_inconsistent_state() -> None:
    sender, receiver = pair()
    payloads = send(sender, 3)
    receiver.decrypt(GROUP, payloads[2])
    good = receiver.to_dict()
    cid = sender.chain_id
    for skipped in (
        [[cid, 3, bytes(32)]],
        [[cid, 0, bytes(32)], [cid, 0, bytes(32)]],
        [[cid, 0, b"k"]],
    ):
        with pytest.raises(DecodeError):
            SenderChains.from_dict({**good, "skipped": skipped})
    chain = good["chains"][0]
    for change in (
        {"signing_key": bytes([1] + [0] * 31)},
        {"chain_id": 2**32},
        {"iteration": True},
    ):
        with pytest.raises(DecodeError):
            SenderChains.from_dict({**good, "chains": [{**chain, **change}]})
    with pytest.raises(DecodeError):
        SenderChains.from_dict({**good, "chains": [chain, chain]})
    for bad in (
        None,
        {"v": 1},
        {**sender.to_dict(), "signing_seed": b"x"},
        {**sender.to_dict(), "chain_id": 2**32},
    ):
        with pytest.raises(DecodeError):
            OwnChain.from_dict(bad)


def test_secrets_stay_out_of_repr() -> None:
    sender, receiver = pair()
    assert sender.chain_key.hex() not in repr(sender)
    assert "chain_key" not in repr(receiver)


def test_own_chain_refuses_exhausted_chain_without_advancing() -> None:
    sender = OwnChain(1, bytes(32), bytes(32), iteration=2**32 - 1)
    last = sender.encrypt(GROUP, b"last")
    assert peek_chain_id(last) == 1 and last[4:8] == b"\xff\xff\xff\xff"
    with pytest.raises(ValueError):
        sender.encrypt(GROUP, b"one too many")
    assert sender.iteration == 2**32


# --- frozen vectors -------------------------------------------------------------------


def fixed(value: bytes) -> Callable[[int], bytes]:
    def draw(n: int) -> bytes:
        assert n == len(value)
        return value

    return draw


def reference_payload(
    group: str,
    chain_id: int,
    iteration: int,
    chain_key: bytes,
    seed: bytes,
    nonce: bytes,
    body: bytes,
) -> bytes:
    """The profile's group message, written out from PROTOCOL.md with raw
    primitives, independently of relay.e2ee."""
    seed_i = hmac.new(chain_key, b"\x01", hashlib.sha256).digest()
    prk = hmac.new(bytes(32), seed_i, hashlib.sha256).digest()  # HKDF extract, empty salt
    key = hmac.new(prk, b"relay-v1 group\x01", hashlib.sha256).digest()  # expand, one block
    head = chain_id.to_bytes(4, "big") + iteration.to_bytes(4, "big")
    sealed = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
        body, group.encode("ascii") + head, nonce, key
    )
    signed = head + nonce + sealed
    return signed + SigningKey(seed).sign(signed).signature


def test_frozen_sender_key_vectors() -> None:
    v = VECTORS
    assert v["description"]
    group, chain_id = v["group"], v["chain_id"]
    chain_key, seed = bytes.fromhex(v["chain_key"]), bytes.fromhex(v["signing_seed"])
    assert bytes(SigningKey(seed).verify_key).hex() == v["signing_key"]

    # Sender direction: each recorded iteration from the chain state it names.
    sender = OwnChain(chain_id, chain_key, seed)
    assert plaintext.encode(sender.distribution(group, v["ts"])).hex() == v["skdm"]
    for m in v["messages"]:
        ck, nonce, body_ = (bytes.fromhex(m[k]) for k in ("chain_key", "nonce", "plaintext"))
        at = OwnChain(chain_id, ck, seed, iteration=m["iteration"])
        assert at.encrypt(group, body_, fixed(nonce)).hex() == m["payload"]
        assert (
            reference_payload(group, chain_id, m["iteration"], ck, seed, nonce, body_).hex()
            == m["payload"]
        )
        prk = hmac.new(
            bytes(32), hmac.new(ck, b"\x01", hashlib.sha256).digest(), hashlib.sha256
        ).digest()
        assert hmac.new(prk, b"relay-v1 group\x01", hashlib.sha256).hexdigest() == m["message_key"]
    # The chain keys follow CK' = HMAC(CK, 0x02) from iteration 0.
    ck = chain_key
    for i in range(max(m["iteration"] for m in v["messages"]) + 1):
        for m in v["messages"]:
            if m["iteration"] == i:
                assert ck.hex() == m["chain_key"]
        sender.encrypt(group, b"", fixed(bytes(24)))
        ck = hmac.new(ck, b"\x02", hashlib.sha256).digest()
        assert sender.chain_key == ck

    # Receiver direction: the skdm, then 5 (skipping 2..4), 0, 1.
    receiver = SenderChains()
    receiver.add(plaintext.decode(bytes.fromhex(v["skdm"])))
    by_iteration = {m["iteration"]: m for m in v["messages"]}
    for i in (5, 0, 1):
        payload = bytes.fromhex(by_iteration[i]["payload"])
        assert receiver.decrypt(group, payload).hex() == by_iteration[i]["plaintext"]
        assert plaintext.decode(bytes.fromhex(by_iteration[i]["plaintext"]))["type"] == "text"
