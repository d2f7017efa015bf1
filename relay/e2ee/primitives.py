"""The profile's building blocks over libsodium (PyNaCl) and the stdlib.

Pure functions, no state, no I/O. Randomness comes from a caller-supplied
``Random`` (``os.urandom`` by default) so that the frozen test vectors can
fix every key and nonce.
"""

from __future__ import annotations

import hmac
import os
import struct
from collections.abc import Callable

from nacl import bindings as sodium
from nacl.exceptions import CryptoError
from nacl.signing import SigningKey, VerifyKey

from .errors import BadKeyError, BadMacError, BadSignatureError, DecodeError

__all__ = [
    "KEY_BYTES",
    "NONCE_BYTES",
    "SIG_BYTES",
    "TAG_BYTES",
    "Random",
    "X25519KeyPair",
    "aead_decrypt",
    "aead_encrypt",
    "dh",
    "ed25519_pk_to_x25519",
    "ed25519_seed_to_x25519",
    "hkdf",
    "hmac_sha256",
    "sign",
    "u32",
    "verify",
]

Random = Callable[[int], bytes]

KEY_BYTES = 32
NONCE_BYTES = 24
TAG_BYTES = 16
SIG_BYTES = 64
ZERO_SALT = bytes(32)

_U32 = struct.Struct(">I")


def u32(value: int) -> bytes:
    """A big-endian u32 (the profile's integer encoding)."""
    return _U32.pack(value)


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    # hmac.digest is OpenSSL's one-shot HMAC: no Python HMAC object per call.
    return hmac.digest(key, data, "sha256")


def hkdf(ikm: bytes, info: bytes, length: int, salt: bytes = ZERO_SALT) -> bytes:
    """HKDF-SHA-256 (RFC 5869). An empty ``salt`` is the RFC's default: 32
    zero bytes (HMAC pads a short key with zeros, so both are the same)."""
    if length > 255 * 32:
        raise ValueError("HKDF output too long")
    prk = hmac_sha256(salt or ZERO_SALT, ikm)
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac_sha256(prk, block + info + bytes((counter,)))
        out += block
        counter += 1
    return out[:length]


class X25519KeyPair:
    """An X25519 key pair from 32 secret bytes (clamped by libsodium on use)."""

    __slots__ = ("private", "public")

    def __init__(self, private: bytes) -> None:
        if len(private) != KEY_BYTES:
            raise ValueError("an X25519 private key is 32 bytes")
        self.private = bytes(private)
        self.public = sodium.crypto_scalarmult_base(self.private)

    @classmethod
    def generate(cls, random: Random = os.urandom) -> X25519KeyPair:
        return cls(random(KEY_BYTES))

    def __repr__(self) -> str:  # never print the private half
        return f"X25519KeyPair(public={self.public.hex()[:16]}...)"


def dh(private: bytes, public: bytes) -> bytes:
    """X25519(private, public); :class:`BadKeyError` for a malformed key or an
    all-zero output (a small-order public key)."""
    if len(public) != KEY_BYTES:
        raise BadKeyError("an X25519 public key is 32 bytes")
    try:
        out = sodium.crypto_scalarmult(private, public)
    except (CryptoError, RuntimeError, ValueError, TypeError) as exc:
        raise BadKeyError(f"X25519 refused the key: {exc}") from None
    if not any(out):
        raise BadKeyError("X25519 output is all zeros (small-order public key)")
    return bytes(out)


def ed25519_pk_to_x25519(identity_key: bytes) -> bytes:
    """An Ed25519 identity key converted to X25519, as libsodium does;
    :class:`BadKeyError` where libsodium refuses the key."""
    if len(identity_key) != KEY_BYTES:
        raise BadKeyError("an Ed25519 public key is 32 bytes")
    try:
        return bytes(sodium.crypto_sign_ed25519_pk_to_curve25519(identity_key))
    except (CryptoError, RuntimeError, ValueError, TypeError) as exc:
        raise BadKeyError(f"libsodium refuses this Ed25519 key: {exc}") from None


def ed25519_seed_to_x25519(signing_key: SigningKey) -> bytes:
    """The X25519 private key of an Ed25519 identity (libsodium's conversion)."""
    return bytes(signing_key.to_curve25519_private_key())


def sign(signing_key: SigningKey, message: bytes) -> bytes:
    return bytes(signing_key.sign(message).signature)


def verify(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Ed25519 ``crypto_sign_verify_detached``; :class:`BadSignatureError` on failure."""
    if len(signature) != SIG_BYTES:
        raise BadSignatureError("an Ed25519 signature is 64 bytes")
    if len(public_key) != KEY_BYTES:
        raise BadSignatureError("an Ed25519 public key is 32 bytes")
    try:
        VerifyKey(public_key).verify(message, signature)
    except Exception:  # BadSignatureError, or a key libsodium cannot decode
        raise BadSignatureError("Ed25519 signature does not verify") from None


def aead_encrypt(key: bytes, plaintext: bytes, ad: bytes, random: Random = os.urandom) -> bytes:
    """XChaCha20-Poly1305 (libsodium ``_ietf``) with a random 24-byte nonce:
    returns nonce || ciphertext || 16-byte tag."""
    nonce = random(NONCE_BYTES)
    return nonce + sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key)


def aead_decrypt(key: bytes, data: bytes, ad: bytes) -> bytes:
    """Inverse of :func:`aead_encrypt`; :class:`BadMacError` when it does not authenticate."""
    if len(data) < NONCE_BYTES + TAG_BYTES:
        raise DecodeError("ciphertext shorter than nonce and tag")
    try:
        return bytes(
            sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(data[NONCE_BYTES:], ad, data[:NONCE_BYTES], key)
        )
    except CryptoError:
        raise BadMacError("message authentication failed (tampered, or the wrong key)") from None
