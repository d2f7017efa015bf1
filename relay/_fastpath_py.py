"""Pure-Python twin of :mod:`relay._fastpath`: the readable reference.

Both modules expose exactly the same names, signatures and exceptions, and
one test suite (``tests/test_fastpath.py``) runs against both. Keep them in
step: a change here is a change in ``_fastpath.pyx`` too.

What lives here is the per-message hot path of the relay:

* :class:`FrameParser` -- RFC 6455 frame parsing, unmasking and message
  reassembly, fed raw bytes, returning complete messages and control frames.
* :func:`encode_frame` -- one unfragmented frame, masked or not.
* :func:`apply_mask` -- the XOR mask of RFC 6455 section 5.3.
* :func:`pack_entry` -- an inbox entry as a ready-to-send msgpack frame.
* :func:`msg_tail`, :func:`receipt_tail` -- the stored fields of a MSG and a
  RECEIPT (msgpack, back to back, without the array header);
  :func:`msg_sender` -- msg_id and from_user back out of a MSG tail.
* :func:`decode_sends_and_acks` -- the events of a message made only of valid
  SEND and ACK frames (most of what clients send), without the session's
  general path; ``None`` sends anything else there.

Raises :class:`WebSocketError` (with the close code to send) when the peer
breaks the protocol. Nothing here touches a socket or a clock.
"""

from __future__ import annotations

import msgpack

from relay.errors import FrameError
from relay.protocol import frames

IMPLEMENTATION = "pure"

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

CLOSE_PROTOCOL_ERROR = 1002
CLOSE_TOO_BIG = 1009

_DATA_OPCODES = (OP_TEXT, OP_BINARY)
_CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)


class WebSocketError(Exception):
    """The peer broke RFC 6455; ``close_code`` is the close code to answer with."""

    def __init__(self, close_code: int, reason: str) -> None:
        super().__init__(reason)
        self.close_code = close_code
        self.reason = reason


