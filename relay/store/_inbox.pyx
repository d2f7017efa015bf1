# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""Compiled twin of :mod:`relay.store._inbox_py` (read that one for the semantics).

Same names, signatures and errors; ``tests/test_inbox_writer.py`` runs one
suite against both. The LMDB calls are the same py-lmdb calls as in the twin
(cached bound methods, positional arguments); what is compiled away is the
Python around them: key and value building (one allocation and a memcpy
each), the big-endian packing, and the per-device counters, which live in a
C struct per touched device instead of a list of Python ints.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint64_t
from libc.string cimport memcmp, memcpy

IMPLEMENTATION = "cython"


cdef inline void _put_u64(unsigned char* dst, uint64_t value) noexcept:
    cdef int i
    for i in range(7, -1, -1):
        dst[i] = <unsigned char>(value & 0xFF)
        value >>= 8


cdef inline uint64_t _get_u64(const unsigned char* src) noexcept:
    cdef uint64_t value = 0
    cdef int i
    for i in range(8):
        value = (value << 8) | src[i]
    return value


cdef class _Counters:
    cdef uint64_t next_seq
    cdef uint64_t pending


cdef class InboxWriter:
    """Appends to and deletes from device inboxes in the write transaction ``txn``."""

    cdef object _txn
    cdef object _put
    cdef object _get_raw
    cdef object _inbox
    cdef object _meta_db
    cdef dict _counters

    def __init__(self, txn, inbox_db, meta_db):
        self._txn = txn
        self._put = txn.put
        self._get_raw = txn.get
        self._inbox = inbox_db
        self._meta_db = meta_db
        self._counters = {}

    cdef _Counters _get(self, bytes prefix):
        cdef _Counters counters
        cdef const unsigned char* src
        found = self._counters.get(prefix)
        if found is not None:
            return <_Counters>found
        counters = _Counters.__new__(_Counters)
        raw = self._get_raw(prefix, None, self._meta_db)
        if raw is None:
            counters.next_seq = 1
            counters.pending = 0
        else:
            raw = bytes(raw)
            if PyBytes_GET_SIZE(raw) != 16:
                raise ValueError("unpack requires a buffer of 16 bytes")
            src = <const unsigned char*>PyBytes_AS_STRING(raw)
            counters.next_seq = _get_u64(src)
            counters.pending = _get_u64(src + 8)
        self._counters[prefix] = counters
        return counters

    def append(self, bytes prefix not None, int type_, int count, uint64_t created, bytes tail not None):
        """Append one entry to the inbox ``prefix``; return its seq."""
        if not 0 <= type_ <= 0xFF or not 0 <= count <= 0xFF:
            raise ValueError("type and count are single bytes")
        cdef _Counters counters = self._get(prefix)
        cdef uint64_t seq = counters.next_seq
        cdef Py_ssize_t plen = PyBytes_GET_SIZE(prefix)
        cdef Py_ssize_t tlen = PyBytes_GET_SIZE(tail)
        cdef bytes key = PyBytes_FromStringAndSize(NULL, plen + 8)
        cdef unsigned char* k = <unsigned char*>PyBytes_AS_STRING(key)
        memcpy(k, PyBytes_AS_STRING(prefix), plen)
        _put_u64(k + plen, seq)
        cdef bytes value = PyBytes_FromStringAndSize(NULL, 10 + tlen)
        cdef unsigned char* v = <unsigned char*>PyBytes_AS_STRING(value)
        v[0] = <unsigned char>type_
        v[1] = <unsigned char>count
        _put_u64(v + 2, created)
        memcpy(v + 10, PyBytes_AS_STRING(tail), tlen)
        self._put(key, value, True, True, False, self._inbox)
        counters.next_seq = seq + 1
        counters.pending += 1
        return seq

    def append_many(self, bytes prefix not None, int type_, int count, uint64_t created, list tails not None):
        """Append one entry per tail, in order, to the inbox ``prefix``; return
        the seq of the first (the others follow on). Nothing is appended when
        an argument is bad."""
        if not 0 <= type_ <= 0xFF or not 0 <= count <= 0xFF:
            raise ValueError("type and count are single bytes")
        cdef Py_ssize_t n = len(tails)
        cdef Py_ssize_t i
        for i in range(n):
            if type(tails[i]) is not bytes:
                raise TypeError("prefix and tails must be bytes")
        cdef _Counters counters = self._get(prefix)
        cdef uint64_t first = counters.next_seq
        cdef Py_ssize_t plen = PyBytes_GET_SIZE(prefix)
        cdef Py_ssize_t tlen
        cdef bytes key, value, tail
        cdef unsigned char* k
        cdef unsigned char* v
        put = self._put
        inbox = self._inbox
        for i in range(n):
            tail = <bytes>tails[i]
            tlen = PyBytes_GET_SIZE(tail)
            key = PyBytes_FromStringAndSize(NULL, plen + 8)
            k = <unsigned char*>PyBytes_AS_STRING(key)
            memcpy(k, PyBytes_AS_STRING(prefix), plen)
            _put_u64(k + plen, first + i)
            value = PyBytes_FromStringAndSize(NULL, 10 + tlen)
            v = <unsigned char*>PyBytes_AS_STRING(value)
            v[0] = <unsigned char>type_
            v[1] = <unsigned char>count
            _put_u64(v + 2, created)
            memcpy(v + 10, PyBytes_AS_STRING(tail), tlen)
            put(key, value, True, True, False, inbox)
            # Counted as they go: an LMDB error part-way aborts the
            # transaction, and the counters are never flushed then.
            counters.next_seq += 1
            counters.pending += 1
        return first

    def delete_up_to(self, bytes prefix not None, uint64_t seq):
        """Delete every entry of the inbox ``prefix`` with a seq ``<= seq``;
        return how many there were."""
        cdef Py_ssize_t plen = PyBytes_GET_SIZE(prefix)
        cdef const char* p = PyBytes_AS_STRING(prefix)
        cdef const unsigned char* k
        cdef Py_ssize_t deleted = 0
        cdef bytes key
        cursor = self._txn.cursor(self._inbox)
        if cursor.set_range(prefix):
            key_of = cursor.key
            delete = cursor.delete
            while True:
                key = bytes(key_of())
                if PyBytes_GET_SIZE(key) != plen + 8:
                    break
                k = <const unsigned char*>PyBytes_AS_STRING(key)
                if memcmp(k, p, plen) != 0 or _get_u64(k + plen) > seq:
                    break
                deleted += 1
                # delete() moves to the next record; past the end the key is empty.
                if not delete():
                    break
        if deleted:
            self.forget(prefix, deleted)
        return deleted

    def forget(self, bytes prefix not None, uint64_t count):
        """``count`` entries of the inbox ``prefix`` were deleted by other means
        (expiry): lower its pending count, never below zero."""
        cdef _Counters counters = self._get(prefix)
        counters.pending = counters.pending - count if counters.pending > count else 0

    def flush(self):
        """Write the touched counters back (once each)."""
        cdef bytes value
        cdef unsigned char* v
        cdef _Counters counters
        put = self._put
        db = self._meta_db
        for prefix, found in self._counters.items():
            counters = <_Counters>found
            value = PyBytes_FromStringAndSize(NULL, 16)
            v = <unsigned char*>PyBytes_AS_STRING(value)
            _put_u64(v, counters.next_seq)
            _put_u64(v + 8, counters.pending)
            put(prefix, value, True, True, False, db)
        self._counters.clear()
