# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, infer_types=True
"""Compiled twin of :mod:`relay._fastpath_py` (read that one for the semantics).

Same names, signatures, exceptions and error reasons; the exception class and
the constants are imported from the pure module so that both twins raise the
very same :class:`WebSocketError`. ``tests/test_fastpath.py`` runs one suite
against both and checks them against each other.

Where the time goes, and what is done about it:

* unmasking XORs 8 bytes at a time with the 4-byte key repeated in a
  ``uint64_t``, straight into the ``bytes`` object that is returned (created
  with ``PyBytes_FromStringAndSize(NULL, n)``): one copy per payload;
* :class:`FrameParser` parses straight out of the caller's buffer when it holds
  nothing from a previous feed, and keeps only an incomplete trailing frame in a
  C buffer; fragments of a fragmented message are unmasked into a second C
  buffer and turned into one ``bytes`` when the final fragment arrives;
* per frame, the only Python objects made are the payload and its
  ``(opcode, payload)`` tuple.

Input may be any C-contiguous bytes-like object (bytes fast-pathed).
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.unicode cimport PyUnicode_CheckExact, PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.limits cimport LLONG_MAX, LLONG_MIN
from libc.string cimport memcpy, memmove

import math

from relay._fastpath_py import (
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    WebSocketError,
)
from relay import _fastpath_py as _twin

IMPLEMENTATION = "cython"

# C copies of the opcodes and close codes (checked against the pure module's
# values at import time, below).
cdef enum:
    C_OP_CONTINUATION = 0x0
    C_OP_TEXT = 0x1
    C_OP_BINARY = 0x2
    C_OP_CLOSE = 0x8
    C_OP_PING = 0x9
    C_OP_PONG = 0xA
    C_CLOSE_PROTOCOL_ERROR = 1002
    C_CLOSE_TOO_BIG = 1009

if (
    OP_CONTINUATION != C_OP_CONTINUATION
    or OP_TEXT != C_OP_TEXT
    or OP_BINARY != C_OP_BINARY
    or OP_CLOSE != C_OP_CLOSE
    or OP_PING != C_OP_PING
    or OP_PONG != C_OP_PONG
    or CLOSE_PROTOCOL_ERROR != C_CLOSE_PROTOCOL_ERROR
    or CLOSE_TOO_BIG != C_CLOSE_TOO_BIG
):  # pragma: no cover - only if the twins drift apart
    raise ImportError("relay._fastpath is out of step with relay._fastpath_py")

# Buffers above this size are given back once they are empty again.
cdef Py_ssize_t _KEEP_CAPACITY = 256 * 1024


# ---------------------------------------------------------------- helpers


cdef inline void _xor_mask(
    unsigned char* dst, const unsigned char* src, Py_ssize_t n, const unsigned char* key
) noexcept nogil:
    """dst[i] = src[i] ^ key[i % 4] for i < n; dst may equal src.

    The key pattern repeats every 4 bytes, so a uint64 holding it twice lines
    up with every 8-byte step from offset 0 (in memory order, whatever the
    endianness). memcpy does the unaligned loads/stores; -O3 turns it into
    plain moves and usually vectorises the loop.
    """
    cdef uint32_t k32
    cdef uint64_t k64, w0, w1, w2, w3
    cdef Py_ssize_t i = 0
    memcpy(&k32, key, 4)
    k64 = (<uint64_t>k32) | ((<uint64_t>k32) << 32)
    while i + 32 <= n:
        memcpy(&w0, src + i, 8)
        memcpy(&w1, src + i + 8, 8)
        memcpy(&w2, src + i + 16, 8)
        memcpy(&w3, src + i + 24, 8)
        w0 ^= k64
        w1 ^= k64
        w2 ^= k64
        w3 ^= k64
        memcpy(dst + i, &w0, 8)
        memcpy(dst + i + 8, &w1, 8)
        memcpy(dst + i + 16, &w2, 8)
        memcpy(dst + i + 24, &w3, 8)
        i += 32
    while i + 8 <= n:
        memcpy(&w0, src + i, 8)
        w0 ^= k64
        memcpy(dst + i, &w0, 8)
        i += 8
    while i < n:
        dst[i] = src[i] ^ key[i & 3]
        i += 1


cdef inline bytes _payload(const unsigned char* src, Py_ssize_t n, bint masked, const unsigned char* key):
    """A new bytes of ``n`` bytes from ``src``, unmasked into place if ``masked``."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    cdef unsigned char* dst = <unsigned char*>PyBytes_AS_STRING(out)
    if n:
        if masked:
            _xor_mask(dst, src, n, key)
        else:
            memcpy(dst, src, n)
    return out