def apply_mask(data: bytes, mask: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` repeated (masking is its own inverse)."""
    if len(mask) != 4:
        raise ValueError("mask must be 4 bytes")
    n = len(data)
    if n == 0:
        return b""
    # One big-integer XOR instead of a Python loop per byte. ``bytes(mask)``
    # so that any bytes-like mask works (a memoryview cannot be repeated).
    key = (bytes(mask) * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def encode_frame(opcode: int, payload: bytes, mask: bytes | None = None, fin: bool = True) -> bytes:
    """One frame with ``payload``; ``mask`` (4 bytes) is for the client side only."""
    n = len(payload)
    first = (0x80 if fin else 0) | (opcode & 0x0F)
    mask_bit = 0x80 if mask is not None else 0
    if n < 126:
        header = bytes((first, mask_bit | n))
    elif n < 65536:
        header = bytes((first, mask_bit | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((first, mask_bit | 127)) + n.to_bytes(8, "big")
    if mask is None:
        return header + payload
    return header + mask + apply_mask(payload, mask)


def pack_entry(type_code: int, seq: int, count: int, tail: bytes) -> bytes:
    """The msgpack frame ``[type_code, seq, *rest]`` where ``tail`` is ``rest``
    already msgpack-encoded back to back and ``count`` is ``len(rest)``.

    Inbox entries are stored as their encoded tail so that delivering one
    costs a header and a seq, not a decode and re-encode of the payload.
    """
    n = count + 2
    # A negative count would write a fixarray shorter than the bytes that
    # follow it (count -1/-2) or an invalid first byte: reject it too.
    if not 2 <= n <= 15 or not 0 <= type_code <= 127:
        raise ValueError("entry frames are fixarrays with a positive fixint type")
    if seq < 0:
        raise ValueError("seq must be non-negative")
    if seq <= 0x7F:
        seq_bytes = bytes((seq,))
    elif seq <= 0xFF:
        seq_bytes = b"\xcc" + bytes((seq,))
    elif seq <= 0xFFFF:
        seq_bytes = b"\xcd" + seq.to_bytes(2, "big")
    elif seq <= 0xFFFFFFFF:
        seq_bytes = b"\xce" + seq.to_bytes(4, "big")
    else:
        seq_bytes = b"\xcf" + seq.to_bytes(8, "big")
    return bytes((0x90 | n, type_code)) + seq_bytes + tail


_packb = msgpack.Packer(use_bin_type=True).pack


def msg_tail(msg_id: bytes, from_user: str, from_device: int, group: str | None, ts: int, payload: bytes) -> bytes:
    """The fields of a MSG after its seq, as stored: ``msg_id, from_user,
    from_device, group, ts, payload`` in msgpack, without the array header."""
    return _packb([msg_id, from_user, from_device, group, ts, payload])[1:]


def receipt_tail(msg_id: bytes, by_user: str, by_device: int, status: int, ts: int) -> bytes:
    """The fields of a RECEIPT after its seq: ``msg_id, by_user, by_device,
    status, ts`` in msgpack, without the array header."""
    return _packb([msg_id, by_user, by_device, status, ts])[1:]


# Length bytes after a bin / str header (msgpack: 8, 16 and 32-bit lengths).
_BIN_LENGTH_BYTES = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_STR_LENGTH_BYTES = {0xD9: 1, 0xDA: 2, 0xDB: 4}


def msg_sender(tail: bytes) -> tuple[bytes, str]:
    """``(msg_id, from_user)``: the first two fields of a MSG tail, read
    without decoding the rest (the payload may be large).

    Raises ``ValueError`` when the tail does not start with a bin and a str.
    """
    n = len(tail)
    if n == 0 or tail[0] not in _BIN_LENGTH_BYTES:
        raise ValueError("a MSG tail starts with msg_id (bin)")
    k = _BIN_LENGTH_BYTES[tail[0]]
    start = 1 + k
    if n < start:
        raise ValueError("truncated MSG tail")
    pos = start + int.from_bytes(tail[1:start], "big")
    if pos >= n:
        raise ValueError("truncated MSG tail")
    msg_id = bytes(tail[start:pos])
    head = tail[pos]
    if 0xA0 <= head <= 0xBF:
        user_len = head & 0x1F
        pos += 1
    elif head in _STR_LENGTH_BYTES:
        k = _STR_LENGTH_BYTES[head]
        if n < pos + 1 + k:
            raise ValueError("truncated MSG tail")
        user_len = int.from_bytes(tail[pos + 1 : pos + 1 + k], "big")
        pos += 1 + k
    else:
        raise ValueError("a MSG tail has from_user (str) second")
    if n - pos < user_len:
        raise ValueError("truncated MSG tail")
    return msg_id, bytes(tail[pos : pos + user_len]).decode()


class FrameParser:
    """Incremental RFC 6455 parser for one direction of one connection.

    ``feed(data)`` returns a list of ``(opcode, payload)``: complete data
    messages (``OP_TEXT``/``OP_BINARY``, fragments joined and unmasked) and
    control frames (``OP_CLOSE``/``OP_PING``/``OP_PONG``) in arrival order.
    ``require_mask`` is True on the server side (clients must mask) and False
    on the client side (servers must not). A message longer than
    ``max_message_size`` raises ``WebSocketError(1009)`` as soon as its
    header says so, before its payload is buffered.
    """

    def __init__(self, max_message_size: int, require_mask: bool = True) -> None:
        self.max_message_size = max_message_size
        # bool(): the check below compares it with bool(masked), so a truthy
        # non-bool such as "yes" would otherwise reject every frame.
        self.require_mask = bool(require_mask)
        self._buffer = bytearray()
        self._fragments: list[bytes] = []
        self._fragment_opcode = 0
        self._fragment_size = 0
        self._closed = False

    def buffered(self) -> int:
        """Bytes held: an incomplete frame plus the fragments of an unfinished message."""
        return len(self._buffer) + self._fragment_size

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        if self._closed:
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "data after close frame")
        buf = self._buffer
        buf += data
        out: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            fin = b0 & 0x80
            if b0 & 0x70:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "reserved bits set")
            opcode = b0 & 0x0F
            masked = b1 & 0x80
            length = b1 & 0x7F
            header = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                header = 4
                if length < 126:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "non-minimal length")
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                header = 10
                if length >> 63:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "length has top bit set")
                if length < 65536:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "non-minimal length")
            if bool(masked) != self.require_mask:
                raise WebSocketError(
                    CLOSE_PROTOCOL_ERROR,
                    "client frames must be masked" if self.require_mask else "server frames must not be masked",
                )
            if opcode in _CONTROL_OPCODES:
                if not fin:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
                if length > 125:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "control frame too long")
            elif opcode in _DATA_OPCODES:
                if self._fragments or self._fragment_opcode:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
                if length > self.max_message_size:
                    raise WebSocketError(CLOSE_TOO_BIG, "message too big")
            elif opcode == OP_CONTINUATION:
                if not self._fragment_opcode:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "continuation without a message")
                if self._fragment_size + length > self.max_message_size:
                    raise WebSocketError(CLOSE_TOO_BIG, "message too big")
            else:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "reserved opcode")
            if masked:
                header += 4
            if end - pos < header + length:
                break
            start = pos + header
            payload = bytes(buf[start : start + length])
            if masked:
                payload = apply_mask(payload, bytes(buf[start - 4 : start]))
            pos = start + length
            if opcode in _CONTROL_OPCODES:
                out.append((opcode, payload))
                if opcode == OP_CLOSE:
                    self._closed = True
                    break
            elif opcode == OP_CONTINUATION:
                self._fragments.append(payload)
                self._fragment_size += length
                if fin:
                    out.append((self._fragment_opcode, b"".join(self._fragments)))
                    self._fragments = []
                    self._fragment_opcode = 0
                    self._fragment_size = 0
            elif fin:
                out.append((opcode, payload))
            else:
                self._fragment_opcode = opcode
                self._fragments = [payload]
                self._fragment_size = length
        del buf[:pos]
        return out


# How a SEND (fixarray of 4, type 10) and an ACK (fixarray of 2, type 14)
# start, the way every client encodes them.
_SEND_HEAD = bytes((0x94, frames.SEND))
_ACK_HEAD = bytes((0x92, frames.ACK))


def decode_sends_and_acks(payload: bytes, max_frames: int) -> list[frames.Send | frames.Ack] | None:
    """The events of a WebSocket message made only of valid SEND and ACK
    frames, at most ``max_frames`` of them, as
    :func:`relay.protocol.frames.parse_frame` would return them.

    ``None`` for anything else: another frame type anywhere in the message,
    too many frames, bad input. The session's general path then decodes the
    message and answers what is wrong with it, so ``None`` is always safe.
    Both twins decode every valid SEND and ACK as msgpack's packer writes
    them (smallest ints and headers); the compiled one leaves rarer encodings
    to the general path.
    """
    head = payload[:2]
    if head != _SEND_HEAD and head != _ACK_HEAD:
        return None
    objs, error = frames.unpack_frames(payload, max_frames)
    if error is not None:
        return None
    events: list[frames.Send | frames.Ack] = []
    for obj in objs:
        if type(obj) is not list or not obj or type(obj[0]) is not int or obj[0] not in (frames.SEND, frames.ACK):
            return None
        try:
            events.append(frames.parse_frame(obj))  # type: ignore[arg-type]
        except FrameError:
            return None
    return events
