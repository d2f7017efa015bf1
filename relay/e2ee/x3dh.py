"""X3DH key agreement, profile ``relay-v1``.

The initiator parses one device entry of ``keys.fetch`` with
:meth:`Bundle.from_wire` (after checking its ``identity_key`` against
``devices.list``), calls :func:`initiate`, and starts a
:class:`~relay.e2ee.ratchet.Session` with the result. The responder calls
:func:`respond` with the prekeys a prekey message names. Both sides get the
same ``(sk, ad)``.

::

    DH1 = DH(IK_A, SPK_B)   DH2 = DH(EK_A, IK_B)   DH3 = DH(EK_A, SPK_B)
    DH4 = DH(EK_A, OPK_B)   (only when an OPK was handed out)
    SK  = HKDF(salt=0^32, IKM=0xFF^32 || DH1 || DH2 || DH3 [|| DH4], "relay-v1 X3DH", 32)
    AD  = IK_A || IK_B      (raw Ed25519 keys, initiator first)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from nacl.signing import SigningKey

from .errors import DecodeError
from .prekeys import expect_bin, expect_u32
from .primitives import (
    KEY_BYTES,
    SIG_BYTES,
    ZERO_SALT,
    Random,
    X25519KeyPair,
    dh,
    ed25519_pk_to_x25519,
    ed25519_seed_to_x25519,
    hkdf,
    verify,
)

__all__ = ["X3DH_INFO", "Bundle", "Initiated", "initiate", "respond"]

X3DH_INFO = b"relay-v1 X3DH"
# X3DH spec section 2.2: 32 0xFF bytes before the DH outputs when the curve is
# X25519, to separate these inputs from XEdDSA's use of the same keys.
_F = b"\xff" * KEY_BYTES


@dataclass(frozen=True)
class Bundle:
    """One device's prekey bundle as the relay hands it out."""

    identity_key: bytes
    spk_id: int
    spk: bytes
    spk_sig: bytes
    opk_id: int | None
    opk: bytes | None

    @classmethod
    def from_wire(cls, entry: Any) -> Bundle:
        """Parse ``{device, identity_key, signed_prekey: {id, key, sig},
        prekey: {id, key} or nil}`` from a ``keys.fetch`` answer.

        Keys beyond these are ignored (a newer relay may add some). Raises
        :class:`DecodeError` for a missing field, a wrong type, a key that is
        not 32 bytes, a signature that is not 64, an id that is not a u32 or
        a device that is not 1..255. The signature is checked by
        :func:`initiate`, not here.
        """
        if not isinstance(entry, dict):
            raise DecodeError("a bundle is a map")
        device = entry.get("device")
        if type(device) is not int or not 1 <= device <= 255:
            raise DecodeError("bundle device is not an int 1..255")
        identity_key = expect_bin(entry.get("identity_key"), KEY_BYTES, "bundle identity_key")
        spk = entry.get("signed_prekey")
        if not isinstance(spk, dict):
            raise DecodeError("bundle signed_prekey is not a map")
        spk_id = expect_u32(spk.get("id"), "signed prekey id")
        spk_key = expect_bin(spk.get("key"), KEY_BYTES, "signed prekey key")
        spk_sig = expect_bin(spk.get("sig"), SIG_BYTES, "signed prekey sig")
        # "prekey or nil": an absent key is read as nil too, the relay's
        # answer when the device has run out of one-time prekeys.
        opk = entry.get("prekey")
        if opk is None:
            return cls(identity_key, spk_id, spk_key, spk_sig, None, None)
        if not isinstance(opk, dict):
            raise DecodeError("bundle prekey is neither a map nor nil")
        opk_id = expect_u32(opk.get("id"), "one-time prekey id")
        opk_key = expect_bin(opk.get("key"), KEY_BYTES, "one-time prekey key")
        return cls(identity_key, spk_id, spk_key, spk_sig, opk_id, opk_key)


@dataclass(frozen=True)
class Initiated:
    """What :func:`initiate` agreed: the shared secret, the session AD, and
    what the prekey messages must carry (EK_A's public half and the ids)."""

    sk: bytes
    ad: bytes
    ephemeral: X25519KeyPair
    spk_id: int
    opk_id: int | None


def initiate(identity: SigningKey, bundle: Bundle, random: Random = os.urandom) -> Initiated:
    """X3DH as the initiator (A) towards ``bundle`` (B).

    Draws EK_A (32 bytes) from ``random``. Raises :class:`BadSignatureError`
    if the SPK signature does not verify under ``bundle.identity_key``, and
    :class:`BadKeyError` if libsodium refuses B's identity key for
    conversion or any DH output is all zeros (a small-order SPK or OPK).
    """
    verify(bundle.identity_key, bundle.spk, bundle.spk_sig)
    their_ik = ed25519_pk_to_x25519(bundle.identity_key)
    ephemeral = X25519KeyPair.generate(random)
    parts = [
        dh(ed25519_seed_to_x25519(identity), bundle.spk),
        dh(ephemeral.private, their_ik),
        dh(ephemeral.private, bundle.spk),
    ]
    if bundle.opk is not None:
        parts.append(dh(ephemeral.private, bundle.opk))
    ad = bytes(identity.verify_key) + bundle.identity_key
    return Initiated(_kdf(parts), ad, ephemeral, bundle.spk_id, bundle.opk_id)


def respond(
    identity: SigningKey,
    their_identity_key: bytes,
    their_ephemeral: bytes,
    spk: X25519KeyPair,
    opk: X25519KeyPair | None,
) -> tuple[bytes, bytes]:
    """X3DH as the responder (B): ``(sk, ad)`` for a prekey message from
    ``their_identity_key`` (IK_A) carrying ``their_ephemeral`` (EK_A).

    Raises :class:`BadKeyError` if libsodium refuses IK_A for conversion or
    any DH output is all zeros. Does not look at whether IK_A is the
    sender's registered key: that is the caller's check.
    """
    their_ik = ed25519_pk_to_x25519(their_identity_key)
    parts = [
        dh(spk.private, their_ik),
        dh(ed25519_seed_to_x25519(identity), their_ephemeral),
        dh(spk.private, their_ephemeral),
    ]
    if opk is not None:
        parts.append(dh(opk.private, their_ephemeral))
    return _kdf(parts), their_identity_key + bytes(identity.verify_key)


def _kdf(parts: list[bytes]) -> bytes:
    return hkdf(_F + b"".join(parts), X3DH_INFO, 32, salt=ZERO_SALT)
