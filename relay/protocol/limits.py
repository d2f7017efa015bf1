"""Rate limits a client is held to, sans I/O (the caller passes the time).

A :class:`TokenBucket` allows ``burst`` events at once and ``rate`` per
second on average; :meth:`TokenBucket.take` says whether one more event fits.
The server keeps one bucket per connection per limited frame kind (REQ,
SIGNAL) and answers 429 when it is empty. :class:`KeyedBuckets` keeps one
bucket per key (keys.fetch: per requester and target user) in a bounded
table.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


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

    def full(self, now: float) -> bool:
        """Whether the bucket has refilled to ``burst`` (then it is as good as a new one)."""
        return self._tokens + (now - self._stamp) * self.rate >= self.burst


class KeyedBuckets(Generic[K]):
    """A :class:`TokenBucket` per key, made full on first use, with at most
    ``max_keys`` kept: whoever picks the keys cannot grow the table.

    Buckets are kept in order of last use. Each :meth:`take` forgets the
    least recently used ones that have refilled (forgetting them changes
    nothing) and, past ``max_keys``, the least recently used at all (that
    one starts full again if its key returns: with a table much larger than
    the keys one client can cycle through in a refill period, this gives
    nothing away).
    """

    __slots__ = ("rate", "burst", "max_keys", "_buckets")

    def __init__(self, rate: float, burst: float, max_keys: int) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        TokenBucket(rate, burst, 0.0)  # the same checks
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[K, TokenBucket] = OrderedDict()

    def take(self, key: K, now: float) -> bool:
        """Spend one token of ``key``'s bucket; False means rate limited."""
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = TokenBucket(self.rate, self.burst, now)
        else:
            buckets.move_to_end(key)
        allowed = bucket.take(now)
        while buckets:
            oldest = next(iter(buckets.values()))
            if len(buckets) <= self.max_keys and (oldest is bucket or not oldest.full(now)):
                break
            buckets.popitem(last=False)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)
