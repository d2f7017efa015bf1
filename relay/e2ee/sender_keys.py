"""Sender Keys for groups (profile ``relay-v1``): one payload for every member.

Each member device has, per group, its own sending chain (:class:`OwnChain`):
a random u32 ``chain_id``, a 32-byte chain key CK, an iteration from 0 and an
Ed25519 signing key. For message ``i``::

    seed = HMAC-SHA-256(CK_i, 0x01)      CK_(i+1) = HMAC-SHA-256(CK_i, 0x02)
    k    = HKDF(empty salt, IKM = seed, info = "relay-v1 group", 32)
    AD   = group (24 ASCII bytes) || u32 chain_id || u32 i
    payload = u32 chain_id || u32 i || nonce (24) || ciphertext || tag (16)
              || Ed25519 signature (64) over every byte before it

The sender hands :meth:`OwnChain.distribution` (an ``skdm`` plaintext, see
:mod:`relay.e2ee.plaintext`) to every other member device over the pairwise
sessions, members added later included. A receiver keeps one
:class:`SenderChains` per (group, sender user, sender device), feeds it the
``skdm`` maps that arrived over the pairwise session *of that sender device*
(:meth:`SenderChains.add`), and routes SEND_GROUP payloads to it
(:func:`peek_chain_id` names the chain; :meth:`SenderChains.decrypt`).

Starting a new chain is the caller's job: after any member or device removal
every remaining member makes a new :class:`OwnChain` (new chain_id, chain key
and signing key) and distributes it to the remaining member devices only, so
a removed member, who holds only the old chains, gets ``NoSessionError``.

Bounds: a jump of more than 1000 iterations is refused; a :class:`SenderChains`
keeps at most 2000 skipped message keys across its chains (the oldest
skipped is evicted first) and the current chain plus the 5 before it (the
oldest added is evicted, with its skipped keys).

Raises (all :class:`~relay.e2ee.errors.E2EEError`, state unchanged on every
one): ``DecodeError`` (malformed payload, skdm or stored dict),
``NoSessionError`` (unknown chain_id), ``BadSignatureError`` (checked before
anything is decrypted), ``TooManySkippedError``, ``ReplayError`` (an
iteration already used, or a skipped key since evicted), ``BadMacError``,
``BadKeyError`` (a signing key libsodium refuses).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from nacl.signing import SigningKey

from relay.protocol.frames import is_group

from . import plaintext as _plaintext
from .errors import (
    BadKeyError,
    DecodeError,
    NoSessionError,
    ReplayError,
    TooManySkippedError,
)
from .primitives import (
    KEY_BYTES,
    NONCE_BYTES,
    SIG_BYTES,
    TAG_BYTES,
    Random,
    aead_decrypt,
    aead_encrypt,
    ed25519_pk_to_x25519,
    hkdf,
    hmac_sha256,
    sign,
    u32,
    verify,
)

__all__ = [
    "MAX_CHAINS",
    "MAX_JUMP",
    "MAX_SKIPPED",
    "MIN_PAYLOAD_BYTES",
    "OwnChain",
    "SenderChains",
    "peek_chain_id",
]

MAX_JUMP = 1000  # a message may skip at most this many iterations
MAX_SKIPPED = 2000  # skipped message keys kept per SenderChains
MAX_CHAINS = 6  # the current chain and the previous 5

_INFO = b"relay-v1 group"
_HEAD_BYTES = 8  # u32 chain_id || u32 iteration
MIN_PAYLOAD_BYTES = _HEAD_BYTES + NONCE_BYTES + TAG_BYTES + SIG_BYTES  # empty plaintext
_U32_MAX = 2**32 - 1
_FORMAT = 1  # version of to_dict()'s layout


def _step(chain_key: bytes) -> tuple[bytes, bytes]:
    """(message key, next chain key) for one iteration."""
    seed = hmac_sha256(chain_key, b"\x01")
    return hkdf(seed, _INFO, 32, salt=b""), hmac_sha256(chain_key, b"\x02")


def _group_ad(group: str) -> bytes:
    # is_group() guarantees 24 ASCII bytes.
    return group.encode("ascii")


def peek_chain_id(payload: bytes) -> int:
    """The chain_id a SEND_GROUP payload names (to find its sender's chain
    before decrypting). Raises ``DecodeError`` when the payload is shorter
    than the smallest valid one (:data:`MIN_PAYLOAD_BYTES`)."""
    if len(payload) < MIN_PAYLOAD_BYTES:
        raise DecodeError(f"a group payload is at least {MIN_PAYLOAD_BYTES} bytes")
    return int.from_bytes(payload[:4], "big")


def _check_signing_key(public: bytes) -> None:
    # The profile refuses every Ed25519 key libsodium's conversion refuses.
    ed25519_pk_to_x25519(public)


def _stored_int(d: dict[str, Any], name: str) -> int:
    # An iteration may be 2**32: the chain after its last message.
    value = d.get(name)
    if type(value) is not int or not 0 <= value <= _U32_MAX + 1:
        raise DecodeError(f"stored sender-key field {name!r} must be an int 0 .. 2**32")
    return value


def _stored_key(d: dict[str, Any], name: str) -> bytes:
    value = d.get(name)
    if type(value) is not bytes or len(value) != KEY_BYTES:
        raise DecodeError(f"stored sender-key field {name!r} must be 32 bytes")
    return value


class OwnChain:
    """This device's sending chain in one group.

    Make one with :meth:`generate` (at creation, and again after every
    membership removal), send :meth:`distribution` to the other member
    devices, then :meth:`encrypt` each group message. Persist with
    :meth:`to_dict` *after* each encrypt: reusing an iteration would reuse
    its message key.
    """

    __slots__ = ("_signing", "chain_id", "chain_key", "iteration")

    def __init__(
        self, chain_id: int, chain_key: bytes, signing_seed: bytes, iteration: int = 0
    ) -> None:
        """A chain from its parts (tests and :meth:`from_dict`); ``ValueError``
        for parts out of range."""
        if type(chain_id) is not int or not 0 <= chain_id <= _U32_MAX:
            raise ValueError("chain_id is a u32")
        if type(iteration) is not int or not 0 <= iteration <= _U32_MAX + 1:
            raise ValueError("iteration is a u32")
        if len(chain_key) != KEY_BYTES or len(signing_seed) != KEY_BYTES:
            raise ValueError("the chain key and the signing seed are 32 bytes")
        self.chain_id = chain_id
        self.chain_key = bytes(chain_key)
        self.iteration = iteration
        self._signing = SigningKey(bytes(signing_seed))

    @classmethod
    def generate(cls, random: Random = os.urandom, *, avoid: Collection[int] = ()) -> OwnChain:
        """A fresh chain: random chain_id, chain key and signing key, iteration 0.

        Pass the chain_ids of this device's previous chains in the group as
        ``avoid``: receivers ignore an skdm whose chain_id they already hold,
        so a (2**-32) collision would leave the new chain unreadable.
        """
        chain_id = int.from_bytes(random(4), "big")
        while chain_id in avoid:
            chain_id = int.from_bytes(random(4), "big")
        chain_key = random(KEY_BYTES)
        return cls(chain_id, chain_key, random(KEY_BYTES))

    @property
    def signing_key(self) -> bytes:
        """The public Ed25519 key (raw 32 bytes) receivers verify with."""
        return bytes(self._signing.verify_key)

    def encrypt(self, group: str, plaintext: bytes, random: Random = os.urandom) -> bytes:
        """The SEND_GROUP payload of ``plaintext`` (the bytes of
        :func:`relay.e2ee.plaintext.encode`); advances the chain.

        Raises ``ValueError`` for a malformed group id, or when the chain has
        used all 2**32 iterations (start a new chain); the chain is unchanged then.
        """
        if not is_group(group):
            raise ValueError(f"not a group id: {group!r}")
        if self.iteration > _U32_MAX:
            raise ValueError("this chain is exhausted: start a new one")
        head = u32(self.chain_id) + u32(self.iteration)
        message_key, next_key = _step(self.chain_key)
        body = head + aead_encrypt(message_key, plaintext, _group_ad(group) + head, random)
        payload = body + sign(self._signing, body)
        # Advance only once nothing can fail any more.
        self.chain_key = next_key
        self.iteration += 1
        return payload

    def distribution(self, group: str, ts: int) -> _plaintext.Plaintext:
        """The ``skdm`` plaintext map for the chain as it is now (current
        iteration and chain key): a receiver can decrypt every message from
        this iteration on. ``ValueError`` for a malformed group id."""
        if not is_group(group):
            raise ValueError(f"not a group id: {group!r}")
        return _plaintext.skdm(
            group, self.chain_id, self.iteration, self.chain_key, self.signing_key, ts
        )

    def to_dict(self) -> dict[str, Any]:
        """A msgpack-able dict holding the secrets; :meth:`from_dict` reverses it."""
        return {
            "v": _FORMAT,
            "chain_id": self.chain_id,
            "iteration": self.iteration,
            "chain_key": self.chain_key,
            "signing_seed": bytes(self._signing),
        }

    @classmethod
    def from_dict(cls, d: object) -> OwnChain:
        """Inverse of :meth:`to_dict`; ``DecodeError`` for anything else."""
        if not isinstance(d, dict) or d.get("v") != _FORMAT:
            raise DecodeError("not a stored own sender-key chain")
        chain_id = _stored_int(d, "chain_id")
        if chain_id > _U32_MAX:
            raise DecodeError("stored chain_id is out of range")
        return cls(
            chain_id,
            _stored_key(d, "chain_key"),
            _stored_key(d, "signing_seed"),
            _stored_int(d, "iteration"),
        )

    def __repr__(self) -> str:  # never print the chain key
        return f"OwnChain(chain_id={self.chain_id}, iteration={self.iteration})"


@dataclass(slots=True)
class _Chain:
    """A receiver's view of one chain: the key of the next expected iteration."""

    chain_id: int
    iteration: int  # the next iteration not yet decrypted
    chain_key: bytes  # CK at ``iteration``
    signing_key: bytes  # public


