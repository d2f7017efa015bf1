"""Pairwise sessions with one remote device, and the payload bytes of SEND.

A payload is msgpack (bin for bytes), one of::

    [1, header, ciphertext]                                          normal
    [2, IK_A, EK_A, spk_id, opk_id or nil, header, ciphertext]       prekey

The initiator calls :func:`start_session` with the peer's bundle and then
:func:`encrypt`; it sends the prekey form until it has decrypted a message
from the responder in that session. The receiver calls :func:`decrypt`, which
changes nothing it is given: it returns the new :class:`PeerSessions` and the
one-time prekey it used, and the caller stores the former *before* it calls
``PrekeyStore.remove_one_time_prekey`` with the latter (a crash in between
then loses nothing, and redoing the removal is harmless).

A :class:`PeerSessions` keeps the current session and up to
``MAX_PREVIOUS_SESSIONS`` previous ones, so that when both sides start a
session at once each still reads what the other sends in its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import msgpack
from nacl.signing import SigningKey

from .errors import (
    BadMacError,
    DecodeError,
    E2EEError,
    IdentityMismatchError,
    NoSessionError,
)
from .prekeys import PrekeyStore, expect_bin, expect_u32
from .primitives import KEY_BYTES, NONCE_BYTES, TAG_BYTES, Random
from .ratchet import HEADER_BYTES, Session
from .x3dh import Bundle, initiate, respond

__all__ = [
    "MAX_PREVIOUS_SESSIONS",
    "Decrypted",
    "Payload",
    "PeerSessions",
    "PrekeyInfo",
    "SessionRecord",
    "decode_payload",
    "decrypt",
    "encode_payload",
    "encrypt",
    "start_session",
]

MAX_PREVIOUS_SESSIONS = 3
KIND_NORMAL = 1
KIND_PREKEY = 2
_FORMAT = 1


@dataclass(frozen=True)
class PrekeyInfo:
    """The X3DH a session came from, as a prekey message carries it."""

    identity_key: bytes  # IK_A, the initiator's Ed25519 key
    base_key: bytes  # EK_A, the initiator's ephemeral X25519 public key
    spk_id: int
    opk_id: int | None


@dataclass(frozen=True)
class Payload:
    """A decoded pairwise payload; ``prekey`` is None for the normal form."""

    header: bytes
    ciphertext: bytes
    prekey: PrekeyInfo | None = None


def encode_payload(payload: Payload) -> bytes:
    """The payload bytes for SEND's ``payloads[device]``."""
    if payload.prekey is None:
        obj: list[Any] = [KIND_NORMAL, payload.header, payload.ciphertext]
    else:
        p = payload.prekey
        obj = [KIND_PREKEY, p.identity_key, p.base_key, p.spk_id, p.opk_id,
               payload.header, payload.ciphertext]
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def decode_payload(data: bytes) -> Payload:
    """Strict inverse of :func:`encode_payload`: exactly one msgpack array of
    one of the two forms, bin where bytes belong, keys of 32 bytes, a header
    of 40, a ciphertext of at least nonce + tag, ids u32. Anything else is
    :class:`DecodeError`."""
    if not isinstance(data, bytes | bytearray):
        raise DecodeError("a payload is bytes")
    try:
        obj = msgpack.unpackb(bytes(data), raw=False, use_list=True, strict_map_key=True)
    except Exception:  # msgpack raises many types (ExtraData, FormatError, ...)
        raise DecodeError("payload is not one msgpack object") from None
    if not isinstance(obj, list) or not obj or type(obj[0]) is not int:
        raise DecodeError("payload is not [kind, ...]")
    if obj[0] == KIND_NORMAL and len(obj) == 3:
        return Payload(_header(obj[1]), _ciphertext(obj[2]))
    if obj[0] == KIND_PREKEY and len(obj) == 7:
        info = PrekeyInfo(
            expect_bin(obj[1], KEY_BYTES, "IK_A"),
            expect_bin(obj[2], KEY_BYTES, "EK_A"),
            expect_u32(obj[3], "spk_id"),
            None if obj[4] is None else expect_u32(obj[4], "opk_id"),
        )
        return Payload(_header(obj[5]), _ciphertext(obj[6]), info)
    raise DecodeError("payload is neither [1, header, ct] nor [2, IK_A, EK_A, spk, opk, header, ct]")


def _header(value: Any) -> bytes:
    return expect_bin(value, HEADER_BYTES, "header")


