"""Safety numbers: libsignal's numeric fingerprint, version 0.

For each party::

    H1 = SHA-512(0x0000 || key || id || key),  Hi = SHA-512(H(i-1) || key),  5200 hashes in all
    30 digits = six times (5 bytes of H, big-endian, mod 100000, as %05d)

and the safety number is the two 30-digit halves sorted ascending and joined
(60 digits), so both parties see the same number. In ``relay-v1`` ``key`` is
the device's raw 32-byte Ed25519 key and ``id`` the user name in UTF-8;
libsignal's own test vector uses its 33-byte 0x05-prefixed keys, which these
functions accept as well (they hash whatever bytes they are given).
"""

from __future__ import annotations

import hashlib

__all__ = ["FINGERPRINT_ITERATIONS", "fingerprint", "format_safety_number", "safety_number"]

FINGERPRINT_ITERATIONS = 5200
_VERSION = b"\x00\x00"


def fingerprint(key: bytes, ident: str | bytes, iterations: int = FINGERPRINT_ITERATIONS) -> str:
    """One party's 30 digits. ``ValueError`` if ``iterations`` < 1."""
    if iterations < 1:
        raise ValueError("at least one iteration")
    ident_bytes = ident.encode() if isinstance(ident, str) else ident
    digest = _VERSION + key + ident_bytes
    for _ in range(iterations):
        digest = hashlib.sha512(digest + key).digest()
    return "".join(
        f"{int.from_bytes(digest[i : i + 5], 'big') % 100000:05d}" for i in range(0, 30, 5)
    )


def safety_number(key_a: bytes, id_a: str | bytes, key_b: bytes, id_b: str | bytes) -> str:
    """The 60 digits both parties see; the order of the two parties does not matter."""
    return "".join(sorted((fingerprint(key_a, id_a), fingerprint(key_b, id_b))))


def format_safety_number(digits: str) -> str:
    """``digits`` in groups of five separated by spaces (12 groups for 60 digits).
    ``ValueError`` unless it is all ASCII digits, a multiple of five long."""
    if not (digits.isascii() and digits.isdigit()) or len(digits) % 5:
        raise ValueError("a safety number is ASCII digits in groups of five")
    return " ".join(digits[i : i + 5] for i in range(0, len(digits), 5))
