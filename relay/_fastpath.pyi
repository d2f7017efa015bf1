"""Type stub for the compiled twin of :mod:`relay._fastpath_py` (same API)."""

from relay._fastpath_py import CLOSE_PROTOCOL_ERROR as CLOSE_PROTOCOL_ERROR
from relay._fastpath_py import CLOSE_TOO_BIG as CLOSE_TOO_BIG
from relay._fastpath_py import OP_BINARY as OP_BINARY
from relay._fastpath_py import OP_CLOSE as OP_CLOSE
from relay._fastpath_py import OP_CONTINUATION as OP_CONTINUATION
from relay._fastpath_py import OP_PING as OP_PING
from relay._fastpath_py import OP_PONG as OP_PONG
from relay._fastpath_py import OP_TEXT as OP_TEXT
from relay._fastpath_py import WebSocketError as WebSocketError

IMPLEMENTATION: str

def apply_mask(data: bytes, mask: bytes) -> bytes: ...
def encode_frame(
    opcode: int, payload: bytes, mask: bytes | None = None, fin: bool = True
) -> bytes: ...
def pack_entry(type_code: int, seq: int, count: int, tail: bytes) -> bytes: ...
def msg_tail(
    msg_id: bytes, from_user: str, from_device: int, group: str | None, ts: int, payload: bytes
) -> bytes: ...
def receipt_tail(msg_id: bytes, by_user: str, by_device: int, status: int, ts: int) -> bytes: ...
def msg_sender(tail: bytes) -> tuple[bytes, str]: ...

class FrameParser:
    max_message_size: int
    require_mask: bool
    def __init__(self, max_message_size: int, require_mask: bool = True) -> None: ...
    def buffered(self) -> int: ...
    def feed(self, data: bytes) -> list[tuple[int, bytes]]: ...
