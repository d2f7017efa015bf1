"""The Double Ratchet (Signal spec section 3), profile ``relay-v1``.

::

    RK0       = SK (from X3DH)
    RK', CK   = HKDF(salt=RK, IKM=DH(ours, theirs), "relay-v1 root", 64)   split 32 | 32
    mk, CK'   = HMAC-SHA-256(CK, 0x01), HMAC-SHA-256(CK, 0x02)
    k         = HKDF(empty salt, IKM=mk, "relay-v1 msg", 32)
    header    = ratchet public (32) || PN (u32) || N (u32)             40 bytes
    ciphertext= nonce (24) || XChaCha20-Poly1305(k, plaintext, AD || header) || tag (16)

The initiator (:meth:`Session.initiator`) starts with a fresh ratchet key
pair against the responder's SPK and sends first; the responder
(:meth:`Session.responder`) starts with SPK_B as its ratchet key pair.

One local choice the wire cannot see: after a DH ratchet step on receipt,
the new sending key pair is generated at the next :meth:`Session.encrypt`,
not inside :meth:`Session.decrypt` (so decrypt takes no randomness). The
root-key sequence, and so every byte sent, is the same as the spec's for any
peer that follows it; the old private ratchet key is dropped at once.

Every method that raises leaves the session exactly as it was: each call
works on a copy of the state and swaps it in only on success.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from .errors import (
    BadMacError,
    DecodeError,
    NoSessionError,
    ReplayError,
    TooManySkippedError,
)
from .prekeys import expect_bin, expect_u32
from .primitives import (
    KEY_BYTES,
    Random,
    X25519KeyPair,
    aead_decrypt,
    aead_encrypt,
    dh,
    hkdf,
    hmac_sha256,
    u32,
)

__all__ = [
    "HEADER_BYTES",
    "MAX_SKIP",
    "MAX_SKIPPED_KEYS",
    "OLD_CHAINS_KEPT",
    "SKIPPED_KEY_TTL_MS",
    "Header",
    "Session",
]

MAX_SKIP = 1000
MAX_SKIPPED_KEYS = 2000
SKIPPED_KEY_TTL_MS = 30 * 24 * 60 * 60 * 1000
# Ratchet keys of finished receiving chains remembered so that a replayed
# message from one of them is reported as a replay rather than a bad MAC.
OLD_CHAINS_KEPT = 100

HEADER_BYTES = 40
ROOT_INFO = b"relay-v1 root"
MSG_INFO = b"relay-v1 msg"
_FORMAT = 1


@dataclass(frozen=True)
class Header:
    """The 40-byte message header: sender's ratchet public key, PN, N."""

    dh: bytes
    pn: int
    n: int

    def to_bytes(self) -> bytes:
        return self.dh + u32(self.pn) + u32(self.n)

    @classmethod
    def from_bytes(cls, data: bytes) -> Header:
        """:class:`DecodeError` unless ``data`` is exactly 40 bytes."""
        if not isinstance(data, bytes) or len(data) != HEADER_BYTES:
            raise DecodeError("a ratchet header is 40 bytes")
        return cls(data[:32], int.from_bytes(data[32:36], "big"), int.from_bytes(data[36:40], "big"))


def kdf_rk(rk: bytes, dh_out: bytes) -> tuple[bytes, bytes]:
    """The root KDF: (new root key, new chain key)."""
    out = hkdf(dh_out, ROOT_INFO, 64, salt=rk)
    return out[:32], out[32:]


def kdf_ck(ck: bytes) -> tuple[bytes, bytes]:
    """The chain KDF: (next chain key, message key k for this step)."""
    mk = hmac_sha256(ck, b"\x01")
    return hmac_sha256(ck, b"\x02"), hkdf(mk, MSG_INFO, 32, salt=b"")


@dataclass
class _State:
    ad: bytes
    rk: bytes
    # None between a DH ratchet step on receipt and the next encrypt, which
    # makes the new pair (see the module docstring).
    dhs: X25519KeyPair | None
    dhr: bytes | None
    cks: bytes | None
    ckr: bytes | None
    ns: int
    nr: int
    pn: int
    # (their ratchet key, N) -> (message key k, now_ms when stored); dict
    # order is insertion order, so the first entry is the one to evict.
    skipped: dict[tuple[bytes, int], tuple[bytes, int]]
    old_chains: list[bytes]
    # A lower bound of the skipped keys' stored_ms (None: none kept), so a
    # decrypt looks for expired keys only when one may be there.
    oldest_at: int | None = None

    def copy(self) -> _State:
        return replace(self, skipped=dict(self.skipped), old_chains=list(self.old_chains))


