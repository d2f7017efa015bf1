"""What :meth:`RelayClient.entries` yields: inbox entries and ephemeral signals.

All are frozen dataclasses. ``Message``, ``Receipt`` and ``Event`` are inbox
entries (they carry the inbox ``seq`` and are acked once taken); ``Signal`` is
an ephemeral SIGNALED frame (no seq, never acked, never stored by the relay).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, TypedDict

__all__ = ["Entry", "Event", "GroupInfo", "Message", "Receipt", "Signal"]


@dataclass(frozen=True, slots=True)
class Message:
    """MSG: a message for this device (``group`` is None for a direct one).

    ``payload`` is the bytes the relay carried (ciphertext). The end-to-end
    client (:func:`relay.client.open_client`) sets ``plaintext``, the
    decrypted map (``type``, ``ts`` and the type's fields), or ``error``, why
    it could not be decrypted; ``identity_changed`` flags a sender whose
    identity key changed since it was first seen."""

    seq: int
    msg_id: bytes
    from_user: str
    from_device: int
    group: str | None
    ts: int
    payload: bytes
    plaintext: dict[str, Any] | None = None
    error: str | None = None
    identity_changed: bool = False


@dataclass(frozen=True, slots=True)
class Receipt:
    """RECEIPT: ``by_user``/``by_device`` got (1) or read (2) message ``msg_id``."""

    DELIVERED: ClassVar[int] = 1
    READ: ClassVar[int] = 2

    seq: int
    msg_id: bytes
    by_user: str
    by_device: int
    status: int
    ts: int

    @property
    def status_name(self) -> str:
        """``"delivered"``, ``"read"``, or ``"status-N"`` for a code this client does not know."""
        if self.status == self.DELIVERED:
            return "delivered"
        if self.status == self.READ:
            return "read"
        return f"status-{self.status}"


@dataclass(frozen=True, slots=True)
class Event:
    """EVENT: a relay-made inbox entry, e.g. ``group.changed`` or ``keys.low``."""

    seq: int
    kind: str
    body: dict[str, Any]
    ts: int


@dataclass(frozen=True, slots=True)
class Signal:
    """SIGNALED: an ephemeral signal (typing, ...) from ``from_user`` to ``to``
    (this user, or a group)."""

    from_user: str
    to: str
    kind: str


Entry = Message | Receipt | Event | Signal


class GroupInfo(TypedDict):
    """A group as the relay answers every ``group.*`` request (and as the body
    of EVENT ``group.changed``, which adds ``actor``): ``members`` in join
    order, ``admins`` a subset of them, ``version`` 1 at creation and +1 per
    change."""

    group: str
    name: str
    version: int
    members: list[str]
    admins: list[str]
