"""Rate limits a client is held to, sans I/O (the caller passes the time).

A :class:`TokenBucket` allows ``burst`` events at once and ``rate`` per
second on average; :meth:`TokenBucket.take` says whether one more event fits.
The server keeps one bucket per connection per limited frame kind (REQ,
SIGNAL) and answers 429 when it is empty.
"""

from __future__ import annotations


class TokenBucket:
    __slots__ = ("rate", "burst", "_tokens", "_stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one; False means rate limited."""
        tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if tokens < 1:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1
        return True