def _ciphertext(value: Any) -> bytes:
    if not isinstance(value, bytes) or len(value) < NONCE_BYTES + TAG_BYTES:
        raise DecodeError("ciphertext is not bin of at least nonce + tag")
    return value


@dataclass
class SessionRecord:
    """One session with the peer, the X3DH it came from, and whether we
    still send the prekey form in it (we initiated and have not yet read a
    message from the responder)."""

    session: Session
    origin: PrekeyInfo
    pending: bool

    def copy(self) -> SessionRecord:
        return SessionRecord(self.session.copy(), self.origin, self.pending)


@dataclass
class PeerSessions:
    """Everything about one remote device: its identity key, the current
    session and up to ``MAX_PREVIOUS_SESSIONS`` previous ones (newest first)."""

    their_identity_key: bytes
    current: SessionRecord
    previous: list[SessionRecord] = field(default_factory=list)

    @property
    def session(self) -> Session:
        return self.current.session

    @property
    def pending_prekey(self) -> PrekeyInfo | None:
        """What the next message carries in prekey form, or None for the normal form."""
        return self.current.origin if self.current.pending else None

    def records(self) -> list[SessionRecord]:
        """Current first, then previous ones, newest first."""
        return [self.current, *self.previous]

    def copy(self) -> PeerSessions:
        return PeerSessions(
            self.their_identity_key, self.current.copy(), [r.copy() for r in self.previous]
        )

    def to_dict(self) -> dict[str, Any]:
        """A msgpack-able snapshot (str keys, bytes, ints, bools, lists, nil)."""
        return {
            "v": _FORMAT,
            "their_identity_key": self.their_identity_key,
            "sessions": [
                {
                    "session": r.session.to_dict(),
                    "ik": r.origin.identity_key,
                    "ek": r.origin.base_key,
                    "spk_id": r.origin.spk_id,
                    "opk_id": r.origin.opk_id,
                    "pending": r.pending,
                }
                for r in self.records()
            ],
        }

    @classmethod
    def from_dict(cls, data: Any) -> PeerSessions:
        """Inverse of :meth:`to_dict`; :class:`DecodeError` for anything else."""
        if not isinstance(data, dict) or data.get("v") != _FORMAT:
            raise DecodeError("not a peer session set (or an unknown format version)")
        their = expect_bin(data.get("their_identity_key"), KEY_BYTES, "their_identity_key")
        items = data.get("sessions")
        if not isinstance(items, list) or not 1 <= len(items) <= 1 + MAX_PREVIOUS_SESSIONS:
            raise DecodeError("a peer has 1 to 4 sessions")
        records = []
        for item in items:
            if not isinstance(item, dict):
                raise DecodeError("a session record is a map")
            opk_id = item.get("opk_id")
            origin = PrekeyInfo(
                expect_bin(item.get("ik"), KEY_BYTES, "record IK_A"),
                expect_bin(item.get("ek"), KEY_BYTES, "record EK_A"),
                expect_u32(item.get("spk_id"), "record spk_id"),
                None if opk_id is None else expect_u32(opk_id, "record opk_id"),
            )
            pending = item.get("pending")
            if not isinstance(pending, bool):
                raise DecodeError("record pending is not a bool")
            records.append(SessionRecord(Session.from_dict(item.get("session")), origin, pending))
        return cls(their, records[0], records[1:])


@dataclass(frozen=True)
class Decrypted:
    """What :func:`decrypt` gives back: the peer state to store, the
    plaintext, and the OPK id to remove from the store once it is stored."""

    peer: PeerSessions
    plaintext: bytes
    used_one_time_prekey: int | None


def start_session(
    identity: SigningKey,
    bundle: Bundle,
    existing: PeerSessions | None,
    random: Random = os.urandom,
) -> PeerSessions:
    """A new initiator session with the device behind ``bundle``, made current.

    Draws EK_A (32 bytes) then the first ratchet key pair (32) from
    ``random``. The sessions of ``existing`` are kept as previous ones when
    its identity key is the bundle's; for another key they are dropped (they
    belong to a device identity that is gone). ``existing`` is not changed.
    Raises :class:`BadSignatureError` or :class:`BadKeyError` as
    :func:`~relay.e2ee.x3dh.initiate` does.
    """
    started = initiate(identity, bundle, random)
    session = Session.initiator(started.sk, started.ad, bundle.spk, random)
    origin = PrekeyInfo(
        bytes(identity.verify_key), started.ephemeral.public, started.spk_id, started.opk_id
    )
    record = SessionRecord(session, origin, pending=True)
    return PeerSessions(bundle.identity_key, record, _kept(existing, bundle.identity_key))