cdef inline uint64_t _be64(const unsigned char* p) noexcept nogil:
    return (
        (<uint64_t>p[0] << 56)
        | (<uint64_t>p[1] << 48)
        | (<uint64_t>p[2] << 40)
        | (<uint64_t>p[3] << 32)
        | (<uint64_t>p[4] << 24)
        | (<uint64_t>p[5] << 16)
        | (<uint64_t>p[6] << 8)
        | (<uint64_t>p[7])
    )


cdef inline void _put_be(unsigned char* p, uint64_t value, int nbytes) noexcept nogil:
    cdef int i
    for i in range(nbytes - 1, -1, -1):
        p[i] = <unsigned char>(value & 0xFF)
        value >>= 8


cdef long long _as_limit(object value) except? -1:
    """``max_message_size`` as a C limit giving the same verdicts as the twin's
    ``length > value`` for every frame length (0 <= length < 2**63): clamped to
    the int64 range, floats floored, NaN (never true in a comparison) unlimited.
    """
    if isinstance(value, int):
        pass
    elif value != value:
        return LLONG_MAX
    if value >= LLONG_MAX:
        return LLONG_MAX
    if value <= LLONG_MIN:
        return LLONG_MIN
    if not isinstance(value, int):
        value = math.floor(value)
    return value


cdef int _fail(int close_code, str reason) except -1:
    raise WebSocketError(close_code, reason)


cdef int _grow(unsigned char** buf, Py_ssize_t* cap, Py_ssize_t needed) except -1:
    """Make ``*buf`` hold at least ``needed`` bytes (geometric growth)."""
    cdef Py_ssize_t new_cap
    cdef unsigned char* new_buf
    if needed <= cap[0]:
        return 0
    new_cap = cap[0] * 2
    if new_cap < needed:
        new_cap = needed
    if new_cap < 256:
        new_cap = 256
    new_buf = <unsigned char*>PyMem_Realloc(buf[0], <size_t>new_cap)
    if new_buf == NULL:
        raise MemoryError()
    buf[0] = new_buf
    cap[0] = new_cap
    return 0


# ---------------------------------------------------------------- functions


def apply_mask(data, mask):
    """XOR ``data`` with the 4-byte ``mask`` repeated (masking is its own inverse)."""
    cdef Py_buffer mview
    cdef Py_buffer dview
    cdef bytes out
    PyObject_GetBuffer(mask, &mview, PyBUF_SIMPLE)
    try:
        if mview.len != 4:
            raise ValueError("mask must be 4 bytes")
        PyObject_GetBuffer(data, &dview, PyBUF_SIMPLE)
        try:
            if dview.len == 0:
                return b""
            out = PyBytes_FromStringAndSize(NULL, dview.len)
            _xor_mask(
                <unsigned char*>PyBytes_AS_STRING(out),
                <const unsigned char*>dview.buf,
                dview.len,
                <const unsigned char*>mview.buf,
            )
            return out
        finally:
            PyBuffer_Release(&dview)
    finally:
        PyBuffer_Release(&mview)


