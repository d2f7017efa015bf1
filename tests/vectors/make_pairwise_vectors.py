"""Make the FROZEN vectors x3dh.json, ratchet.json and safety_number.json, once.

    python tests/vectors/make_pairwise_vectors.py [--force]

The tests never run this: they recompute every value with the library and
compare byte for byte, so a change that alters a single byte of the profile's
X3DH, ratchet, payload or safety number fails them. Besides running the
library, this script derives the DH outputs, root, chain and message keys a
second way, straight from the primitives and the profile's text, and asserts
that both agree before it writes anything. It refuses to overwrite an
existing file without ``--force``; never regenerate to make a failing test pass.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from nacl.signing import SigningKey  # noqa: E402

from relay.e2ee import pairwise  # noqa: E402
from relay.e2ee.prekeys import PrekeyStore  # noqa: E402
from relay.e2ee.primitives import (  # noqa: E402
    X25519KeyPair,
    aead_decrypt,
    dh,
    ed25519_pk_to_x25519,
    ed25519_seed_to_x25519,
    hkdf,
    hmac_sha256,
    u32,
)
from relay.e2ee.safety import fingerprint, format_safety_number, safety_number  # noqa: E402
from relay.e2ee.x3dh import Bundle, initiate, respond  # noqa: E402
from tests.e2ee_draws import fixed  # noqa: E402

T0 = 1_700_000_000_000


def secret(label: str) -> bytes:
    """A fixed 32-byte input, documented by its label."""
    return hashlib.sha256(b"relay-v1 vectors " + label.encode()).digest()


def nonce(label: str) -> bytes:
    return secret("nonce " + label)[:24]



# -- a second derivation, from the profile's text ---------------------------


def ref_x3dh(alice: SigningKey, bob: SigningKey, spk: bytes, opk: bytes | None, ek: bytes) -> dict[str, bytes]:
    spk_pub = X25519KeyPair(spk).public
    out = {
        "dh1": dh(ed25519_seed_to_x25519(alice), spk_pub),
        "dh2": dh(ek, ed25519_pk_to_x25519(bytes(bob.verify_key))),
        "dh3": dh(ek, spk_pub),
    }
    if opk is not None:
        out["dh4"] = dh(ek, X25519KeyPair(opk).public)
    ikm = b"\xff" * 32 + b"".join(out.values())
    out["sk"] = hkdf(ikm, b"relay-v1 X3DH", 32, salt=bytes(32))
    out["ad"] = bytes(alice.verify_key) + bytes(bob.verify_key)
    return out


def ref_root(rk: bytes, dh_out: bytes) -> tuple[bytes, bytes]:
    out = hkdf(dh_out, b"relay-v1 root", 64, salt=rk)
    return out[:32], out[32:]


def ref_message_keys(ck: bytes, count: int) -> list[bytes]:
    keys = []
    for _ in range(count):
        keys.append(hkdf(hmac_sha256(ck, b"\x01"), b"relay-v1 msg", 32, salt=b""))
        ck = hmac_sha256(ck, b"\x02")
    return keys


# -- the vectors -------------------------------------------------------------

ALICE_SEED = secret("alice identity seed")
BOB_SEED = secret("bob identity seed")
SPK_PRIVATE = secret("bob signed prekey")
OPK_PRIVATE = secret("bob one-time prekey")
EK_WITH_OPK = secret("alice ephemeral, with opk")
EK_WITHOUT_OPK = secret("alice ephemeral, without opk")
SPK_ID = 1
OPK_ID = 1


def bob_store(bob: SigningKey) -> PrekeyStore:
    store = PrekeyStore()
    store.new_signed_prekey(bob, T0, fixed([SPK_PRIVATE]))
    store.new_one_time_prekeys(1, fixed([OPK_PRIVATE]))
    return store


def bundle(bob: SigningKey, store: PrekeyStore, with_opk: bool) -> Bundle:
    spk = store.signed_prekey(SPK_ID)
    entry = {
        "device": 1,
        "identity_key": bytes(bob.verify_key),
        "signed_prekey": spk.public(),
        "prekey": store.one_time_prekey(OPK_ID).public() if with_opk else None,
    }
    return Bundle.from_wire(entry)


def x3dh_vectors() -> dict[str, object]:
    alice, bob = SigningKey(ALICE_SEED), SigningKey(BOB_SEED)
    store = bob_store(bob)
    spk = store.signed_prekey(SPK_ID)
    cases = []
    for name, ek, with_opk in (("with_opk", EK_WITH_OPK, True), ("without_opk", EK_WITHOUT_OPK, False)):
        b = bundle(bob, store, with_opk)
        started = initiate(alice, b, fixed([ek]))
        opk_pair = store.one_time_prekey(OPK_ID).key_pair if with_opk else None
        sk, ad = respond(bob, bytes(alice.verify_key), started.ephemeral.public, spk.key_pair, opk_pair)
        ref = ref_x3dh(alice, bob, SPK_PRIVATE, OPK_PRIVATE if with_opk else None, ek)
        assert started.sk == sk == ref["sk"] and started.ad == ad == ref["ad"]
        case: dict[str, object] = {
            "name": name,
            "alice_ephemeral_private": ek.hex(),
            "alice_ephemeral_public": started.ephemeral.public.hex(),
            "opk_id": OPK_ID if with_opk else None,
        }
        case.update({k: v.hex() for k, v in ref.items()})
        cases.append(case)
    return {
        "description": (
            "relay-v1 X3DH, FROZEN. Alice (initiator) and Bob (responder) are Ed25519 identities "
            "from the 32-byte seeds given (identity_key = raw public key; *_x25519 = libsodium's "
            "conversion: crypto_sign_ed25519_sk_to_curve25519 of the seed's key for the private "
            "half, crypto_sign_ed25519_pk_to_curve25519 for the public). Bob's SPK (id spk_id) and "
            "OPK (id opk_id) are X25519 keys from the private bytes given; spk_sig = Ed25519 by "
            "Bob over the 32 raw SPK public bytes. For each case, Alice's ephemeral EK_A is the "
            "private key given; dh1 = X25519(IK_A, SPK_B), dh2 = X25519(EK_A, IK_B), dh3 = "
            "X25519(EK_A, SPK_B), dh4 = X25519(EK_A, OPK_B) (only with_opk); sk = HKDF-SHA-256("
            "salt = 32 zero bytes, IKM = 32 x 0xFF || dh1 || dh2 || dh3 [|| dh4], info = "
            "'relay-v1 X3DH', 32); ad = IK_A || IK_B. All bytes hex. Made once by "
            "make_pairwise_vectors.py; never regenerate."
        ),
        "alice_identity_seed": ALICE_SEED.hex(),
        "alice_identity_key": bytes(alice.verify_key).hex(),
        "alice_identity_x25519_private": ed25519_seed_to_x25519(alice).hex(),
        "alice_identity_x25519_public": ed25519_pk_to_x25519(bytes(alice.verify_key)).hex(),
        "bob_identity_seed": BOB_SEED.hex(),
        "bob_identity_key": bytes(bob.verify_key).hex(),
        "bob_identity_x25519_public": ed25519_pk_to_x25519(bytes(bob.verify_key)).hex(),
        "spk_id": SPK_ID,
        "spk_private": SPK_PRIVATE.hex(),
        "spk_public": spk.key_pair.public.hex(),
        "spk_sig": spk.signature.hex(),
        "opk_private": OPK_PRIVATE.hex(),
        "opk_public": store.one_time_prekey(OPK_ID).key_pair.public.hex(),
        "cases": cases,
    }


# The exchange: (sender, label, plaintext, extra draws before the nonce)
ALICE_RATCHET_1 = secret("alice ratchet 1")
BOB_RATCHET_1 = secret("bob ratchet 1")
ALICE_RATCHET_2 = secret("alice ratchet 2")
EXCHANGE: list[tuple[str, str, bytes, list[bytes]]] = [
    ("alice", "m0", b"hello bob (prekey form, N=0)", []),
    ("alice", "m1", b"still waiting (prekey form, N=1)", []),
    ("bob", "r0", b"hi alice (Bob's first ratchet key)", [BOB_RATCHET_1]),
    ("alice", "m2", b"normal form now (ratchet step, PN=2, N=0)", [ALICE_RATCHET_2]),
    ("alice", "m3", b"N=1, delivered last", []),
    ("alice", "m4", b"N=2, delivered before m3", []),
]
# What each side decrypts, in this order, after the message is sent (None:
# nothing yet). m3 arrives after m4: Bob uses a skipped key.
DELIVER_AFTER = {"m1": ["m0", "m1"], "r0": ["r0"], "m4": ["m2", "m4", "m3"]}


def ratchet_vectors() -> dict[str, object]:
    alice, bob = SigningKey(ALICE_SEED), SigningKey(BOB_SEED)
    store = bob_store(bob)
    alice_peer = pairwise.start_session(
        alice, bundle(bob, store, True), None, fixed([EK_WITH_OPK, ALICE_RATCHET_1])
    )
    bob_peer: pairwise.PeerSessions | None = None
    ik = {"alice": bytes(alice.verify_key), "bob": bytes(bob.verify_key)}

    ref = ref_x3dh(alice, bob, SPK_PRIVATE, OPK_PRIVATE, EK_WITH_OPK)
    spk_pub = X25519KeyPair(SPK_PRIVATE).public
    a1, b1, a2 = (X25519KeyPair(k) for k in (ALICE_RATCHET_1, BOB_RATCHET_1, ALICE_RATCHET_2))
    rk1, ck_a1 = ref_root(ref["sk"], dh(a1.private, spk_pub))
    rk2, ck_b1 = ref_root(rk1, dh(b1.private, a1.public))
    rk3, ck_a2 = ref_root(rk2, dh(a2.private, b1.public))
    keys = dict(zip(["m0", "m1"], ref_message_keys(ck_a1, 2), strict=True))
    keys["r0"] = ref_message_keys(ck_b1, 1)[0]
    keys.update(zip(["m2", "m3", "m4"], ref_message_keys(ck_a2, 3), strict=True))
    headers = {
        "m0": a1.public + u32(0) + u32(0),
        "m1": a1.public + u32(0) + u32(1),
        "r0": b1.public + u32(0) + u32(0),
        "m2": a2.public + u32(2) + u32(0),
        "m3": a2.public + u32(2) + u32(1),
        "m4": a2.public + u32(2) + u32(2),
    }

    sent: dict[str, bytes] = {}
    messages = []
    for sender, label, text, extra in EXCHANGE:
        draws = [*extra, nonce(label)]
        peer = alice_peer if sender == "alice" else bob_peer
        assert peer is not None
        payload = pairwise.encrypt(peer, text, fixed(list(draws)))
        decoded = pairwise.decode_payload(payload)
        assert decoded.header == headers[label], label
        assert aead_decrypt(keys[label], decoded.ciphertext, ref["ad"] + decoded.header) == text
        sent[label] = payload
        messages.append({
            "label": label,
            "from": sender,
            "plaintext": text.hex(),
            "draws": [d.hex() for d in draws],
            "header": decoded.header.hex(),
            "message_key": keys[label].hex(),
            "ciphertext": decoded.ciphertext.hex(),
            "prekey_form": decoded.prekey is not None,
            "payload": payload.hex(),
        })
        for got in DELIVER_AFTER.get(label, []):
            if got.startswith("m"):
                out = pairwise.decrypt(bob, bob_peer, sent[got], ik["alice"], store, T0)
                bob_peer = out.peer
                if out.used_one_time_prekey is not None:
                    store.remove_one_time_prekey(out.used_one_time_prekey)
            else:
                out = pairwise.decrypt(alice, alice_peer, sent[got], ik["bob"], PrekeyStore(), T0)
                alice_peer = out.peer
            assert out.plaintext == next(t for _, lb, t, _ in EXCHANGE if lb == got)

    return {
        "description": (
            "relay-v1 Double Ratchet and pairwise payloads, FROZEN. Identities, Bob's SPK/OPK and "
            "the X3DH are x3dh.json's case with_opk (sk, ad as there). Alice starts the session "
            "drawing EK_A then her first ratchet key (alice_ratchet_1); every encrypt draws the "
            "message's 'draws' in order: a new ratchet private key first when it is the first "
            "message after a DH ratchet step, then the 24-byte nonce (our library draws that key "
            "at the encrypt, another may draw it at the decrypt before: the bytes sent are the "
            "same). root_keys: RK1, CK = HKDF(salt=SK, DH(alice_ratchet_1, SPK_B), 'relay-v1 root', "
            "64); RK2 from DH(bob_ratchet_1, alice_ratchet_1); RK3 from DH(alice_ratchet_2, "
            "bob_ratchet_1). message_key = HKDF(empty salt, HMAC-SHA-256(CK, 0x01), 'relay-v1 msg', "
            "32), CK' = HMAC-SHA-256(CK, 0x02). header = ratchet public || PN u32 || N u32; "
            "ciphertext = nonce || XChaCha20-Poly1305-IETF(message_key, plaintext, AD = ad || "
            "header) || tag; payload = msgpack [1, header, ciphertext] or, while Alice has not "
            "yet decrypted a message from Bob, [2, IK_A, EK_A, spk_id, opk_id, header, "
            "ciphertext]. delivery: right after the message named by the key is sent, its "
            "receiver decrypts the messages listed, in that order (Bob reads m4 before m3, "
            "from a skipped key); 'now_ms' is the time passed to every decrypt. All bytes hex. Made once by make_pairwise_vectors.py; never "
            "regenerate."
        ),
        "now_ms": T0,
        "alice_ratchet_1": ALICE_RATCHET_1.hex(),
        "bob_ratchet_1": BOB_RATCHET_1.hex(),
        "alice_ratchet_2": ALICE_RATCHET_2.hex(),
        "root_keys": [rk1.hex(), rk2.hex(), rk3.hex()],
        "messages": messages,
        "delivery": DELIVER_AFTER,
    }


def safety_vectors() -> dict[str, object]:
    alice, bob = SigningKey(ALICE_SEED), SigningKey(BOB_SEED)
    key_a, key_b = bytes(alice.verify_key), bytes(bob.verify_key)
    digits = safety_number(key_a, "alice", key_b, "bob")
    return {
        "description": (
            "relay-v1 safety number (libsignal numeric fingerprint, version 0), FROZEN. key_* = "
            "x3dh.json's raw 32-byte Ed25519 identity keys, id_* = user names (UTF-8). "
            "fingerprint = 30 digits from H5200, H1 = SHA-512(0x0000 || key || id || key), Hi = "
            "SHA-512(H(i-1) || key), six 5-byte big-endian chunks mod 100000 as %05d; "
            "safety_number = both fingerprints sorted ascending and joined; formatted = groups of "
            "5 separated by spaces. Made once by make_pairwise_vectors.py; never regenerate."
        ),
        "key_a": key_a.hex(),
        "id_a": "alice",
        "key_b": key_b.hex(),
        "id_b": "bob",
        "iterations": 5200,
        "fingerprint_a": fingerprint(key_a, "alice"),
        "fingerprint_b": fingerprint(key_b, "bob"),
        "safety_number": digits,
        "formatted": format_safety_number(digits),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args()
    outputs = {
        "x3dh.json": x3dh_vectors(),
        "ratchet.json": ratchet_vectors(),
        "safety_number.json": safety_vectors(),
    }
    for name, data in outputs.items():
        path = HERE / name
        if path.exists() and not args.force:
            print(f"{path} exists; not overwritten (--force to do it anyway)", file=sys.stderr)
            continue
        path.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
