"""Pure-Python twin of :mod:`relay.store._inbox`: the readable reference.

Inbox appends and deletes inside one LMDB write transaction: the store's
hottest writes (every SEND, receipt and ACK goes through here). Both twins
have the same API and one test suite (``tests/test_inbox_writer.py``) runs
against both; keep them in step.

Layout (see :mod:`relay.store.lmdb_store`):

* inbox key: ``prefix + seq`` (8 bytes big-endian), where ``prefix`` is
  ``user NUL device``;
* inbox value: ``type (1) count (1) created (8, big-endian) + tail``;
* meta record under ``prefix``: ``next_seq (8) pending (8)``, big-endian.

A device's counters are read once per transaction, kept here while entries
are appended and deleted, and written back once by :meth:`InboxWriter.flush`.
"""

from __future__ import annotations

import struct
from typing import Any

IMPLEMENTATION = "pure"

_U64 = struct.Struct(">Q")
_META = struct.Struct(">QQ")
_ENTRY_HEAD = struct.Struct(">BBQ")
_MAX_U64 = (1 << 64) - 1


def _entry_head(type_: int, count: int, created: int) -> bytes:
    """The head of an entry value, its fields checked in the order the
    compiled twin converts them."""
    if not 0 <= created <= _MAX_U64:
        raise OverflowError("created must fit in 64 unsigned bits")
    if not 0 <= type_ <= 0xFF or not 0 <= count <= 0xFF:
        raise ValueError("type and count are single bytes")
    return _ENTRY_HEAD.pack(type_, count, created)


class InboxWriter:
    """Appends to and deletes from device inboxes in the write transaction ``txn``.

    ``txn`` is an ``lmdb.Transaction`` (write); ``inbox_db`` and ``meta_db``
    the handles of the inbox and meta databases. LMDB errors propagate (the
    caller aborts the transaction). Call :meth:`flush` before committing.
    """

    def __init__(self, txn: Any, inbox_db: Any, meta_db: Any) -> None:
        self._txn = txn
        self._inbox = inbox_db
        self._meta_db = meta_db
        # prefix -> [next_seq, pending], for the devices touched so far.
        self._counters: dict[bytes, list[int]] = {}

    def _get(self, prefix: bytes) -> list[int]:
        counters = self._counters.get(prefix)
        if counters is None:
            raw = self._txn.get(prefix, db=self._meta_db)
            counters = [1, 0] if raw is None else list(_META.unpack(raw))
            self._counters[prefix] = counters
        return counters

    def append(self, prefix: bytes, type_: int, count: int, created: int, tail: bytes) -> int:
        """Append one entry to the inbox ``prefix``; return its seq."""
        # Checked in the order the compiled twin converts its arguments.
        if type(prefix) is not bytes or type(tail) is not bytes:
            raise TypeError("prefix and tail must be bytes")
        value = _entry_head(type_, count, created) + tail
        counters = self._get(prefix)
        seq = counters[0]
        self._txn.put(prefix + _U64.pack(seq), value, db=self._inbox)
        counters[0] = seq + 1
        counters[1] += 1
        return seq

    def append_many(self, prefix: bytes, type_: int, count: int, created: int, tails: list[bytes]) -> int:
        """Append one entry per tail, in order, to the inbox ``prefix``; return
        the seq of the first (the others follow on). Nothing is appended when
        an argument is bad."""
        if type(prefix) is not bytes or type(tails) is not list:
            raise TypeError("prefix must be bytes, tails a list")
        head = _entry_head(type_, count, created)
        if any(type(tail) is not bytes for tail in tails):
            raise TypeError("prefix and tails must be bytes")
        values = [head + tail for tail in tails]
        counters = self._get(prefix)
        first = counters[0]
        put = self._txn.put
        for i, value in enumerate(values):
            put(prefix + _U64.pack(first + i), value, db=self._inbox)
        counters[0] = first + len(values)
        counters[1] += len(values)
        return first

    def delete_up_to(self, prefix: bytes, seq: int) -> int:
        """Delete every entry of the inbox ``prefix`` with a seq ``<= seq``;
        return how many there were."""
        if type(prefix) is not bytes:
            raise TypeError("prefix must be bytes")
        if not 0 <= seq <= _MAX_U64:
            raise OverflowError("seq must fit in 64 unsigned bits")
        plen = len(prefix)
        cursor = self._txn.cursor(db=self._inbox)
        deleted = 0
        if cursor.set_range(prefix):
            while True:
                key = cursor.key()
                if len(key) != plen + 8 or key[:plen] != prefix or _U64.unpack_from(key, plen)[0] > seq:
                    break
                deleted += 1
                # delete() moves to the next record; past the end the key is empty.
                if not cursor.delete():
                    break
        if deleted:
            self.forget(prefix, deleted)
        return deleted

    def forget(self, prefix: bytes, count: int) -> None:
        """``count`` entries of the inbox ``prefix`` were deleted by other means
        (expiry): lower its pending count, never below zero."""
        if type(prefix) is not bytes:
            raise TypeError("prefix must be bytes")
        if not 0 <= count <= _MAX_U64:
            raise OverflowError("count must fit in 64 unsigned bits")
        counters = self._get(prefix)
        counters[1] = max(0, counters[1] - count)

    def flush(self) -> None:
        """Write the touched counters back (once each)."""
        put = self._txn.put
        db = self._meta_db
        for prefix, (next_seq, pending) in self._counters.items():
            put(prefix, _META.pack(next_seq, pending), db=db)
        self._counters.clear()
