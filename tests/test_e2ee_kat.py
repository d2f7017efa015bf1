"""Known answers: RFC 5869, libsignal's fingerprint vector, and our FROZEN
vectors in tests/vectors/ (x3dh.json, ratchet.json, safety_number.json),
recomputed with the library and compared byte for byte.

The vectors were made once by tests/vectors/make_pairwise_vectors.py. If a
test here fails, the code changed the profile's bytes: fix the code, never
regenerate the vectors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from relay.e2ee import pairwise
from relay.e2ee.prekeys import PrekeyStore
from relay.e2ee.primitives import (
    X25519KeyPair,
    aead_decrypt,
    dh,
    ed25519_pk_to_x25519,
    ed25519_seed_to_x25519,
    hkdf,
    hmac_sha256,
)
from relay.e2ee.safety import fingerprint, format_safety_number, safety_number
from relay.e2ee.x3dh import Bundle, initiate, respond
from tests.e2ee_draws import fixed

VECTORS = Path(__file__).resolve().parent / "vectors"


def load(name: str) -> dict:
    return json.loads((VECTORS / name).read_text())




h = bytes.fromhex


# -- RFC 5869, appendix A, test cases 1-3 (SHA-256) ---------------------------

RFC5869 = [
    (  # case 1: basic
        b"\x0b" * 22,
        bytes(range(0x00, 0x0D)),
        bytes(range(0xF0, 0xFA)),
        42,
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
    ),
    (  # case 2: longer inputs and outputs
        bytes(range(0x00, 0x50)),
        bytes(range(0x60, 0xB0)),
        bytes(range(0xB0, 0x100)),
        82,
        "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
        "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
        "cc30c58179ec3e87c14c01d5c1f3434f1d87",
    ),
    (  # case 3: zero-length salt and info (the profile's "empty salt")
        b"\x0b" * 22,
        b"",
        b"",
        42,
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
    ),
]


@pytest.mark.parametrize("ikm,salt,info,length,okm", RFC5869, ids=["case1", "case2", "case3"])
def test_hkdf_rfc5869(ikm: bytes, salt: bytes, info: bytes, length: int, okm: str) -> None:
    assert hkdf(ikm, info, length, salt=salt).hex() == okm


# -- libsignal NumericFingerprintGeneratorTest (displayable, 5200 iterations) --

LIBSIGNAL_ALICE = h("0506863bc66d02b40d27b8d49ca7c09e9239236f9d7d25d6fcca5ce13c7064d868")
LIBSIGNAL_BOB = h("05f781b6fb32fed9ba1cf2de978d4d5da28dc34046ae814402b5c0dbd96fda907b")
LIBSIGNAL_DISPLAY = "300354477692869396892869876765458257569162576843440918079131"


def test_libsignal_fingerprint_vector() -> None:
    # libsignal hashes its 33-byte 0x05-prefixed key; relay-v1 passes the raw 32 bytes.
    assert safety_number(LIBSIGNAL_ALICE, "+14152222222", LIBSIGNAL_BOB, "+14153333333") == LIBSIGNAL_DISPLAY
    assert safety_number(LIBSIGNAL_BOB, "+14153333333", LIBSIGNAL_ALICE, "+14152222222") == LIBSIGNAL_DISPLAY
    halves = {fingerprint(LIBSIGNAL_ALICE, b"+14152222222"), fingerprint(LIBSIGNAL_BOB, "+14153333333")}
    assert halves == {LIBSIGNAL_DISPLAY[:30], LIBSIGNAL_DISPLAY[30:]}


def test_safety_number_vector() -> None:
    v = load("safety_number.json")
    key_a, key_b = h(v["key_a"]), h(v["key_b"])
    assert fingerprint(key_a, v["id_a"], v["iterations"]) == v["fingerprint_a"]
    assert fingerprint(key_b, v["id_b"], v["iterations"]) == v["fingerprint_b"]
    assert safety_number(key_a, v["id_a"], key_b, v["id_b"]) == v["safety_number"]
    assert format_safety_number(v["safety_number"]) == v["formatted"]


def test_format_safety_number() -> None:
    assert format_safety_number("1234567890") == "12345 67890"
    for bad in ("1234", "12345a", "١٢٣٤٥"):
        with pytest.raises(ValueError):
            format_safety_number(bad)


# -- X3DH ---------------------------------------------------------------------


def test_x3dh_vector() -> None:
    v = load("x3dh.json")
    alice, bob = SigningKey(h(v["alice_identity_seed"])), SigningKey(h(v["bob_identity_seed"]))
    assert bytes(alice.verify_key).hex() == v["alice_identity_key"]
    assert bytes(bob.verify_key).hex() == v["bob_identity_key"]
    assert ed25519_seed_to_x25519(alice).hex() == v["alice_identity_x25519_private"]
    assert ed25519_pk_to_x25519(bytes(alice.verify_key)).hex() == v["alice_identity_x25519_public"]
    assert ed25519_pk_to_x25519(bytes(bob.verify_key)).hex() == v["bob_identity_x25519_public"]

    store = PrekeyStore()
    spk = store.new_signed_prekey(bob, 0, fixed([h(v["spk_private"])]))
    (opk,) = store.new_one_time_prekeys(1, fixed([h(v["opk_private"])]))
    assert spk.id == v["spk_id"]
    assert spk.key_pair.public.hex() == v["spk_public"]
    assert spk.signature.hex() == v["spk_sig"]
    assert opk.key_pair.public.hex() == v["opk_public"]

    for case in v["cases"]:
        with_opk = case["opk_id"] is not None
        bundle = Bundle.from_wire({
            "device": 1,
            "identity_key": bytes(bob.verify_key),
            "signed_prekey": spk.public(),
            "prekey": opk.public() if with_opk else None,
        })
        started = initiate(alice, bundle, fixed([h(case["alice_ephemeral_private"])]))
        assert started.ephemeral.public.hex() == case["alice_ephemeral_public"]
        assert (started.spk_id, started.opk_id) == (v["spk_id"], case["opk_id"])
        assert started.sk.hex() == case["sk"]
        assert started.ad.hex() == case["ad"]
        sk, ad = respond(
            bob, bytes(alice.verify_key), started.ephemeral.public, spk.key_pair,
            opk.key_pair if with_opk else None,
        )
        assert (sk.hex(), ad.hex()) == (case["sk"], case["ad"])
        # The DH outputs, and SK from them, straight from the profile's formula.
        dhs = [h(case[name]) for name in ("dh1", "dh2", "dh3", "dh4") if name in case]
        assert len(dhs) == (4 if with_opk else 3)
        assert hkdf(b"\xff" * 32 + b"".join(dhs), b"relay-v1 X3DH", 32, salt=bytes(32)).hex() == case["sk"]


# -- the ratchet and the payloads ---------------------------------------------


def test_ratchet_vector() -> None:
    x = load("x3dh.json")
    v = load("ratchet.json")
    with_opk = next(c for c in x["cases"] if c["name"] == "with_opk")
    alice, bob = SigningKey(h(x["alice_identity_seed"])), SigningKey(h(x["bob_identity_seed"]))
    ik = {"alice": bytes(alice.verify_key), "bob": bytes(bob.verify_key)}
    ad = h(with_opk["ad"])

    store = PrekeyStore()
    spk = store.new_signed_prekey(bob, 0, fixed([h(x["spk_private"])]))
    (opk,) = store.new_one_time_prekeys(1, fixed([h(x["opk_private"])]))
    bundle = Bundle.from_wire({
        "device": 1, "identity_key": ik["bob"], "signed_prekey": spk.public(), "prekey": opk.public(),
    })
    draws = [h(with_opk["alice_ephemeral_private"]), h(v["alice_ratchet_1"])]
    peers: dict[str, pairwise.PeerSessions | None] = {
        "alice": pairwise.start_session(alice, bundle, None, fixed(draws)),
        "bob": None,
    }
    identities = {"alice": alice, "bob": bob}
    stores = {"alice": PrekeyStore(), "bob": store}
    by_label = {m["label"]: m for m in v["messages"]}
    sent: dict[str, bytes] = {}

    for m in v["messages"]:
        text = h(m["plaintext"])
        # The message key alone opens the recorded ciphertext (no library state).
        assert aead_decrypt(h(m["message_key"]), h(m["ciphertext"]), ad + h(m["header"])) == text
        peer = peers[m["from"]]
        assert peer is not None
        payload = pairwise.encrypt(peer, text, fixed([h(d) for d in m["draws"]]))
        assert payload.hex() == m["payload"], m["label"]
        decoded = pairwise.decode_payload(payload)
        assert (decoded.prekey is not None) == m["prekey_form"]
        assert (decoded.header.hex(), decoded.ciphertext.hex()) == (m["header"], m["ciphertext"])
        sent[m["label"]] = payload

        for label in v["delivery"].get(m["label"], []):
            sender = by_label[label]["from"]
            receiver = "bob" if sender == "alice" else "alice"
            out = pairwise.decrypt(
                identities[receiver], peers[receiver], sent[label], ik[sender], stores[receiver], v["now_ms"]
            )
            assert out.plaintext == h(by_label[label]["plaintext"])
            peers[receiver] = out.peer
            if out.used_one_time_prekey is not None:
                stores[receiver].remove_one_time_prekey(out.used_one_time_prekey)
    assert stores["bob"].one_time_count == 0


def test_ratchet_vector_root_keys() -> None:
    """RK1..RK3 of ratchet.json follow from x3dh.json's SK by the profile's
    root KDF, and the first message key of each chain from its CK."""
    x = load("x3dh.json")
    v = load("ratchet.json")
    sk = h(next(c for c in x["cases"] if c["name"] == "with_opk")["sk"])
    a1, b1, a2 = (X25519KeyPair(h(v[k])) for k in ("alice_ratchet_1", "bob_ratchet_1", "alice_ratchet_2"))
    spk_pub = h(x["spk_public"])
    rk, chains = sk, []
    for private, public in ((a1.private, spk_pub), (b1.private, a1.public), (a2.private, b1.public)):
        out = hkdf(dh(private, public), b"relay-v1 root", 64, salt=rk)
        rk = out[:32]
        chains.append((rk, out[32:]))
    assert [r.hex() for r, _ in chains] == v["root_keys"]
    firsts = {"m0": chains[0][1], "r0": chains[1][1], "m2": chains[2][1]}
    by_label = {m["label"]: m for m in v["messages"]}
    for label, ck in firsts.items():
        k = hkdf(hmac_sha256(ck, b"\x01"), b"relay-v1 msg", 32, salt=b"")
        assert k.hex() == by_label[label]["message_key"]
