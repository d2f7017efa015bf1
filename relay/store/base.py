"""What the server needs from a store, independent of the backend.

A store is split into shards by a hash of the user name; everything about a
user (its devices, its inboxes, the idempotency records of messages sent to
it) lives in that user's shard, so one SEND is one write in one shard. Reads
are synchronous and cheap (LMDB memory maps); writes are :class:`WriteOp`
objects that the server's group-commit writer hands to
:meth:`Store.apply_batch` in batches, one transaction and one sync per batch,
off the event loop. No trio here: the store is plain blocking code.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Protocol

from relay.protocol.groups import GroupInfo

# Entry types in an inbox are the frame type numbers of PROTOCOL.md.
ENTRY_MSG = 13
ENTRY_RECEIPT = 15
ENTRY_EVENT = 22
# A group message in a member's inbox: the tail is the key of the body,
# stored once in the group's shard. Readers get it resolved into an
# ENTRY_MSG with ``body_key`` set.
ENTRY_MSG_REF = 0x8D


def shard_of(user: str, shards: int) -> int:
    """Stable across processes and restarts (unlike ``hash()``)."""
    return zlib.crc32(user.encode()) % shards


@dataclass(slots=True)
class InboxEntry:
    seq: int
    type: int
    count: int
    created: int
    tail: bytes
    body_key: bytes | None = None


def body_key(group: str, sender: str, sender_device: int, msg_id: bytes) -> bytes:
    """Key of a group message body: unique per (group, sender device, msg_id)."""
    return group.encode() + b"\x00" + sender.encode() + b"\x00" + bytes((sender_device,)) + msg_id


def group_of_body(key: bytes) -> str:
    return key.split(b"\x00", 1)[0].decode()


@dataclass(slots=True)
class UserRecord:
    user: str
    devices: dict[int, bytes]
    created: int


# --- write operations -----------------------------------------------------
# Each op is applied inside the shard's write transaction; ``apply_batch``
# returns one result (or the exception the op raised) per op. An op checks
# everything before writing anything, so a failing op leaves no partial write.


@dataclass(slots=True)
class RegisterUser:
    user: str
    identity_key: bytes
    created: int


@dataclass(slots=True)
class StoreMessage:
    """A 1:1 message: one entry per recipient device plus the idempotency record.

    Result: :class:`Stored`. Raises ``FrameError(409)`` if ``payloads`` does
    not cover exactly the recipient's devices, ``FrameError(404)`` if the
    recipient does not exist.
    """

    sender: str
    sender_device: int
    msg_id: bytes
    to: str
    payloads: dict[int, bytes]
    ts: int


@dataclass(slots=True)
class Stored:
    ts: int
    duplicate: bool
    devices: tuple[int, ...]
    # The new inbox entries as (device, entry): the server hands them to an
    # online recipient's pump from memory instead of reading them back.
    entries: tuple[tuple[int, InboxEntry], ...] = ()


@dataclass(slots=True)
class Appended:
    """Result of AppendEntries: what was appended, (device, entry) in order."""

    entries: tuple[tuple[int, InboxEntry], ...]

    @property
    def devices(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(d for d, _ in self.entries))


@dataclass(slots=True)
class AppendEntries:
    """Receipts or events for the devices of one user: each of ``tails``, in
    order, into each device's inbox. Result: :class:`Appended`.

    ``devices`` None means every registered device of ``user`` except
    ``skip_device``; unknown users get nothing (no entries).
    """

    user: str
    type: int
    count: int
    tails: list[bytes]
    created: int
    devices: tuple[int, ...] | None = None
    skip_device: int | None = None


@dataclass(slots=True)
class DeleteUpTo:
    """Cumulative ACK: delete every entry of (user, device) with seq <= ``seq``.

    Result: the number of entries deleted.
    """

    user: str
    device: int
    seq: int


@dataclass(slots=True)
class ExpireEntries:
    """Delete entries and idempotency records created before ``cutoff``.

    Works through at most ``limit`` keys from ``resume`` on; result is the
    key to resume from next time (None when the pass is complete) and the
    number of entries deleted.
    """

    cutoff: int
    limit: int
    resume: bytes | None = None
    deleted: list[tuple[str, int]] = field(default_factory=list)


@dataclass(slots=True)
class CreateGroup:
    """Result: the GroupInfo. FrameError(409) if the id exists (retry with another)."""

    info: GroupInfo
    created: int


@dataclass(slots=True)
class ChangeGroup:
    """A ``group.*`` op by ``actor``; result ``(GroupInfo, users to notify)``."""

    group: str
    actor: str
    op: str
    args: dict[Any, Any]
    max_members: int


@dataclass(slots=True)
class PrepareGroupMessage:
    """Step 1 of SEND_GROUP, in the group's shard: check membership, store the
    body once (refs 0, incomplete). Result :class:`GroupPrepared`."""

    group: str
    sender: str
    sender_device: int
    msg_id: bytes
    payload: bytes
    ts: int


@dataclass(frozen=True, slots=True)
class GroupPrepared:
    body_key: bytes
    ts: int
    complete: bool
    members: tuple[str, ...]
    # The stored body (a MSG tail) while the fan-out is still to do: step 2
    # hands it to online members from memory instead of each reading it back.
    tail: bytes = b""


@dataclass(slots=True)
class FanOut:
    """Step 2, in one member shard: a reference in every device inbox of ``users``
    (not the sender's own device). Idempotent per (shard, body) through a
    marker, so a retried SEND_GROUP adds nothing twice. Result
    :class:`FannedOut`."""

    body_key: bytes
    sender: str
    sender_device: int
    users: list[str]
    created: int
    body_tail: bytes = b""


@dataclass(frozen=True, slots=True)
class FannedOut:
    """``entries``: per user, (device, entry) for each reference made, the
    entry already resolved to its MSG (``body_key`` set), for the router;
    empty for a user when the op carried no ``body_tail``."""

    refs: int
    entries: tuple[tuple[str, tuple[tuple[int, InboxEntry], ...]], ...]


@dataclass(slots=True)
class CompleteGroupMessage:
    """Step 3, in the group's shard: add the references made and mark the body
    complete (a retry is then answered SENT). Deletes the body if every
    reference was already acked."""

    body_key: bytes
    refs: int


@dataclass(slots=True)
class DropFanOutMarker:
    body_key: bytes


@dataclass(slots=True)
class ReleaseBodies:
    """References acked: ``counts`` body_key -> refs released; a complete body
    with no reference left is deleted. Result: bodies deleted."""

    counts: dict[bytes, int]


# --- the key directory (keys.publish / keys.fetch) ---------------------------
# Prekeys live in the owning user's shard. The server checks the shape of
# the request and the signed prekey's signature (it holds the verifier);
# the store checks everything that depends on what is stored.


@dataclass(frozen=True, slots=True)
class SignedPrekey:
    id: int
    key: bytes
    sig: bytes


@dataclass(slots=True)
class PublishKeys:
    """keys.publish by (user, device): store ``signed_prekey`` (replacing the
    stored one; None keeps it) and add the one-time ``prekeys`` (id, key).

    Result: the number of one-time prekeys stored for the device afterwards.
    A one-time prekey already stored with the same key is left as it is (a
    publish resent after a lost answer changes nothing). ``replace`` first
    drops every stored one-time prekey and the signed prekey: a device that
    lost its private keys starts over.

    Raises ``FrameError(409)`` when no signed prekey is stored and none is
    given, when the signed prekey's id is stored with another key, or when a
    one-time prekey id is repeated in ``prekeys`` or stored with another key;
    ``FrameError(413)`` when more than ``max_stored`` would be stored;
    ``FrameError(404)`` for an unknown device. Nothing is stored on error.
    """

    user: str
    device: int
    signed_prekey: SignedPrekey | None
    prekeys: list[tuple[int, bytes]]
    max_stored: int
    replace: bool = False


@dataclass(frozen=True, slots=True)
class Bundle:
    """One device's keys as keys.fetch hands them out: ``prekey`` is the
    one-time prekey (id, key) removed from the store for this answer, or None."""

    device: int
    identity_key: bytes
    signed_prekey: SignedPrekey
    prekey: tuple[int, bytes] | None


@dataclass(slots=True)
class FetchBundles:
    """keys.fetch of ``user`` by ``requester``: a :class:`Bundle` for each
    device of ``user`` that has a signed prekey (only those in ``devices``
    when given; never the requesting device itself), each taking the
    device's lowest one-time prekey out of the store.

    A device whose count drops from ``low_threshold`` or more to below it
    gets EVENT ``keys.low {count}`` in its inbox, in the same transaction.
    Result :class:`Bundles`. Raises ``FrameError(404)`` for an unknown user.
    """

    user: str
    requester: str
    requester_device: int
    devices: tuple[int, ...] | None
    low_threshold: int
    created: int


@dataclass(frozen=True, slots=True)
class Bundles:
    """``entries``: the keys.low events appended, (device, entry), for the router."""

    bundles: tuple[Bundle, ...]
    entries: tuple[tuple[int, InboxEntry], ...] = ()


WriteOp = (
    RegisterUser
    | StoreMessage
    | AppendEntries
    | DeleteUpTo
    | ExpireEntries
    | CreateGroup
    | ChangeGroup
    | PrepareGroupMessage
    | FanOut
    | CompleteGroupMessage
    | DropFanOutMarker
    | ReleaseBodies
    | PublishKeys
    | FetchBundles
)


class Store(Protocol):
    """The interface the server codes against (LMDB now, Redis Cluster later)."""

    shards: int

    def shard_of(self, user: str) -> int: ...

    def get_user(self, user: str) -> UserRecord | None: ...

    def read_inbox(self, user: str, device: int, after: int, limit: int) -> list[InboxEntry]: ...

    def pending(self, user: str, device: int) -> int: ...

    def get_group(self, group: str) -> GroupInfo | None: ...

    def prekey_count(self, user: str, device: int) -> int: ...

    def apply_batch(self, shard: int, ops: list[WriteOp]) -> list[object]: ...

    def close(self) -> None: ...