def encrypt(peer: PeerSessions, plaintext: bytes, random: Random = os.urandom) -> bytes:
    """The payload for ``plaintext`` in the current session (prekey form
    while pending). Advances ``peer``'s sending chain in place; draws from
    ``random`` as :meth:`Session.encrypt` does. :class:`NoSessionError` if
    the current session cannot send yet (cannot happen for sessions made by
    this module)."""
    header, ciphertext = peer.current.session.encrypt(plaintext, random)
    return encode_payload(Payload(header, ciphertext, peer.pending_prekey))


def decrypt(
    identity: SigningKey,
    peer: PeerSessions | None,
    payload: bytes,
    sender_identity_key: bytes,
    prekeys: PrekeyStore,
    now_ms: int,
) -> Decrypted:
    """Decrypt one payload from the device whose registered identity key is
    ``sender_identity_key``. Changes neither ``peer`` nor ``prekeys``.

    Raises :class:`DecodeError` (not a payload), :class:`IdentityMismatchError`
    (a prekey message whose IK_A is not ``sender_identity_key``, or a normal
    message while ``peer`` belongs to another identity key),
    :class:`UnknownPrekeyError` (SPK or OPK id unknown or used),
    :class:`NoSessionError` (a normal message and no session), and whatever
    :meth:`Session.decrypt` raises (ReplayError, TooManySkippedError,
    BadMacError, BadKeyError).
    """
    msg = decode_payload(payload)
    info = msg.prekey
    if info is None:
        if peer is None:
            raise NoSessionError("a normal message from a device we have no session with")
        if peer.their_identity_key != sender_identity_key:
            raise IdentityMismatchError("the sender's identity key is not the one of our sessions")
        return _decrypt_existing(peer, list(range(1 + len(peer.previous))), msg, now_ms)

    if info.identity_key != sender_identity_key:
        raise IdentityMismatchError("prekey message IK_A is not the sender's registered key")
    if peer is not None and peer.their_identity_key == sender_identity_key:
        for index, record in enumerate(peer.records()):
            if (record.origin.identity_key, record.origin.base_key) == (
                info.identity_key,
                info.base_key,
            ):
                # A later message of a session we already have (the sender
                # has not heard back yet): no prekey is used again.
                return _decrypt_existing(peer, [index], msg, now_ms)

    spk = prekeys.signed_prekey(info.spk_id)
    opk = None if info.opk_id is None else prekeys.one_time_prekey(info.opk_id)
    sk, ad = respond(
        identity, info.identity_key, info.base_key, spk.key_pair, None if opk is None else opk.key_pair
    )
    session = Session.responder(sk, ad, spk.key_pair)
    plaintext = session.decrypt(msg.header, msg.ciphertext, now_ms)
    record = SessionRecord(session, info, pending=False)
    return Decrypted(
        PeerSessions(sender_identity_key, record, _kept(peer, sender_identity_key)),
        plaintext,
        info.opk_id,
    )


def _kept(peer: PeerSessions | None, identity_key: bytes) -> list[SessionRecord]:
    """Copies of ``peer``'s sessions to keep as previous behind a new one."""
    if peer is None or peer.their_identity_key != identity_key:
        return []
    return [r.copy() for r in peer.records()[:MAX_PREVIOUS_SESSIONS]]


def _decrypt_existing(
    peer: PeerSessions, order: list[int], msg: Payload, now_ms: int
) -> Decrypted:
    """Try the sessions at ``order`` (indexes into ``peer.records()``); the
    first that decrypts becomes current in a new PeerSessions."""
    records = peer.records()
    errors: list[E2EEError] = []
    for index in order:
        try:
            session, plaintext = records[index].session.decrypted(msg.header, msg.ciphertext, now_ms)
        except E2EEError as exc:
            errors.append(exc)
            continue
        # Whatever decrypts in a session we initiated came from the
        # responder, so it has our prekey message: the normal form will do.
        chosen = SessionRecord(session, records[index].origin, pending=False)
        # The others are unchanged and only the current session is ever
        # changed in place (by encrypt), so the new PeerSessions shares them.
        others = [r for i, r in enumerate(records) if i != index]
        return Decrypted(PeerSessions(peer.their_identity_key, chosen, others), plaintext, None)
    # A message of one session looks like a bad MAC to every other one, so
    # any other refusal (replay, too many skipped) is the one that means something.
    raise next((e for e in errors if not isinstance(e, BadMacError)), errors[0])
