"""In-process relay-v1 sessions for the bench: no relay, no ``keys.fetch``.

Both ``python -m bench e2ee`` (the micro-benchmark) and ``pairs --e2ee``
(the load generator) need established pairwise sessions between two
devices. A real client gets the responder's bundle from the relay
(``keys.fetch``); the bench builds it in the same process instead, from a
freshly generated signed prekey and one one-time prekey, and runs the
first exchange locally:

1. A: X3DH ``initiate`` against B's bundle, first ratchet key pair;
2. A encrypts a prekey message, B decrypts it (X3DH ``respond``, DH
   ratchet step) and forgets the one-time prekey it used;
3. B answers one message, A decrypts it: from then on A sends the normal
   form ``[1, header, ciphertext]``, as in any established conversation.

Everything goes through :mod:`relay.e2ee.pairwise`, the same calls a client
makes; only the transport of these two setup messages is skipped.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from nacl.signing import SigningKey

from relay.e2ee import pairwise
from relay.e2ee import plaintext as pt
from relay.e2ee.prekeys import PrekeyStore
from relay.e2ee.x3dh import Bundle

TEXT_PLAINTEXT_BYTES = 100  # the encoded size of the text plaintext the bench sends
_BASE = pt.encode(pt.text("", 1 << 40))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def text_body(target: int = TEXT_PLAINTEXT_BYTES, extra: int = 0) -> str:
    """A body that makes ``encode(text(body, ts))`` exactly ``target`` bytes
    (ts ≥ 2**32, as a real clock in ms is), ``extra`` bytes of other fields
    aside. Bodies of 32..255 chars use a 2-byte msgpack str header."""
    n = target - len(_BASE) - extra - 1  # str8 header: one byte more than fixstr's
    if not 32 <= n <= 255:
        raise ValueError(f"no body gives a {target}-byte plaintext")
    # Something message-like rather than one repeated byte.
    words = "the quick brown fox jumps over the lazy dog and keeps on running "
    return (words * (n // len(words) + 1))[:n]


def text_plaintext(ts_ms: int | None = None) -> bytes:
    """The ~100-byte text plaintext of the micro-benchmark."""
    data = pt.encode(pt.text(text_body(), now_ms() if ts_ms is None else ts_ms))
    assert len(data) == TEXT_PLAINTEXT_BYTES, len(data)
    return data


# The load generator's plaintext: a text map plus a "bench" field (the
# profile allows extra fields) carrying the send time, sender index and
# counter, so the receiver measures latency and checks order after decrypting.
STAMP = struct.Struct("<qIQ")
STAMP_FIELD = "bench"
_STAMP_EXTRA = len(pt.encode({"type": "text", "ts": 1 << 40, "body": "", STAMP_FIELD: bytes(STAMP.size)})) - len(_BASE)
STAMPED_BODY = text_body(extra=_STAMP_EXTRA)


def stamped_plaintext(t_ns: int, index: int, counter: int, ts_ms: int) -> bytes:
    """``{type: text, ts, body, bench: <send time, sender, counter>}``, 100 bytes."""
    return pt.encode({"type": "text", "ts": ts_ms, "body": STAMPED_BODY, STAMP_FIELD: STAMP.pack(t_ns, index, counter)})


@dataclass
class Device:
    """One device's long-term keys: its identity (the AUTH key) and prekeys."""

    identity: SigningKey
    prekeys: PrekeyStore

    @property
    def identity_key(self) -> bytes:
        return bytes(self.identity.verify_key)

    @classmethod
    def make(cls, identity: SigningKey | None = None, one_time: int = 1) -> Device:
        """Fresh prekeys (one SPK, ``one_time`` OPKs) for ``identity`` (fresh by default)."""
        identity = identity if identity is not None else SigningKey.generate()
        store = PrekeyStore()
        store.new_signed_prekey(identity, now_ms())
        store.new_one_time_prekeys(one_time)
        return cls(identity, store)

    def bundle(self) -> Bundle:
        """What ``keys.fetch`` would hand out for this device: the current SPK
        and the lowest unused OPK (None when all are used)."""
        spk = self.prekeys.current_signed_prekey
        assert spk is not None
        opks = self.prekeys.one_time_prekeys_after(0)
        opk = opks[0] if opks else None
        return Bundle(
            self.identity_key, spk.id, spk.key_pair.public, spk.signature,
            None if opk is None else opk.id, None if opk is None else opk.key_pair.public,
        )


def establish(a: Device, b: Device) -> tuple[pairwise.PeerSessions, pairwise.PeerSessions]:
    """A session A→B, confirmed by one message each way (see the module
    docstring). Returns (A's view of B, B's view of A); A's next message is
    in normal form."""
    now = now_ms()
    peer_a = pairwise.start_session(a.identity, b.bundle(), None)
    first = pairwise.encrypt(peer_a, pt.encode(pt.text("hello", now)))
    got = pairwise.decrypt(b.identity, None, first, a.identity_key, b.prekeys, now)
    peer_b = got.peer
    if got.used_one_time_prekey is not None:
        b.prekeys.remove_one_time_prekey(got.used_one_time_prekey)
    reply = pairwise.encrypt(peer_b, pt.encode(pt.text("hi", now)))
    back = pairwise.decrypt(a.identity, peer_a, reply, b.identity_key, a.prekeys, now)
    peer_a = back.peer
    assert peer_a.pending_prekey is None, "the initiator still sends prekey messages"
    return peer_a, peer_b
