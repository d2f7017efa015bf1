"""Make the FROZEN vectors sender_keys.json and media.json, once.

    python tests/vectors/make_group_vectors.py [--force]

The tests never run this: they check the JSON files byte for byte, so a
change to the profile's group or media code that alters a single byte fails
them. It refuses to overwrite an existing file without ``--force``; never
regenerate to make a failing test pass (the media blobs would differ anyway:
libsodium draws the secretstream header itself).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from relay.e2ee import plaintext  # noqa: E402
from relay.e2ee.media import encrypt_media  # noqa: E402
from relay.e2ee.primitives import hkdf, hmac_sha256  # noqa: E402
from relay.e2ee.sender_keys import OwnChain  # noqa: E402
from tests.e2ee_draws import fixed  # noqa: E402

GROUP = "g.cmVsYXktdjEgdmVjdG9ycw"  # "g." + base64url(b"relay-v1 vectors")
CHAIN_ID = 0x9E3779B9  # high bit set: the u32 is unsigned
CHAIN_KEY = bytes(range(32))
SIGNING_SEED = bytes(range(32, 64))
TS = 1_700_000_000_000
RECORDED = (0, 1, 5)
MEDIA_KEY = bytes(range(64, 96))


def nonce(iteration: int) -> bytes:
    return hashlib.sha256(b"relay-v1 group nonce %d" % iteration).digest()[:24]



def group_vectors() -> dict[str, object]:
    chain = OwnChain(CHAIN_ID, CHAIN_KEY, SIGNING_SEED)
    skdm = plaintext.encode(chain.distribution(GROUP, TS))
    messages = []
    for iteration in range(max(RECORDED) + 1):
        chain_key = chain.chain_key
        message_key = hkdf(hmac_sha256(chain_key, b"\x01"), b"relay-v1 group", 32, salt=b"")
        body = plaintext.encode(
            plaintext.text(f"hello group, iteration {iteration}", TS + iteration)
        )
        payload = chain.encrypt(GROUP, body, random=fixed([nonce(iteration)]))
        if iteration in RECORDED:
            messages.append(
                {
                    "iteration": iteration,
                    "chain_key": chain_key.hex(),
                    "message_key": message_key.hex(),
                    "nonce": nonce(iteration).hex(),
                    "plaintext": body.hex(),
                    "payload": payload.hex(),
                }
            )
    return {
        "description": (
            "relay-v1 Sender Keys, FROZEN. One OwnChain from chain_id, chain_key (CK at "
            "iteration 0) and the Ed25519 signing_seed (signing_key is its public key) "
            "encrypts the msgpack text plaintexts of iterations 0..5 in the group "
            "'group', each with the nonce given (iterations 2..4, not recorded, used "
            "their own). For each recorded iteration: chain_key = CK at that iteration, "
            "message_key = k = HKDF(empty salt, HMAC-SHA-256(CK, 0x01), 'relay-v1 group', 32), "
            "payload = u32 chain_id || u32 iteration || nonce || ciphertext || tag || "
            "Ed25519 signature. skdm = our encoding of distribution(group, ts) at "
            "iteration 0. Made once by make_group_vectors.py; never regenerate."
        ),
        "group": GROUP,
        "chain_id": CHAIN_ID,
        "chain_key": CHAIN_KEY.hex(),
        "signing_seed": SIGNING_SEED.hex(),
        "signing_key": chain.signing_key.hex(),
        "ts": TS,
        "skdm": skdm.hex(),
        "messages": messages,
    }


def pattern(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


def media_vectors() -> dict[str, object]:
    vectors = []
    for size in (0, 14, 65_536):
        data = b"relay-v1 media" if size == 14 else pattern(size)
        made = encrypt_media(data, key=MEDIA_KEY)
        entry: dict[str, object] = {"size": size}
        if size <= 64:
            entry["plaintext"] = data.hex()
        else:
            entry["plaintext_pattern"] = "byte i is i % 251"
        entry.update(
            plaintext_sha256=hashlib.sha256(data).hexdigest(),
            sha256=made.sha256.hex(),
            blob=made.blob.hex(),
        )
        vectors.append(entry)
    return {
        "description": (
            "relay-v1 media blobs, FROZEN, decrypt direction (libsodium draws the "
            "secretstream header, so encrypting again gives other bytes). blob = "
            "secretstream XChaCha20-Poly1305 header (24) || chunks of 65,536 plaintext "
            "bytes + 17, the last one (empty when size is a multiple of 65,536) tagged "
            "FINAL; sha256 is over the whole blob. Every vector uses 'key'. Made once by "
            "make_group_vectors.py; never regenerate."
        ),
        "key": MEDIA_KEY.hex(),
        "vectors": vectors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="overwrite existing vector files")
    args = parser.parse_args(argv)
    for name, make in (("sender_keys.json", group_vectors), ("media.json", media_vectors)):
        path = HERE / name
        if path.exists() and not args.force:
            print(f"{path} exists; frozen vectors are not regenerated (--force to override)")
            continue
        path.write_text(json.dumps(make(), indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