class SenderChains:
    """What a receiver keeps for ONE sender device in ONE group: that
    device's current chain and up to 5 previous ones, with skipped keys.

    Feed it the ``skdm`` maps from that device (:meth:`add`), then
    :meth:`decrypt` its SEND_GROUP payloads; persist with :meth:`to_dict`
    after each call that succeeded. Every refusal leaves it as it was.
    """

    __slots__ = ("_chains", "_skipped")

    def __init__(self) -> None:
        # chain_id -> chain, oldest added first; the last one is current.
        self._chains: OrderedDict[int, _Chain] = OrderedDict()
        # (chain_id, iteration) -> message key, oldest skipped first.
        self._skipped: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    @property
    def current_chain_id(self) -> int | None:
        """The chain_id added last, or None before any :meth:`add`."""
        return next(reversed(self._chains), None)

    @property
    def chain_ids(self) -> list[int]:
        """The chain_ids kept, oldest added first."""
        return list(self._chains)

    def add(self, skdm: dict[str, Any]) -> None:
        """Take a decoded ``skdm`` plaintext map from this sender device.

        A new chain_id becomes current; past 6 chains the oldest added is
        dropped with its skipped keys. A chain_id we already hold changes
        nothing, whatever its iteration: the keys we have are as good (a
        later iteration would only lose skipped messages; an earlier one
        would allow replays).

        Raises ``DecodeError`` for a map that is not a valid skdm, and
        ``BadKeyError`` for a signing key libsodium refuses.
        """
        problem = _plaintext.field_problem(skdm)
        if problem is None and skdm["type"] != "skdm":
            problem = f"expected an skdm plaintext, got {skdm['type']!r}"
        if problem is not None:
            raise DecodeError(problem)
        chain_id: int = skdm["chain_id"]
        if chain_id in self._chains:
            return
        _check_signing_key(skdm["signing_key"])
        self._chains[chain_id] = _Chain(
            chain_id, skdm["iteration"], skdm["chain_key"], skdm["signing_key"]
        )
        while len(self._chains) > MAX_CHAINS:
            old, _ = self._chains.popitem(last=False)
            for key in [k for k in self._skipped if k[0] == old]:
                del self._skipped[key]

    def decrypt(self, group: str, payload: bytes) -> bytes:
        """The plaintext bytes of a SEND_GROUP ``payload`` from this sender
        device in ``group`` (hand them to :func:`relay.e2ee.plaintext.decode`).

        Checks, in order: shape (``DecodeError``), chain known
        (``NoSessionError``), signature (``BadSignatureError``), iteration
        (``ReplayError``, ``TooManySkippedError``), then decrypts
        (``BadMacError``). State changes only when all of them pass.
        """
        if not is_group(group):
            raise DecodeError(f"not a group id: {group!r}")
        chain_id = peek_chain_id(payload)
        chain = self._chains.get(chain_id)
        if chain is None:
            raise NoSessionError(f"no sender-key chain {chain_id} for this sender")
        body, signature = payload[:-SIG_BYTES], payload[-SIG_BYTES:]
        verify(chain.signing_key, body, signature)
        head = body[:_HEAD_BYTES]
        iteration = int.from_bytes(head[4:], "big")
        ad = _group_ad(group) + head
        sealed = body[_HEAD_BYTES:]

        if iteration < chain.iteration:
            message_key = self._skipped.get((chain_id, iteration))
            if message_key is None:
                raise ReplayError(
                    f"group message {chain_id}/{iteration} was already decrypted (or is too old)"
                )
            plaintext = aead_decrypt(message_key, sealed, ad)
            del self._skipped[(chain_id, iteration)]
            return plaintext

        jump = iteration - chain.iteration
        if jump > MAX_JUMP:
            raise TooManySkippedError(f"group message skips {jump} iterations (at most {MAX_JUMP})")
        # Derive into locals; commit only after the message authenticates.
        chain_key = chain.chain_key
        skipped: list[tuple[tuple[int, int], bytes]] = []
        for skipped_iteration in range(chain.iteration, iteration):
            message_key, chain_key = _step(chain_key)
            skipped.append(((chain_id, skipped_iteration), message_key))
        message_key, chain_key = _step(chain_key)
        plaintext = aead_decrypt(message_key, sealed, ad)

        chain.chain_key = chain_key
        chain.iteration = iteration + 1
        self._skipped.update(skipped)
        while len(self._skipped) > MAX_SKIPPED:
            self._skipped.popitem(last=False)
        return plaintext

    def to_dict(self) -> dict[str, Any]:
        """A msgpack-able dict holding the keys; :meth:`from_dict` reverses it."""
        return {
            "v": _FORMAT,
            "chains": [
                {
                    "chain_id": c.chain_id,
                    "iteration": c.iteration,
                    "chain_key": c.chain_key,
                    "signing_key": c.signing_key,
                }
                for c in self._chains.values()
            ],
            "skipped": [[cid, it, key] for (cid, it), key in self._skipped.items()],
        }

    @classmethod
    def from_dict(cls, d: object) -> SenderChains:
        """Inverse of :meth:`to_dict`; ``DecodeError`` for anything else
        (msgpack may hand back tuples as lists: both are accepted)."""
        if not isinstance(d, dict) or d.get("v") != _FORMAT:
            raise DecodeError("not stored sender-key chains")
        chains, skipped = d.get("chains"), d.get("skipped")
        if not isinstance(chains, list | tuple) or not isinstance(skipped, list | tuple):
            raise DecodeError("stored sender-key chains need 'chains' and 'skipped' lists")
        if len(chains) > MAX_CHAINS or len(skipped) > MAX_SKIPPED:
            raise DecodeError("stored sender-key chains exceed their bounds")
        out = cls()
        for entry in chains:
            if not isinstance(entry, dict):
                raise DecodeError("a stored sender-key chain is a map")
            chain = _Chain(
                _stored_int(entry, "chain_id"),
                _stored_int(entry, "iteration"),
                _stored_key(entry, "chain_key"),
                _stored_key(entry, "signing_key"),
            )
            if chain.chain_id > _U32_MAX or chain.chain_id in out._chains:
                raise DecodeError("a stored chain_id is out of range or repeated")
            try:
                _check_signing_key(chain.signing_key)
            except BadKeyError as exc:
                raise DecodeError(f"a stored signing key is unusable: {exc}") from None
            out._chains[chain.chain_id] = chain
        for item in skipped:
            if (
                not isinstance(item, list | tuple)
                or len(item) != 3
                or type(item[0]) is not int
                or type(item[1]) is not int
                or type(item[2]) is not bytes
                or len(item[2]) != KEY_BYTES
            ):
                raise DecodeError("a stored skipped key is [chain_id, iteration, key: bin32]")
            cid, it, key = item
            owner = out._chains.get(cid)
            if owner is None or not 0 <= it < owner.iteration or (cid, it) in out._skipped:
                raise DecodeError("a stored skipped key does not belong to a stored chain")
            out._skipped[(cid, it)] = key
        return out

    def __repr__(self) -> str:  # never print keys
        return f"SenderChains(chains={self.chain_ids}, skipped={len(self._skipped)})"