def encode_frame(opcode, payload, mask=None, fin=True):
    """One frame with ``payload``; ``mask`` (4 bytes) is for the client side only."""
    cdef Py_buffer pview
    cdef Py_buffer mview
    cdef bint have_mask = mask is not None
    cdef unsigned char first = (0x80 if fin else 0) | <unsigned char>(opcode & 0x0F)
    cdef unsigned char mask_bit = 0x80 if have_mask else 0
    cdef Py_ssize_t n, header
    cdef bytes out
    cdef unsigned char* dst
    PyObject_GetBuffer(payload, &pview, PyBUF_SIMPLE)
    try:
        n = pview.len
        if have_mask:
            PyObject_GetBuffer(mask, &mview, PyBUF_SIMPLE)
            if mview.len != 4:
                PyBuffer_Release(&mview)
                raise ValueError("mask must be 4 bytes")
        try:
            header = 2 if n < 126 else (4 if n < 65536 else 10)
            if have_mask:
                header += 4
            out = PyBytes_FromStringAndSize(NULL, header + n)
            dst = <unsigned char*>PyBytes_AS_STRING(out)
            dst[0] = first
            if n < 126:
                dst[1] = mask_bit | <unsigned char>n
            elif n < 65536:
                dst[1] = mask_bit | 126
                _put_be(dst + 2, <uint64_t>n, 2)
            else:
                dst[1] = mask_bit | 127
                _put_be(dst + 2, <uint64_t>n, 8)
            if have_mask:
                memcpy(dst + header - 4, mview.buf, 4)
                if n:
                    _xor_mask(dst + header, <const unsigned char*>pview.buf, n,
                              <const unsigned char*>mview.buf)
            elif n:
                memcpy(dst + header, pview.buf, n)
            return out
        finally:
            if have_mask:
                PyBuffer_Release(&mview)
    finally:
        PyBuffer_Release(&pview)


def pack_entry(type_code, seq, count, tail):
    """The msgpack frame ``[type_code, seq, *rest]`` where ``tail`` is ``rest``
    already msgpack-encoded back to back and ``count`` is ``len(rest)``."""
    cdef Py_buffer tview
    cdef unsigned long long s
    cdef unsigned char head
    cdef unsigned char code
    cdef int seq_len
    cdef bytes out
    cdef unsigned char* dst
    n = count + 2
    if not 2 <= n <= 15 or not 0 <= type_code <= 127:
        raise ValueError("entry frames are fixarrays with a positive fixint type")
    if seq < 0:
        raise ValueError("seq must be non-negative")
    s = seq  # OverflowError above 2**64 - 1, as int.to_bytes(8) in the twin
    head = 0x90 | <unsigned char>(<int>n)
    code = <unsigned char>(<int>type_code)
    if s <= 0x7F:
        seq_len = 1
    elif s <= 0xFF:
        seq_len = 2
    elif s <= 0xFFFF:
        seq_len = 3
    elif s <= 0xFFFFFFFF:
        seq_len = 5
    else:
        seq_len = 9
    PyObject_GetBuffer(tail, &tview, PyBUF_SIMPLE)
    try:
        out = PyBytes_FromStringAndSize(NULL, 2 + seq_len + tview.len)
        dst = <unsigned char*>PyBytes_AS_STRING(out)
        dst[0] = head
        dst[1] = code
        if seq_len == 1:
            dst[2] = <unsigned char>s
        else:
            if seq_len == 2:
                dst[2] = 0xcc
            elif seq_len == 3:
                dst[2] = 0xcd
            elif seq_len == 5:
                dst[2] = 0xce
            else:
                dst[2] = 0xcf
            _put_be(dst + 3, s, seq_len - 1)
        if tview.len:
            memcpy(dst + 2 + seq_len, tview.buf, tview.len)
        return out
    finally:
        PyBuffer_Release(&tview)


# ------------------------------------------------------------- entry tails
#
# msgpack by hand for the three or four field types of a tail, byte for byte
# what msgpack's Packer(use_bin_type=True) writes: the smallest int, str and
# bin headers. Anything else (a negative or huge int, a bool, a bytes
# subclass, text that is not valid UTF-8) goes to the pure twin, which then
# gives the same bytes or the same exception.

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object text, Py_ssize_t* size) except NULL


cdef inline int _uint_len(uint64_t v) noexcept nogil:
    if v < 0x80:
        return 1
    if v <= 0xFF:
        return 2
    if v <= 0xFFFF:
        return 3
    if v <= 0xFFFFFFFFULL:
        return 5
    return 9


cdef inline unsigned char* _put_uint(unsigned char* p, uint64_t v, int n) noexcept nogil:
    if n == 1:
        p[0] = <unsigned char>v
    else:
        p[0] = 0xcc if n == 2 else 0xcd if n == 3 else 0xce if n == 5 else 0xcf
        _put_be(p + 1, v, n - 1)
    return p + n


cdef inline int _str_head_len(Py_ssize_t n) noexcept nogil:
    return 1 if n < 32 else 2 if n <= 0xFF else 3 if n <= 0xFFFF else 5


