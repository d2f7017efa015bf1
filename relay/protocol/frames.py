"""Frames of wire protocol v1: type numbers, validation of client frames into
typed events, and encoding of server frames.

Pure: imports only the stdlib and msgpack. :func:`parse_frame` turns one
decoded msgpack object into an event or raises :class:`FrameError` carrying
the ERROR to answer. The ``*_tail`` helpers encode an inbox entry without its
type and seq, the form the store keeps (see ``pack_entry`` in the fast path).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgpack

from relay.errors import BAD_REQUEST, CLOSE_POLICY, TOO_LARGE, FrameError

HELLO = 0
AUTH = 1
REGISTER = 2
READY = 3
ERROR = 4
SEND = 10
SEND_GROUP = 11
SENT = 12
MSG = 13
ACK = 14
RECEIPT = 15
READ = 16
REQ = 20
RES = 21
EVENT = 22
SIGNAL = 30
SIGNALED = 31

CLIENT_FRAME_TYPES = frozenset({AUTH, REGISTER, SEND, SEND_GROUP, ACK, READ, REQ, SIGNAL})

RECEIPT_DELIVERED = 1
RECEIPT_READ = 2

PROTOCOL_VERSION = 1
MAX_SEQ = 2**63 - 1
MAX_READ_IDS = 1024
MAX_KIND_LEN = 64

_USER_RE = re.compile(r"[a-z0-9._-]{1,64}")
_GROUP_RE = re.compile(r"g\.[A-Za-z0-9_-]{22}")


def is_user(value: object) -> bool:
    return type(value) is str and _USER_RE.fullmatch(value) is not None


def is_group(value: object) -> bool:
    return type(value) is str and _GROUP_RE.fullmatch(value) is not None


def is_device(value: object) -> bool:
    return type(value) is int and 1 <= value <= 255


@dataclass(frozen=True, slots=True)
class Auth:
    user: str
    device: int
    sig: bytes


@dataclass(frozen=True, slots=True)
class Register:
    user: str
    identity_key: bytes
    sig: bytes
    token: str | None


# Client events are created per frame: plain slotted dataclasses, since a
# frozen one costs four times as much to build. Treat them as immutable.
@dataclass(slots=True)
class Send:
    msg_id: bytes
    to: str
    payloads: dict[int, bytes]


@dataclass(slots=True)
class SendGroup:
    msg_id: bytes
    to: str
    payload: bytes


@dataclass(slots=True)
class Ack:
    seq: int


@dataclass(slots=True)
class Read:
    sender: str
    msg_ids: list[bytes]


@dataclass(slots=True)
class Request:
    req_id: int
    op: str
    args: dict[Any, Any]


@dataclass(slots=True)
class Signal:
    to: str
    kind: str


ClientEvent = Auth | Register | Send | SendGroup | Ack | Read | Request | Signal


def _bad(reason: str, ref: object, close: int | None = None) -> FrameError:
    return FrameError(BAD_REQUEST, reason, ref=ref, close=close, malformed=True)


def _bin(value: object, size: int) -> bool:
    return type(value) is bytes and len(value) == size


def parse_frame(obj: object) -> ClientEvent:
    """Validate one decoded client frame; raise FrameError(400) naming the field.

    Checks shape and field types only; whether the user exists, the device
    set matches or the caller may do it is the server's business.
    """
    if type(obj) is not list or not obj:
        raise _bad("a frame is a non-empty array", None)
    ftype = obj[0]
    if type(ftype) is not int:
        raise _bad("frame type must be an int", None)
    n = len(obj)
    if ftype == SEND:
        msg_id = obj[1] if n > 1 else None
        ref = msg_id if _bin(msg_id, 16) else SEND
        if n != 4:
            raise _bad("SEND is [10, msg_id, to, payloads]", ref)
        if not _bin(msg_id, 16):
            raise _bad("msg_id must be bin16", ref)
        to, payloads = obj[2], obj[3]
        if not is_user(to):
            raise _bad("to must be a user name", ref)
        if type(payloads) is not dict or not payloads:
            raise _bad("payloads must be a non-empty map device -> bin", ref)
        for device, payload in payloads.items():
            if not is_device(device) or type(payload) is not bytes:
                raise _bad("payloads must map device (1-255) -> bin", ref)
        return Send(obj[1], to, payloads)
    if ftype == ACK:
        if n != 2 or type(obj[1]) is not int or not 0 <= obj[1] <= MAX_SEQ:
            raise _bad("ACK is [14, seq]", ACK)
        return Ack(obj[1])
    if ftype == AUTH:
        if n != 4:
            raise _bad("AUTH is [1, user, device, sig]", AUTH, CLOSE_POLICY)
        if not is_user(obj[1]):
            raise _bad("invalid user name", AUTH, CLOSE_POLICY)
        if not is_device(obj[2]) or not _bin(obj[3], 64):
            raise _bad("AUTH needs device 1-255 and sig bin64", AUTH, CLOSE_POLICY)
        return Auth(obj[1], obj[2], obj[3])
    if ftype == REGISTER:
        if n != 5:
            raise _bad("REGISTER is [2, user, identity_key, sig, token]", REGISTER, CLOSE_POLICY)
        if not is_user(obj[1]):
            raise _bad("invalid user name", REGISTER, CLOSE_POLICY)
        if not _bin(obj[2], 32) or not _bin(obj[3], 64):
            raise _bad("REGISTER needs identity_key bin32 and sig bin64", REGISTER, CLOSE_POLICY)
        if obj[4] is not None and type(obj[4]) is not str:
            raise _bad("token must be a string or nil", REGISTER, CLOSE_POLICY)
        return Register(obj[1], obj[2], obj[3], obj[4])
    if ftype == SEND_GROUP:
        msg_id = obj[1] if n > 1 else None
        ref = msg_id if _bin(msg_id, 16) else SEND_GROUP
        if n != 4 or not _bin(msg_id, 16):
            raise _bad("SEND_GROUP is [11, msg_id: bin16, group, payload]", ref)
        if not is_group(obj[2]):
            raise _bad("to must be a group id", ref)
        if type(obj[3]) is not bytes:
            raise _bad("payload must be bin", ref)
        return SendGroup(obj[1], obj[2], obj[3])
    if ftype == READ:
        if n != 3 or not is_user(obj[1]) or type(obj[2]) is not list:
            raise _bad("READ is [16, sender, [msg_id]]", READ)
        ids = obj[2]
        if len(ids) > MAX_READ_IDS:
            raise _bad(f"READ lists at most {MAX_READ_IDS} ids", READ)
        if not all(_bin(i, 16) for i in ids):
            raise _bad("READ msg_ids must be bin16", READ)
        return Read(obj[1], ids)
    if ftype == REQ:
        req_id = obj[1] if n > 1 and type(obj[1]) is int else None
        if n != 4 or req_id is None or type(obj[2]) is not str or type(obj[3]) is not dict:
            error = _bad("REQ is [20, req_id, op: str, args: map]", REQ)
            error.req_id = req_id
            raise error
        return Request(obj[1], obj[2], obj[3])
    if ftype == SIGNAL:
        if n != 3 or not (is_user(obj[1]) or is_group(obj[1])):
            raise _bad("SIGNAL is [30, user or group, kind]", SIGNAL)
        kind = obj[2]
        if type(kind) is not str or not 1 <= len(kind) <= MAX_KIND_LEN:
            raise _bad(f"SIGNAL kind is a string of 1-{MAX_KIND_LEN} chars", SIGNAL)
        return Signal(obj[1], kind)
    raise _bad(f"unknown frame type {ftype}", ftype if 0 <= ftype < 2**31 else None)


_packb = msgpack.Packer(use_bin_type=True).pack


def packb(obj: object) -> bytes:
    return _packb(obj)


def encode_hello(server_name: str, challenge: bytes, ts: int) -> bytes:
    return packb([HELLO, PROTOCOL_VERSION, server_name, challenge, ts])


def encode_ready(user: str, device: int, pending: int) -> bytes:
    return packb([READY, user, device, pending])


def encode_error(ref: object, code: int, reason: str) -> bytes:
    return packb([ERROR, ref, code, reason])


def encode_sent(msg_id: bytes, ts: int) -> bytes:
    return packb([SENT, msg_id, ts])


def encode_res(req_id: int, ok: bool, result: object) -> bytes:
    return packb([RES, req_id, ok, result])


def encode_signaled(from_user: str, to: str, kind: str) -> bytes:
    return packb([SIGNALED, from_user, to, kind])


# Inbox entries are kept as (type, count, tail): the frame minus type and seq.
MSG_FIELDS = 6
RECEIPT_FIELDS = 5
EVENT_FIELDS = 3


# A tail is the fields packed as one fixarray minus its one-byte header:
# one call into msgpack instead of one per field. The MSG and RECEIPT tails,
# made for every message, are built by the fast path (``msg_tail``,
# ``receipt_tail`` in relay._fastpath_py and its compiled twin).


def event_tail(kind: str, body: dict[str, Any], ts: int) -> bytes:
    return _packb([kind, body, ts])[1:]


def unpack_frames(
    payload: bytes, max_frames: int, max_message_size: int = 0
) -> tuple[list[object], FrameError | None]:
    """The msgpack objects of one WebSocket message, and the error that ends
    them (undecodable, truncated, more than ``max_frames``), if any; the
    objects before an error are returned with it. A length field above
    ``max_message_size`` (and the payload's size) is undecodable."""
    # Most clients send one frame per WebSocket message: one unpackb call
    # is several times cheaper than building an Unpacker. Anything else
    # (several frames, garbage, a truncated frame) takes the general path,
    # which also finds the frames before an error.
    if max_frames >= 1:
        try:
            return [msgpack.unpackb(payload, raw=False, strict_map_key=False)], None
        except Exception:  # noqa: BLE001 - the general path below reports it
            pass
    return unpack_frames_stream(payload, max_frames, max_message_size)


def unpack_frames_stream(
    payload: bytes, max_frames: int, max_message_size: int = 0
) -> tuple[list[object], FrameError | None]:
    """:func:`unpack_frames` without the one-frame shortcut."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(max_message_size, len(payload)))
    unpacker.feed(payload)
    objs: list[object] = []
    # tell() counts the header of an object still incomplete too, so the
    # end of the last *complete* object is what shows a truncated frame.
    end = 0
    try:
        for obj in unpacker:
            objs.append(obj)
            end = unpacker.tell()
            if len(objs) > max_frames:
                return [], FrameError(TOO_LARGE, f"more than {max_frames} frames in one message")
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types on garbage
        return objs, FrameError(BAD_REQUEST, f"undecodable msgpack: {type(exc).__name__}", malformed=True)
    if end != len(payload):
        return objs, FrameError(BAD_REQUEST, "truncated msgpack frame", malformed=True)
    return objs, None


def decode_tail(tail: bytes) -> list[Any]:
    """The fields of a stored tail, for the rare reader (tests, tools)."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(tail)
    return list(unpacker)
