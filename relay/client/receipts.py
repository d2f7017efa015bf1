"""Counting receipts per message: "delivered to 12 of 15, read by 3".

The relay sends the sender one RECEIPT per recipient *device*: status 1
(delivered) when that device acked the message, status 2 (read) when its
user sent READ. For a group message that is one receipt per member device, so
a count is the number of distinct ``(by_user, by_device)`` with status >= 1
(delivered) or >= 2 (read) — never the number of receipts, because the relay
may repeat one (a READ written again after a reconnect repeats its receipts)
and a read receipt may arrive without a delivered one before it.

:class:`ReceiptTally` is pure (no I/O, no clock); feed it the
:class:`~relay.client.types.Receipt` entries taken from
:meth:`RelayClient.entries`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .types import Receipt

__all__ = ["ReceiptCounts", "ReceiptTally"]


@dataclass(frozen=True, slots=True)
class ReceiptCounts:
    """Distinct recipient devices that got (``delivered``) or read (``read``)
    one message; ``expected`` is the number of devices it went to, if known.
    Every device that read it also counts as delivered."""

    delivered: int
    read: int
    expected: int | None

    def describe(self) -> str:
        """E.g. ``"delivered to 12 of 15, read by 3"`` (``"of N"`` only when
        ``expected`` is known, ``"read by"`` only when someone read it)."""
        of = f" of {self.expected}" if self.expected is not None else ""
        text = f"delivered to {self.delivered}{of}"
        if self.read:
            text += f", read by {self.read}"
        return text


class _Tracked:
    __slots__ = ("delivered", "devices", "expected", "read")

    def __init__(self, expected: int | None) -> None:
        self.expected = expected
        self.devices: dict[tuple[str, int], int] = {}  # (user, device) -> highest status
        self.delivered = 0
        self.read = 0


class ReceiptTally:
    """Per-message delivered/read counts over distinct recipient devices.

    ::

        tally = ReceiptTally()
        msg_id, ts = await client.send_group(group, "hi all")
        tally.track(msg_id, expected=15)      # devices it goes to, if you know
        ...
        if isinstance(entry, Receipt) and tally.add(entry):
            print(tally.counts(entry.msg_id).describe())   # delivered to 12 of 15

    Only messages passed to :meth:`track` are counted: receipts for other ids
    are ignored (a READ may name any ids, so a receipt can name a message this
    device never sent). Status codes above 2 count as read. At most
    ``max_messages`` messages are kept; tracking one more forgets the one
    tracked longest ago.

    ``expected`` for a group message is every device of every member at send
    time minus the sending device (the relay puts the message into all of them
    — including this user's other devices, whose acks come back as receipts
    too); for a direct message it is the recipient's device count.
    """

    def __init__(self, max_messages: int = 10_000) -> None:
        if max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        self._max = max_messages
        self._messages: OrderedDict[bytes, _Tracked] = OrderedDict()

    def __len__(self) -> int:
        return len(self._messages)

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._messages

    def track(self, msg_id: bytes, expected: int | None = None) -> None:
        """Count receipts for ``msg_id`` from now on. Tracking an id again
        only updates ``expected`` (``None`` keeps the old value); counts are
        kept."""
        if expected is not None and expected < 0:
            raise ValueError("expected must be >= 0")
        tracked = self._messages.get(msg_id)
        if tracked is not None:
            if expected is not None:
                tracked.expected = expected
            return
        self._messages[msg_id] = _Tracked(expected)
        while len(self._messages) > self._max:
            self._messages.popitem(last=False)

    def forget(self, msg_id: bytes) -> None:
        """Stop counting ``msg_id`` (nothing happens for an unknown id)."""
        self._messages.pop(msg_id, None)

    def add(self, receipt: Receipt) -> bool:
        """Count ``receipt``; True when a count of its message changed (False
        for an untracked id, a repeat, a status below 1, or a delivered after
        a read from the same device)."""
        tracked = self._messages.get(receipt.msg_id)
        if tracked is None or receipt.status < Receipt.DELIVERED:
            return False
        key = (receipt.by_user, receipt.by_device)
        before = tracked.devices.get(key, 0)
        status = receipt.status
        if status <= before:
            return False
        tracked.devices[key] = status
        if before < Receipt.DELIVERED:
            tracked.delivered += 1
        if before < Receipt.READ <= status:
            tracked.read += 1
        return True

    def counts(self, msg_id: bytes) -> ReceiptCounts:
        """The counts for a tracked ``msg_id`` (:class:`KeyError` otherwise)."""
        tracked = self._messages[msg_id]
        return ReceiptCounts(tracked.delivered, tracked.read, tracked.expected)

    def devices(self, msg_id: bytes, status: int = Receipt.DELIVERED) -> list[tuple[str, int]]:
        """The ``(user, device)`` pairs that reached ``status`` for a tracked
        ``msg_id`` (delivered by default, ``Receipt.READ`` for readers), in
        the order they first did."""
        return [key for key, got in self._messages[msg_id].devices.items() if got >= status]
