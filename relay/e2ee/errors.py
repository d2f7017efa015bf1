"""Every refusal of the ``relay-v1`` profile, each its own exception.

::

    E2EEError                       base: a message or key that cannot be used
    ├── DecodeError                 bytes that are not the shape the profile says
    ├── BadKeyError                 a key libsodium refuses (small order, all-zero DH, ...)
    ├── BadSignatureError           an Ed25519 signature that does not verify
    ├── BadMacError                 AEAD authentication failed (tampered or wrong key)
    ├── UnknownPrekeyError          a prekey message names a prekey id we do not have
    │                               (never published, or already used)
    ├── IdentityMismatchError       a prekey message's IK_A is not the sender's registered key
    ├── TooManySkippedError         a message needs more skipped keys than the bound allows
    ├── ReplayError                 a message whose key was already used (or is too old)
    ├── NoSessionError              no pairwise session / no sender key chain for this sender
    └── MediaError                  a media blob that fails its hash or its stream

Every function that raises one leaves the session (or chain) state as it was
before the call, so a refused message never makes a session unusable.
"""

from __future__ import annotations

__all__ = [
    "BadKeyError",
    "BadMacError",
    "BadSignatureError",
    "DecodeError",
    "E2EEError",
    "IdentityMismatchError",
    "MediaError",
    "NoSessionError",
    "ReplayError",
    "TooManySkippedError",
    "UnknownPrekeyError",
]


class E2EEError(Exception):
    """Base of every refusal; ``str()`` is a one-line reason fit for a user."""


class DecodeError(E2EEError):
    """Bytes that do not have the shape of the profile's encoding."""


class BadKeyError(E2EEError):
    """A public key libsodium refuses, or a DH whose output is all zeros."""


class BadSignatureError(E2EEError):
    """An Ed25519 signature that fails ``crypto_sign_verify_detached``."""


class BadMacError(E2EEError):
    """XChaCha20-Poly1305 authentication failed: tampered, or the wrong key."""


class UnknownPrekeyError(E2EEError):
    """A prekey message names a signed or one-time prekey we do not hold."""


class IdentityMismatchError(E2EEError):
    """A prekey message's IK_A differs from the sender's registered identity key."""


class TooManySkippedError(E2EEError):
    """Decrypting would need more skipped message keys than allowed (1000 per chain)."""


class ReplayError(E2EEError):
    """The message key for this counter was already used (or never kept)."""


class NoSessionError(E2EEError):
    """No pairwise session, or no sender-key chain, for this sender."""


class MediaError(E2EEError):
    """A media blob whose sha256 or secretstream does not check out."""
