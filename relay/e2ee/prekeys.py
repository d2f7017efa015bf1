"""A device's own prekeys: the signed prekey (SPK) and the one-time prekeys (OPK).

A :class:`PrekeyStore` issues them (what to put in ``keys.publish``), finds
them again by id when a prekey message names them (``signed_prekey`` /
``one_time_prekey``), and forgets them (``remove_one_time_prekey`` after the
session that used one is stored; ``expire`` for old SPKs). It is pure state:
the caller persists :meth:`PrekeyStore.to_dict` and passes the clock in.

Ids are u32, issued in increasing order per kind and never reused, even after
a prekey was used or expired (the profile requires it: a peer holding an old
bundle must never hit a different key under the same id).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from nacl.signing import SigningKey

from .errors import DecodeError, UnknownPrekeyError
from .primitives import KEY_BYTES, SIG_BYTES, Random, X25519KeyPair, sign

__all__ = [
    "OPK_BATCH",
    "SPK_KEEP_MS",
    "SPK_ROTATE_MS",
    "OneTimePrekey",
    "PrekeyStore",
    "SignedPrekey",
    "expect_bin",
    "expect_u32",
]

DAY_MS = 24 * 60 * 60 * 1000
SPK_ROTATE_MS = 7 * DAY_MS
SPK_KEEP_MS = 30 * DAY_MS
OPK_BATCH = 100

U32_MAX = 0xFFFFFFFF
_FORMAT = 1


@dataclass
class SignedPrekey:
    """An X25519 prekey signed (Ed25519, over its 32 raw public bytes) by the identity key."""

    id: int
    key_pair: X25519KeyPair
    signature: bytes
    created_ms: int

    def public(self) -> dict[str, Any]:
        """The wire map for ``keys.publish``: ``{"id", "key", "sig"}``."""
        return {"id": self.id, "key": self.key_pair.public, "sig": self.signature}


@dataclass
class OneTimePrekey:
    """An X25519 prekey handed out once by the relay and deleted on first use."""

    id: int
    key_pair: X25519KeyPair

    def public(self) -> dict[str, Any]:
        """The wire map for ``keys.publish``: ``{"id", "key"}``."""
        return {"id": self.id, "key": self.key_pair.public}


class PrekeyStore:
    """The prekeys of one device, keyed by id.

    Typical use: ``new_signed_prekey`` when ``needs_rotation(now)``, then
    ``expire(now)``; ``new_one_time_prekeys(OPK_BATCH)`` at registration and
    on ``keys.low``; publish ``.public()`` of each; persist ``to_dict()``.
    """

    def __init__(self) -> None:
        self._signed: dict[int, SignedPrekey] = {}
        self._one_time: dict[int, OneTimePrekey] = {}
        self._current_spk: int | None = None
        # Highest id ever issued per kind, kept after the prekey itself is gone.
        self._last_spk_id = 0
        self._last_opk_id = 0

    # -- issuing ---------------------------------------------------------

    def new_signed_prekey(
        self, identity: SigningKey, now_ms: int, random: Random = os.urandom
    ) -> SignedPrekey:
        """Make, sign and store a new SPK, which becomes the current one.

        Older SPKs stay findable until :meth:`expire` drops them. Raises
        ``OverflowError`` once u32 ids are exhausted (never in practice).
        """
        spk_id = _next_id(self._last_spk_id)
        pair = X25519KeyPair.generate(random)
        spk = SignedPrekey(spk_id, pair, sign(identity, pair.public), now_ms)
        self._signed[spk_id] = spk
        self._current_spk = spk_id
        self._last_spk_id = spk_id
        return spk

    def new_one_time_prekeys(self, count: int, random: Random = os.urandom) -> list[OneTimePrekey]:
        """Make and store ``count`` OPKs with fresh ids; ``ValueError`` for a negative count."""
        if count < 0:
            raise ValueError("count must be >= 0")
        made = []
        for _ in range(count):
            opk = OneTimePrekey(_next_id(self._last_opk_id), X25519KeyPair.generate(random))
            self._one_time[opk.id] = opk
            self._last_opk_id = opk.id
            made.append(opk)
        return made

    # -- rotation --------------------------------------------------------

    @property
    def current_signed_prekey(self) -> SignedPrekey | None:
        """The SPK to publish now, or None before the first one."""
        return None if self._current_spk is None else self._signed[self._current_spk]

    def needs_rotation(self, now_ms: int) -> bool:
        """True when there is no SPK yet or the current one is 7 days old or more."""
        current = self.current_signed_prekey
        return current is None or now_ms - current.created_ms >= SPK_ROTATE_MS

    def expire(self, now_ms: int) -> None:
        """Drop every SPK but the current one that is 30 days old or more.

        Age counts from creation, as the profile says ("keeps every SPK younger
        than 30 days"); the current SPK is kept whatever its age so that a
        device that was offline for a month can still answer.
        """
        for spk_id in [
            spk.id
            for spk in self._signed.values()
            if spk.id != self._current_spk and now_ms - spk.created_ms >= SPK_KEEP_MS
        ]:
            del self._signed[spk_id]

    # -- lookup ----------------------------------------------------------

    def signed_prekey(self, spk_id: int) -> SignedPrekey:
        """The SPK with this id; :class:`UnknownPrekeyError` if never issued or expired."""
        try:
            return self._signed[spk_id]
        except (KeyError, TypeError):
            raise UnknownPrekeyError(f"no signed prekey {spk_id!r}") from None

    def one_time_prekey(self, opk_id: int) -> OneTimePrekey:
        """The OPK with this id, left in place; :class:`UnknownPrekeyError` if
        never issued or already used."""
        try:
            return self._one_time[opk_id]
        except (KeyError, TypeError):
            raise UnknownPrekeyError(f"no one-time prekey {opk_id!r} (unknown or used)") from None

    def one_time_prekeys_after(self, opk_id: int) -> list[OneTimePrekey]:
        """The unused OPKs with an id above ``opk_id``, lowest first: those
        not yet published when ``opk_id`` is the highest id published."""
        return sorted((p for p in self._one_time.values() if p.id > opk_id), key=lambda p: p.id)

    def remove_one_time_prekey(self, opk_id: int) -> None:
        """Forget a used OPK. Removing one that is already gone is not an error,
        so a caller that crashed after storing its session can simply redo it."""
        self._one_time.pop(opk_id, None)

    @property
    def one_time_count(self) -> int:
        """How many OPKs are still unused (compare with the relay's ``keys.count``)."""
        return len(self._one_time)

    # -- persistence -----------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A msgpack-able snapshot (str keys, bytes, ints, lists). It holds the
        private keys: store it as carefully as the identity key."""
        return {
            "v": _FORMAT,
            "last_spk_id": self._last_spk_id,
            "last_opk_id": self._last_opk_id,
            "current_spk": self._current_spk,
            "signed": [
                [spk.id, spk.key_pair.private, spk.signature, spk.created_ms]
                for spk in self._signed.values()
            ],
            "one_time": [[opk.id, opk.key_pair.private] for opk in self._one_time.values()],
        }

    @classmethod
    def from_dict(cls, data: Any) -> PrekeyStore:
        """Inverse of :meth:`to_dict`; :class:`DecodeError` for anything else."""
        if not isinstance(data, dict) or data.get("v") != _FORMAT:
            raise DecodeError("not a prekey store (or an unknown format version)")
        store = cls()
        store._last_spk_id = expect_u32(data.get("last_spk_id"), "last_spk_id")
        store._last_opk_id = expect_u32(data.get("last_opk_id"), "last_opk_id")
        signed = data.get("signed")
        one_time = data.get("one_time")
        if not isinstance(signed, list) or not isinstance(one_time, list):
            raise DecodeError("prekey store lists missing")
        for item in signed:
            if not isinstance(item, list) or len(item) != 4:
                raise DecodeError("a signed prekey entry is [id, private, sig, created_ms]")
            spk_id = expect_u32(item[0], "signed prekey id")
            private = expect_bin(item[1], KEY_BYTES, "signed prekey private key")
            signature = expect_bin(item[2], SIG_BYTES, "signed prekey signature")
            created = item[3]
            if type(created) is not int:
                raise DecodeError("signed prekey created_ms is not an int")
            if spk_id > store._last_spk_id or spk_id in store._signed:
                raise DecodeError("signed prekey id above last issued, or repeated")
            store._signed[spk_id] = SignedPrekey(spk_id, X25519KeyPair(private), signature, created)
        for item in one_time:
            if not isinstance(item, list) or len(item) != 2:
                raise DecodeError("a one-time prekey entry is [id, private]")
            opk_id = expect_u32(item[0], "one-time prekey id")
            private = expect_bin(item[1], KEY_BYTES, "one-time prekey private key")
            if opk_id > store._last_opk_id or opk_id in store._one_time:
                raise DecodeError("one-time prekey id above last issued, or repeated")
            store._one_time[opk_id] = OneTimePrekey(opk_id, X25519KeyPair(private))
        current = data.get("current_spk")
        if current is not None and (type(current) is not int or current not in store._signed):
            raise DecodeError("current signed prekey is not in the store")
        store._current_spk = current
        return store


def _next_id(last: int) -> int:
    if last >= U32_MAX:
        raise OverflowError("prekey ids exhausted (u32)")
    return last + 1


def expect_u32(value: Any, what: str) -> int:
    """``value`` if it is an int in 0..2**32-1, else :class:`DecodeError`.
    Shared by the e2ee decoders (x3dh, ratchet, pairwise)."""
    # bool is an int subclass; a True where an id belongs is corruption, not 1.
    if type(value) is not int or not 0 <= value <= U32_MAX:
        raise DecodeError(f"{what} is not a u32")
    return value


def expect_bin(value: Any, length: int, what: str) -> bytes:
    """``value`` if it is bytes of exactly ``length``, else :class:`DecodeError`."""
    if not isinstance(value, bytes) or len(value) != length:
        raise DecodeError(f"{what} is not {length} bytes")
    return value
