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
from typing import Protocol

# Entry types in an inbox are the frame type numbers of PROTOCOL.md.
ENTRY_MSG = 13
ENTRY_RECEIPT = 15
ENTRY_EVENT = 22


def shard_of(user: str, shards: int) -> int:
    """Stable across processes and restarts (unlike ``hash()``)."""
    return zlib.crc32(user.encode()) % shards


@dataclass(frozen=True, slots=True)
class InboxEntry:
    seq: int
    type: int
    count: int
    created: int
    tail: bytes


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


@dataclass(frozen=True, slots=True)
class Stored:
    ts: int
    duplicate: bool
    devices: tuple[int, ...]


@dataclass(slots=True)
class AppendEntries:
    """Receipts or events for the devices of one user. Result: list of seqs.

    ``devices`` None means every registered device of ``user`` except
    ``skip_device``; unknown users get nothing (result ``[]``).
    """

    user: str
    type: int
    count: int
    tail: bytes
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


WriteOp = RegisterUser | StoreMessage | AppendEntries | DeleteUpTo | ExpireEntries


class Store(Protocol):
    """The interface the server codes against (LMDB now, Redis Cluster later)."""

    shards: int

    def shard_of(self, user: str) -> int: ...

    def get_user(self, user: str) -> UserRecord | None: ...

    def read_inbox(self, user: str, device: int, after: int, limit: int) -> list[InboxEntry]: ...

    def pending(self, user: str, device: int) -> int: ...

    def apply_batch(self, shard: int, ops: list[WriteOp]) -> list[object]: ...

    def close(self) -> None: ...