cdef inline unsigned char* _put_sized(unsigned char* p, unsigned char code8, const char* data, Py_ssize_t n) noexcept nogil:
    # A str8/bin8 header ``code8`` and the 16 and 32-bit ones after it
    # (msgpack numbers them consecutively), then the bytes.
    if n <= 0xFF:
        p[0] = code8
        p[1] = <unsigned char>n
        p += 2
    elif n <= 0xFFFF:
        p[0] = code8 + 1
        _put_be(p + 1, <uint64_t>n, 2)
        p += 3
    else:
        p[0] = code8 + 2
        _put_be(p + 1, <uint64_t>n, 4)
        p += 5
    memcpy(p, data, n)
    return p + n


cdef inline unsigned char* _put_str(unsigned char* p, const char* data, Py_ssize_t n) noexcept nogil:
    if n < 32:
        p[0] = 0xa0 | <unsigned char>n
        memcpy(p + 1, data, n)
        return p + 1 + n
    return _put_sized(p, 0xd9, data, n)


cdef inline int _bin_head_len(Py_ssize_t n) noexcept nogil:
    return 2 if n <= 0xFF else 3 if n <= 0xFFFF else 5


cdef inline unsigned char* _put_bin(unsigned char* p, const char* data, Py_ssize_t n) noexcept nogil:
    return _put_sized(p, 0xc4, data, n)


cdef inline bint _small_uint(object value) noexcept:
    # A plain int in [0, 2**64): anything else takes the twin's path.
    return type(value) is int and value >= 0 and value <= 0xFFFFFFFFFFFFFFFF


def msg_tail(msg_id, from_user, from_device, group, ts, payload):
    """The fields of a MSG after its seq, as stored: ``msg_id, from_user,
    from_device, group, ts, payload`` in msgpack, without the array header."""
    cdef Py_ssize_t user_len, group_len = 0, id_len, payload_len
    cdef const char* user_p
    cdef const char* group_p = NULL
    if not (PyBytes_CheckExact(msg_id) and PyBytes_CheckExact(payload) and PyUnicode_CheckExact(from_user)
            and (group is None or PyUnicode_CheckExact(group)) and _small_uint(from_device) and _small_uint(ts)):
        return _twin.msg_tail(msg_id, from_user, from_device, group, ts, payload)
    try:
        user_p = PyUnicode_AsUTF8AndSize(from_user, &user_len)
        if group is not None:
            group_p = PyUnicode_AsUTF8AndSize(group, &group_len)
    except UnicodeError:
        return _twin.msg_tail(msg_id, from_user, from_device, group, ts, payload)
    cdef uint64_t dev = from_device
    cdef uint64_t t = ts
    cdef int dev_len = _uint_len(dev)
    cdef int ts_len = _uint_len(t)
    id_len = PyBytes_GET_SIZE(msg_id)
    payload_len = PyBytes_GET_SIZE(payload)
    if id_len > 0xFFFFFFFFLL or payload_len > 0xFFFFFFFFLL or user_len > 0xFFFFFFFFLL or group_len > 0xFFFFFFFFLL:
        return _twin.msg_tail(msg_id, from_user, from_device, group, ts, payload)
    cdef Py_ssize_t size = (_bin_head_len(id_len) + id_len + _str_head_len(user_len) + user_len + dev_len
                            + (1 if group is None else _str_head_len(group_len) + group_len)
                            + ts_len + _bin_head_len(payload_len) + payload_len)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    p = _put_bin(p, PyBytes_AS_STRING(msg_id), id_len)
    p = _put_str(p, user_p, user_len)
    p = _put_uint(p, dev, dev_len)
    if group is None:
        p[0] = 0xc0
        p += 1
    else:
        p = _put_str(p, group_p, group_len)
    p = _put_uint(p, t, ts_len)
    _put_bin(p, PyBytes_AS_STRING(payload), payload_len)
    return out