class Session:
    """One Double Ratchet session. Make one with :meth:`initiator` or
    :meth:`responder`; then :meth:`encrypt` / :meth:`decrypt`; persist with
    :meth:`to_dict` / :meth:`from_dict`."""

    __slots__ = ("_st",)

    def __init__(self, state: _State) -> None:
        self._st = state

    @classmethod
    def initiator(
        cls, sk: bytes, ad: bytes, their_ratchet_public: bytes, random: Random = os.urandom
    ) -> Session:
        """The X3DH initiator's session; ``their_ratchet_public`` is SPK_B.

        Draws the first ratchet key pair (32 bytes) from ``random``.
        :class:`BadKeyError` if the DH with SPK_B is all zeros.
        """
        dhs = X25519KeyPair.generate(random)
        rk, cks = kdf_rk(sk, dh(dhs.private, their_ratchet_public))
        return cls(_State(ad, rk, dhs, their_ratchet_public, cks, None, 0, 0, 0, {}, []))

    @classmethod
    def responder(cls, sk: bytes, ad: bytes, ratchet_pair: X25519KeyPair) -> Session:
        """The X3DH responder's session; ``ratchet_pair`` is SPK_B. It can
        encrypt only after it has decrypted a message."""
        return cls(_State(ad, sk, ratchet_pair, None, None, None, 0, 0, 0, {}, []))

    @property
    def ad(self) -> bytes:
        """The session AD (IK_A || IK_B) bound into every message."""
        return self._st.ad

    @property
    def skipped_count(self) -> int:
        """How many skipped message keys are kept (for tests and statistics)."""
        return len(self._st.skipped)

    def copy(self) -> Session:
        """An independent copy (the state is copied, nothing shared that mutates)."""
        return Session(self._st.copy())

    def encrypt(self, plaintext: bytes, random: Random = os.urandom) -> tuple[bytes, bytes]:
        """``(header, nonce || ciphertext || tag)`` for the next message.

        Draws 24 nonce bytes from ``random``, preceded by 32 bytes for a new
        ratchet key pair when this is the first message after a DH ratchet
        step. :class:`NoSessionError` for a responder session that has not
        decrypted anything yet (it has no sending chain).
        """
        # Encrypting never touches the skipped keys or old chains: share them.
        st = replace(self._st)
        if st.cks is None:
            if st.dhr is None:
                raise NoSessionError("a responder session cannot send before it has received")
            st.dhs = X25519KeyPair.generate(random)
            st.rk, st.cks = kdf_rk(st.rk, dh(st.dhs.private, st.dhr))
        assert st.dhs is not None  # a sending chain always comes with its key pair
        header = Header(st.dhs.public, st.pn, st.ns).to_bytes()
        st.cks, key = kdf_ck(st.cks)
        st.ns += 1
        ciphertext = aead_encrypt(key, plaintext, st.ad + header, random)
        self._st = st
        return header, ciphertext

    def decrypt(self, header: bytes, ciphertext: bytes, now_ms: int) -> bytes:
        """The plaintext of one message; the session moves on only on success.

        Raises :class:`DecodeError` (header not 40 bytes, ciphertext shorter
        than nonce + tag), :class:`ReplayError` (this message's key was used
        already, or it was dropped: evicted, or older than 30 days),
        :class:`TooManySkippedError` (more than ``MAX_SKIP`` keys to skip in
        one chain), :class:`BadKeyError` (a small-order ratchet key),
        :class:`BadMacError` (tampered, or not of this session).
        """
        self._st, plaintext = _decrypt(self._st, header, ciphertext, now_ms)
        return plaintext

    def decrypted(self, header: bytes, ciphertext: bytes, now_ms: int) -> tuple[Session, bytes]:
        """Like :meth:`decrypt`, but this session is left as it is and the
        one that moved on is returned with the plaintext."""
        st, plaintext = _decrypt(self._st, header, ciphertext, now_ms)
        return Session(st), plaintext

    # -- persistence -----------------------------------------------------

    # -- persistence -----------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A msgpack-able snapshot (str keys, bytes, ints, lists, nil)."""
        st = self._st
        return {
            "v": _FORMAT,
            "ad": st.ad,
            "rk": st.rk,
            "dhs": None if st.dhs is None else st.dhs.private,
            "dhr": st.dhr,
            "cks": st.cks,
            "ckr": st.ckr,
            "ns": st.ns,
            "nr": st.nr,
            "pn": st.pn,
            "skipped": [[dh_pub, n, key, at] for (dh_pub, n), (key, at) in st.skipped.items()],
            "old_chains": list(st.old_chains),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Session:
        """Inverse of :meth:`to_dict`; :class:`DecodeError` for anything else."""
        if not isinstance(data, dict) or data.get("v") != _FORMAT:
            raise DecodeError("not a ratchet session (or an unknown format version)")
        ad = data.get("ad")
        if not isinstance(ad, bytes):
            raise DecodeError("session ad is not bytes")
        dhs = _optional_key(data.get("dhs"), "dhs")
        st = _State(
            ad=ad,
            rk=expect_bin(data.get("rk"), KEY_BYTES, "root key"),
            dhs=None if dhs is None else X25519KeyPair(dhs),
            dhr=_optional_key(data.get("dhr"), "dhr"),
            cks=_optional_key(data.get("cks"), "cks"),
            ckr=_optional_key(data.get("ckr"), "ckr"),
            ns=expect_u32(data.get("ns"), "ns"),
            nr=expect_u32(data.get("nr"), "nr"),
            pn=expect_u32(data.get("pn"), "pn"),
            skipped={},
            old_chains=[],
        )
        # Without a sending pair the session must be between a ratchet step
        # and its next encrypt: a receiving chain, no sending chain.
        if st.dhs is None and (st.dhr is None or st.ckr is None or st.cks is not None):
            raise DecodeError("inconsistent ratchet state (no sending key pair)")
        skipped = data.get("skipped")
        old = data.get("old_chains")
        if not isinstance(skipped, list) or not isinstance(old, list):
            raise DecodeError("session lists missing")
        for item in skipped:
            if not isinstance(item, list) or len(item) != 4:
                raise DecodeError("a skipped key entry is [dh, n, key, stored_ms]")
            dh_pub = expect_bin(item[0], KEY_BYTES, "skipped key ratchet key")
            n = expect_u32(item[1], "skipped key N")
            key = expect_bin(item[2], KEY_BYTES, "skipped message key")
            if type(item[3]) is not int:
                raise DecodeError("skipped key stored_ms is not an int")
            st.skipped[(dh_pub, n)] = (key, item[3])
        st.old_chains = [expect_bin(k, KEY_BYTES, "old chain key") for k in old]
        st.oldest_at = min((at for _, at in st.skipped.values()), default=None)
        return cls(st)


def _decrypt(base: _State, header: bytes, ciphertext: bytes, now_ms: int) -> tuple[_State, bytes]:
    """The state after one message and its plaintext; ``base`` is never changed."""
    hdr = Header.from_bytes(header)
    in_order = hdr.dh == base.dhr and hdr.n == base.nr and base.ckr is not None
    expiring = base.oldest_at is not None and now_ms - base.oldest_at >= SKIPPED_KEY_TTL_MS
    # The usual message (next in the current chain, nothing to expire) leaves
    # the skipped keys and old chains alone: share them instead of copying.
    st = replace(base) if in_order and not expiring else base.copy()
    if expiring:
        _drop_expired(st, now_ms)
    ad = st.ad + header

    kept = st.skipped.pop((hdr.dh, hdr.n), None) if st.skipped else None
    if kept is not None:
        return st, aead_decrypt(kept[0], ciphertext, ad)

    if hdr.dh in st.old_chains:
        raise ReplayError("message from a finished chain whose key is used or dropped")
    if hdr.dh != st.dhr:
        _dh_ratchet(st, hdr, now_ms)
    elif st.ckr is None:
        # The initiator's dhr before any reply is SPK_B, which never sends.
        raise BadMacError("no receiving chain for this ratchet key")
    elif hdr.n < st.nr:
        raise ReplayError("message key already used (or dropped)")
    _skip(st, hdr.n, now_ms)
    assert st.ckr is not None
    st.ckr, key = kdf_ck(st.ckr)
    st.nr += 1
    return st, aead_decrypt(key, ciphertext, ad)


def _optional_key(value: Any, what: str) -> bytes | None:
    return None if value is None else expect_bin(value, KEY_BYTES, what)


def _drop_expired(st: _State, now_ms: int) -> None:
    # Scan them all: stored_ms need not be monotonic if the clock stepped back.
    stale = [k for k, (_, at) in st.skipped.items() if now_ms - at >= SKIPPED_KEY_TTL_MS]
    for k in stale:
        del st.skipped[k]
    st.oldest_at = min((at for _, at in st.skipped.values()), default=None)


def _skip(st: _State, until: int, now_ms: int) -> None:
    """Keep the keys of messages ``st.nr .. until-1`` of the receiving chain."""
    if until - st.nr > MAX_SKIP:
        raise TooManySkippedError(
            f"message would skip {until - st.nr} keys in one chain (at most {MAX_SKIP})"
        )
    if st.ckr is None:
        return
    assert st.dhr is not None
    while st.nr < until:
        st.ckr, key = kdf_ck(st.ckr)
        st.skipped[(st.dhr, st.nr)] = (key, now_ms)
        if st.oldest_at is None or now_ms < st.oldest_at:
            st.oldest_at = now_ms
        if len(st.skipped) > MAX_SKIPPED_KEYS:
            del st.skipped[next(iter(st.skipped))]
        st.nr += 1


def _dh_ratchet(st: _State, hdr: Header, now_ms: int) -> None:
    """A new ratchet key from the peer: close our receiving chain (keeping
    the keys of its messages still in flight, up to PN), derive the new one."""
    if st.dhs is None:
        # The peer turned its ratchet twice without a message from us in
        # between: impossible for a peer that follows the spec.
        raise BadMacError("unexpected new ratchet key before we have replied")
    if st.ckr is not None:
        _skip(st, hdr.pn, now_ms)
        assert st.dhr is not None
        st.old_chains.append(st.dhr)
        del st.old_chains[:-OLD_CHAINS_KEPT]
    st.pn, st.ns, st.nr = st.ns, 0, 0
    st.dhr = hdr.dh
    st.rk, st.ckr = kdf_rk(st.rk, dh(st.dhs.private, hdr.dh))
    # The sending pair has done its last job; the next encrypt makes a new one.
    st.dhs, st.cks = None, None
