"""The per-connection delivery window, sans I/O.

The relay keeps at most ``size`` inbox entries un-acked in flight on one
connection. :class:`DeliveryWindow` remembers which seqs were pushed and
which were acked; the delivery pump asks :meth:`capacity` before reading more
from the inbox and calls :meth:`pushed` for each entry it sends.
"""

from __future__ import annotations

from collections import deque


class DeliveryWindow:
    # One per live connection: slotted, it is half the size.
    __slots__ = ("size", "acked", "last_pushed", "_in_flight")

    def __init__(self, size: int, acked: int = 0) -> None:
        if size < 1:
            raise ValueError("window size must be at least 1")
        self.size = size
        self.acked = acked
        self.last_pushed = acked
        # Made by the first push: a deque is 0.7 KiB, and a connection that is
        # only connected (most are) never has an entry in flight.
        self._in_flight: deque[int] | None = None

    def start_at(self, acked: int) -> None:
        """Begin after ``acked`` (entries up to it are known handled); nothing in flight."""
        self.acked = self.last_pushed = acked
        self._in_flight = None

    def capacity(self) -> int:
        """How many more entries may be pushed before the client acks."""
        in_flight = self._in_flight
        return self.size if in_flight is None else self.size - len(in_flight)

    def in_flight(self) -> int:
        return 0 if self._in_flight is None else len(self._in_flight)

    def pushed(self, seq: int) -> None:
        if seq <= self.last_pushed:
            raise ValueError(f"seq {seq} pushed out of order (last {self.last_pushed})")
        if self._in_flight is None:
            self._in_flight = deque()
        self._in_flight.append(seq)
        self.last_pushed = seq

    def ack(self, seq: int) -> int | None:
        """Apply a cumulative ACK; return the new acked seq, or None if nothing moved.

        An ACK beyond what was pushed only covers what was pushed: the client
        cannot acknowledge an entry it has not been sent.
        """
        seq = min(seq, self.last_pushed)
        if seq <= self.acked:
            return None
        in_flight = self._in_flight
        while in_flight and in_flight[0] <= seq:
            in_flight.popleft()
        self.acked = seq
        return seq