def receipt_tail(msg_id, by_user, by_device, status, ts):
    """The fields of a RECEIPT after its seq: ``msg_id, by_user, by_device,
    status, ts`` in msgpack, without the array header."""
    cdef Py_ssize_t user_len, id_len
    cdef const char* user_p
    if not (PyBytes_CheckExact(msg_id) and PyUnicode_CheckExact(by_user) and _small_uint(by_device)
            and _small_uint(status) and _small_uint(ts)):
        return _twin.receipt_tail(msg_id, by_user, by_device, status, ts)
    try:
        user_p = PyUnicode_AsUTF8AndSize(by_user, &user_len)
    except UnicodeError:
        return _twin.receipt_tail(msg_id, by_user, by_device, status, ts)
    id_len = PyBytes_GET_SIZE(msg_id)
    if id_len > 0xFFFFFFFFLL or user_len > 0xFFFFFFFFLL:
        return _twin.receipt_tail(msg_id, by_user, by_device, status, ts)
    cdef uint64_t dev = by_device
    cdef uint64_t st = status
    cdef uint64_t t = ts
    cdef int dev_len = _uint_len(dev)
    cdef int st_len = _uint_len(st)
    cdef int ts_len = _uint_len(t)
    cdef Py_ssize_t size = _bin_head_len(id_len) + id_len + _str_head_len(user_len) + user_len + dev_len + st_len + ts_len
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    p = _put_bin(p, PyBytes_AS_STRING(msg_id), id_len)
    p = _put_str(p, user_p, user_len)
    p = _put_uint(p, dev, dev_len)
    p = _put_uint(p, st, st_len)
    _put_uint(p, t, ts_len)
    return out


cdef inline Py_ssize_t _be_len(const unsigned char* p, int n) noexcept nogil:
    cdef Py_ssize_t v = 0
    cdef int i
    for i in range(n):
        v = (v << 8) | p[i]
    return v


def msg_sender(tail):
    """``(msg_id, from_user)``: the first two fields of a MSG tail.

    Raises ``ValueError`` when the tail does not start with a bin and a str.
    """
    if not PyBytes_CheckExact(tail):
        return _twin.msg_sender(tail)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(tail)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(tail)
    cdef Py_ssize_t id_start, id_len, user_start, user_len
    cdef int head
    if n < 1:
        return _twin.msg_sender(tail)
    head = 1 if p[0] == 0xc4 else 2 if p[0] == 0xc5 else 4 if p[0] == 0xc6 else 0
    if head == 0 or n < 1 + head:
        return _twin.msg_sender(tail)
    id_start = 1 + head
    id_len = _be_len(p + 1, head)
    user_start = id_start + id_len
    if user_start >= n:
        return _twin.msg_sender(tail)
    if 0xa0 <= p[user_start] <= 0xbf:
        user_len = p[user_start] & 0x1f
        user_start += 1
    else:
        head = 1 if p[user_start] == 0xd9 else 2 if p[user_start] == 0xda else 4 if p[user_start] == 0xdb else 0
        if head == 0 or n < user_start + 1 + head:
            return _twin.msg_sender(tail)
        user_len = _be_len(p + user_start + 1, head)
        user_start += 1 + head
    if n - user_start < user_len:
        return _twin.msg_sender(tail)
    try:
        from_user = PyUnicode_DecodeUTF8(<const char*>p + user_start, user_len, NULL)
    except UnicodeDecodeError:
        return _twin.msg_sender(tail)
    return PyBytes_FromStringAndSize(<const char*>p + id_start, id_len), from_user


# ---------------------------------------------------------- client frames

from relay.protocol.frames import Ack as _Ack, Send as _Send

cdef enum:
    C_SEND = 10
    C_ACK = 14

assert C_SEND == _twin.frames.SEND and C_ACK == _twin.frames.ACK


cdef inline bint _user_char(unsigned char c) noexcept nogil:
    # relay.protocol.frames.is_user: [a-z0-9._-]
    return (c >= 0x61 and c <= 0x7a) or (c >= 0x30 and c <= 0x39) or c == 0x2e or c == 0x5f or c == 0x2d


cdef object _decode_ack(const unsigned char* p, Py_ssize_t n, Py_ssize_t* at):
    # p[at[0]:] starts with 0x92 0x0e; on success at[0] moves past the frame.
    cdef Py_ssize_t pos = at[0] + 2
    cdef uint64_t seq
    if pos >= n:
        return None
    cdef unsigned char h = p[pos]
    if h < 0x80:
        seq = h
        pos += 1
    elif h == 0xcc and n - pos >= 2:
        seq = p[pos + 1]
        pos += 2
    elif h == 0xcd and n - pos >= 3:
        seq = _be_len(p + pos + 1, 2)
        pos += 3
    elif h == 0xce and n - pos >= 5:
        seq = <uint64_t>_be_len(p + pos + 1, 4)
        pos += 5
    elif h == 0xcf and n - pos >= 9:
        seq = _be64(p + pos + 1)
        if seq > <uint64_t>LLONG_MAX:  # frames.MAX_SEQ
            return None
        pos += 9
    else:
        return None
    at[0] = pos
    return _Ack(seq)


cdef object _decode_send(const unsigned char* p, Py_ssize_t n, Py_ssize_t* at):
    # p[at[0]:] starts with 0x94 0x0a; on success at[0] moves past the frame.
    cdef Py_ssize_t pos = at[0], to_len, count, i, length, k
    cdef unsigned char h
    cdef int key
    cdef dict payloads = {}
    # msg_id: bin8 of 16 bytes
    if n - pos < 21 or p[pos + 2] != 0xc4 or p[pos + 3] != 16:
        return None
    msg_id = PyBytes_FromStringAndSize(<const char*>p + pos + 4, 16)
    pos += 20
    # to: fixstr or str8, a user name
    h = p[pos]
    if h >= 0xa1 and h <= 0xbf:
        to_len = h & 0x1f
        pos += 1
    elif h == 0xd9 and pos + 1 < n and p[pos + 1] >= 32 and p[pos + 1] <= 64:
        to_len = p[pos + 1]
        pos += 2
    else:
        return None
    if n - pos < to_len:
        return None
    for i in range(to_len):
        if not _user_char(p[pos + i]):
            return None
    to = PyUnicode_DecodeUTF8(<const char*>p + pos, to_len, NULL)
    pos += to_len
    # payloads: fixmap or map16, device (1-255) -> bin
    if pos >= n:
        return None
    h = p[pos]
    if h >= 0x81 and h <= 0x8f:
        count = h & 0x0f
        pos += 1
    elif h == 0xde and n - pos >= 3:
        count = _be_len(p + pos + 1, 2)
        if count < 16:
            return None
        pos += 3
    else:
        return None
    for i in range(count):
        if pos >= n:
            return None
        h = p[pos]
        if h >= 1 and h < 0x80:
            key = h
            pos += 1
        elif h == 0xcc and pos + 1 < n and p[pos + 1] >= 0x80:
            key = p[pos + 1]
            pos += 2
        else:
            return None
        if pos >= n:
            return None
        h = p[pos]
        k = 1 if h == 0xc4 else 2 if h == 0xc5 else 4 if h == 0xc6 else 0
        if k == 0 or n - pos - 1 < k:
            return None
        length = _be_len(p + pos + 1, k)
        # the smallest header only, as msgpack's packer writes it
        if (k == 2 and length <= 0xff) or (k == 4 and length <= 0xffff):
            return None
        pos += 1 + k
        if n - pos < length:
            return None
        device = key
        if device in payloads:  # a duplicate key: the general path decides
            return None
        payloads[device] = PyBytes_FromStringAndSize(<const char*>p + pos, length)
        pos += length
    at[0] = pos
    return _Send(msg_id, to, payloads)


def decode_sends_and_acks(payload, max_frames):
    """The events of a WebSocket message made of valid SEND and ACK frames
    only, at most ``max_frames`` of them, or ``None`` (see the pure twin).
    Decodes msgpack's smallest encodings straight from the bytes; anything
    else returns ``None``."""
    if not PyBytes_CheckExact(payload):
        return None
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(payload)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t limit = max_frames
    cdef list events = []
    if n == 0:
        return None
    while pos < n:
        if n - pos < 3 or len(events) >= limit:
            return None
        if p[pos] == 0x92 and p[pos + 1] == C_ACK:
            event = _decode_ack(p, n, &pos)
        elif p[pos] == 0x94 and p[pos + 1] == C_SEND:
            event = _decode_send(p, n, &pos)
        else:
            return None
        if event is None:
            return None
        events.append(event)
    return events


# ---------------------------------------------------------------- parser


cdef class FrameParser:
    """Incremental RFC 6455 parser for one direction of one connection.

    ``feed(data)`` returns a list of ``(opcode, payload)``: complete data
    messages (``OP_TEXT``/``OP_BINARY``, fragments joined and unmasked) and
    control frames (``OP_CLOSE``/``OP_PING``/``OP_PONG``) in arrival order.
    ``require_mask`` is True on the server side (clients must mask) and False
    on the client side (servers must not). A message longer than
    ``max_message_size`` raises ``WebSocketError(1009)`` as soon as its
    header says so, before its payload is buffered.
    """

    cdef public bint require_mask
    cdef object _max_message_size  # as given (readable back unchanged)
    cdef long long _limit  # the same limit as a C integer, see _as_limit
    # Unparsed input: an incomplete frame (or bytes held after a close frame).
    cdef unsigned char* _buf
    cdef Py_ssize_t _buf_len
    cdef Py_ssize_t _buf_cap
    # Unmasked fragments of an unfinished fragmented message.
    cdef unsigned char* _frag
    cdef Py_ssize_t _frag_len
    cdef Py_ssize_t _frag_cap
    cdef int _frag_opcode  # 0: no fragmented message in progress
    cdef bint _closed

    def __cinit__(self, *args, **kwargs):
        self._buf = NULL
        self._buf_len = 0
        self._buf_cap = 0
        self._frag = NULL
        self._frag_len = 0
        self._frag_cap = 0
        self._frag_opcode = 0
        self._closed = False

    def __init__(self, max_message_size, require_mask=True):
        self.max_message_size = max_message_size
        self.require_mask = require_mask
        self._buf_len = 0
        self._frag_len = 0
        self._frag_opcode = 0
        self._closed = False

    def __dealloc__(self):
        PyMem_Free(self._buf)
        PyMem_Free(self._frag)

    @property
    def max_message_size(self):
        return self._max_message_size

    @max_message_size.setter
    def max_message_size(self, value):
        self._limit = _as_limit(value)
        self._max_message_size = value

    def buffered(self):
        """Bytes held: an incomplete frame plus the fragments of an unfinished message."""
        return self._buf_len + self._frag_len

    cdef int _hold(self, const unsigned char* p, Py_ssize_t n) except -1:
        """Append ``n`` bytes to the unparsed-input buffer."""
        if n <= 0:
            return 0
        _grow(&self._buf, &self._buf_cap, self._buf_len + n)
        memcpy(self._buf + self._buf_len, p, n)
        self._buf_len += n
        return 0

    cdef int _drop(self, Py_ssize_t used) except -1:
        """Forget the first ``used`` bytes of the unparsed-input buffer."""
        if used >= self._buf_len:
            self._buf_len = 0
        elif used > 0:
            memmove(self._buf, self._buf + used, self._buf_len - used)
            self._buf_len -= used
        if self._buf_len == 0 and self._buf_cap > _KEEP_CAPACITY:
            PyMem_Free(self._buf)
            self._buf = NULL
            self._buf_cap = 0
        return 0

    cdef Py_ssize_t _parse(self, const unsigned char* p, Py_ssize_t end, list out) except -1:
        """Parse complete frames from ``p[:end]`` into ``out``; return the bytes used.

        Raises before returning anything consumed, like the twin: on an error
        the caller keeps all of ``p`` as unparsed.
        """
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t header
        cdef Py_ssize_t start
        cdef const unsigned char* key
        cdef unsigned char b0, b1
        cdef int opcode
        cdef bint fin, masked
        cdef uint64_t raw
        cdef int64_t length
        cdef long long limit = self._limit
        cdef bytes payload
        while end - pos >= 2:
            b0 = p[pos]
            b1 = p[pos + 1]
            fin = (b0 & 0x80) != 0
            if b0 & 0x70:
                _fail(C_CLOSE_PROTOCOL_ERROR, "reserved bits set")
            opcode = b0 & 0x0F
            masked = (b1 & 0x80) != 0
            raw = b1 & 0x7F
            header = 2
            if raw == 126:
                if end - pos < 4:
                    break
                raw = (<uint64_t>p[pos + 2] << 8) | p[pos + 3]
                header = 4
                if raw < 126:
                    _fail(C_CLOSE_PROTOCOL_ERROR, "non-minimal length")
            elif raw == 127:
                if end - pos < 10:
                    break
                raw = _be64(p + pos + 2)
                header = 10
                if raw >> 63:
                    _fail(C_CLOSE_PROTOCOL_ERROR, "length has top bit set")
                if raw < 65536:
                    _fail(C_CLOSE_PROTOCOL_ERROR, "non-minimal length")
            length = <int64_t>raw
            if masked != self.require_mask:
                _fail(
                    C_CLOSE_PROTOCOL_ERROR,
                    "client frames must be masked" if self.require_mask
                    else "server frames must not be masked",
                )
            if opcode == C_OP_CLOSE or opcode == C_OP_PING or opcode == C_OP_PONG:
                if not fin:
                    _fail(C_CLOSE_PROTOCOL_ERROR, "fragmented control frame")
                if length > 125:
                    _fail(C_CLOSE_PROTOCOL_ERROR, "control frame too long")
            elif opcode == C_OP_TEXT or opcode == C_OP_BINARY:
                if self._frag_opcode:
                    _fail(C_CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
                if length > limit:
                    _fail(C_CLOSE_TOO_BIG, "message too big")
            elif opcode == C_OP_CONTINUATION:
                if not self._frag_opcode:
                    _fail(C_CLOSE_PROTOCOL_ERROR, "continuation without a message")
                # fragment size + length > limit, without signed overflow
                if length > limit or self._frag_len > limit - length:
                    _fail(C_CLOSE_TOO_BIG, "message too big")
            else:
                _fail(C_CLOSE_PROTOCOL_ERROR, "reserved opcode")
            if masked:
                header += 4
            if end - pos - header < length:
                break
            start = pos + header
            key = p + start - 4 if masked else p
            pos = start + <Py_ssize_t>length
            if opcode >= C_OP_CLOSE:  # a control frame (reserved ones raised above)
                out.append((opcode, _payload(p + start, length, masked, key)))
                if opcode == C_OP_CLOSE:
                    self._closed = True
                    break
            elif fin and opcode != C_OP_CONTINUATION:  # a whole message in one frame
                out.append((opcode, _payload(p + start, length, masked, key)))
            else:  # a fragment: unmask it onto the others
                if opcode != C_OP_CONTINUATION:
                    self._frag_opcode = opcode
                    self._frag_len = 0
                if length:
                    _grow(&self._frag, &self._frag_cap, self._frag_len + <Py_ssize_t>length)
                    if masked:
                        _xor_mask(self._frag + self._frag_len, p + start, length, key)
                    else:
                        memcpy(self._frag + self._frag_len, p + start, length)
                    self._frag_len += length
                if fin:
                    payload = PyBytes_FromStringAndSize(<char*>self._frag, self._frag_len)
                    out.append((self._frag_opcode, payload))
                    self._frag_opcode = 0
                    self._frag_len = 0
                    if self._frag_cap > _KEEP_CAPACITY:
                        PyMem_Free(self._frag)
                        self._frag = NULL
                        self._frag_cap = 0
        return pos

    def feed(self, data):
        """Parse ``data`` (appended to what is held); return complete messages
        and control frames as ``(opcode, payload)`` in arrival order."""
        cdef Py_buffer view
        cdef bint have_view = False
        cdef const unsigned char* p
        cdef Py_ssize_t n
        cdef Py_ssize_t used
        cdef list out = []
        if self._closed:
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "data after close frame")
        if PyBytes_CheckExact(data):
            p = <const unsigned char*>PyBytes_AS_STRING(data)
            n = PyBytes_GET_SIZE(data)
        else:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            have_view = True
            p = <const unsigned char*>view.buf
            n = view.len
        try:
            if self._buf_len == 0:
                # Nothing held: parse straight out of the caller's buffer and
                # keep only what is left (an incomplete frame, or whatever
                # followed a close frame).
                try:
                    used = self._parse(p, n, out)
                except BaseException:
                    self._hold(p, n)  # as the twin: an error consumes nothing
                    raise
                self._hold(p + used, n - used)
            else:
                self._hold(p, n)
                used = self._parse(self._buf, self._buf_len, out)
                self._drop(used)
        finally:
            if have_view:
                PyBuffer_Release(&view)
        return out
