"""The client side of RFC 6455, just enough for a load generator.

Deliberately independent of ``relay.fastpath``: the bench checks the relay's
WebSocket layer from the outside, so it must not share the relay's parser.
Everything is written for a single-threaded epoll loop: the handshake is
blocking (with a timeout), after which the socket goes non-blocking and bytes
are pushed through :class:`ServerFrameParser` and :func:`encode_binary`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import socket
import struct
import time
from urllib.parse import urlsplit

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SUBPROTOCOL = "relay.v1"

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_H16 = struct.Struct("!BBH")
_H64 = struct.Struct("!BBQ")
_getrandbits = random.getrandbits


class HandshakeError(Exception):
    """The server refused or botched the HTTP upgrade."""


class ProtocolError(Exception):
    """The server broke RFC 6455 (or closed the connection)."""


def parse_ws_url(url: str) -> tuple[str, int, str]:
    """``ws://host:port/path`` → (host, port, path). Only plain ``ws`` on loopback
    is in scope for the bench; ``wss`` is refused rather than half supported."""
    parts = urlsplit(url)
    if parts.scheme != "ws":
        raise ValueError(f"only ws:// URLs are supported by the bench, got {url!r}")
    if not parts.hostname or not parts.port:
        raise ValueError(f"URL needs a host and a port: {url!r}")
    return parts.hostname, parts.port, parts.path or "/"


def mask_bytes(payload: bytes, mask: bytes) -> bytes:
    """XOR with a 4-byte mask, one big-integer operation (no per-byte loop)."""
    n = len(payload)
    if n == 0:
        return b""
    key = (mask * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def encode_binary(payload: bytes) -> bytes:
    """One masked, unfragmented binary frame (client → server) with a fresh mask."""
    n = len(payload)
    m = _getrandbits(32)
    mask = m.to_bytes(4, "little")
    if n < 126:
        header = bytes((0x82, 0x80 | n))
    elif n < 65536:
        header = _H16.pack(0x82, 0xFE, n)
    else:
        header = _H64.pack(0x82, 0xFF, n)
    if n == 0:
        return header + mask
    key = (mask * ((n >> 2) + 1))[:n]
    body = (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")
    return header + mask + body


def encode_control(opcode: int, payload: bytes = b"") -> bytes:
    """A masked control frame (close, ping, pong); ``payload`` ≤ 125 bytes."""
    if len(payload) > 125:
        raise ValueError("control frame payload too long")
    mask = os.urandom(4)
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + mask_bytes(payload, mask)


class ServerFrameParser:
    """Incremental parser of server → client frames (which must be unmasked).

    ``feed`` returns ``(opcode, payload)`` for every complete data message
    (fragments joined) and every control frame, in order.
    """

    __slots__ = ("_buf", "_frags", "_frag_op", "_frag_size", "max_size")

    def __init__(self, max_size: int = (1 << 20) + 8192) -> None:
        self._buf = b""
        self._frags: list[bytes] = []
        self._frag_op = 0
        self._frag_size = 0
        self.max_size = max_size

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf + data if self._buf else data
        out: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            if b1 & 0x80:
                raise ProtocolError("server frame is masked")
            if b0 & 0x70:
                raise ProtocolError("reserved bits set")
            length = b1
            header = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                header = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                header = 10
            if length > self.max_size:
                raise ProtocolError(f"server message of {length} bytes exceeds {self.max_size}")
            start = pos + header
            stop = start + length
            if stop > end:
                break
            payload = buf[start:stop]
            pos = stop
            op = b0 & 0x0F
            if b0 & 0x80:  # FIN
                if op == OP_CONT:
                    if not self._frag_op:
                        raise ProtocolError("continuation without a message")
                    self._frags.append(payload)
                    out.append((self._frag_op, b"".join(self._frags)))
                    self._frags = []
                    self._frag_op = 0
                    self._frag_size = 0
                else:
                    out.append((op, payload))
            else:
                if op >= 0x8:
                    raise ProtocolError("fragmented control frame")
                if op != OP_CONT:
                    self._frag_op = op
                self._frags.append(payload)
                self._frag_size += length
                if self._frag_size > self.max_size:
                    raise ProtocolError("fragmented message too big")
        self._buf = buf[pos:] if pos < end else b""
        return out


def connect(url: str, timeout: float = 10.0, extra_headers: dict[str, str] | None = None) -> tuple[socket.socket, bytes]:
    """Open a TCP connection and perform the HTTP/1.1 upgrade with
    ``Sec-WebSocket-Protocol: relay.v1``. Returns the (blocking) socket and any
    bytes that arrived after the 101 response (already WebSocket frames)."""
    host, port, path = parse_ws_url(url)
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            f"Sec-WebSocket-Protocol: {SUBPROTOCOL}",
        ]
        for name, value in (extra_headers or {}).items():
            lines.append(f"{name}: {value}")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        deadline = time.monotonic() + timeout
        data = b""
        while b"\r\n\r\n" not in data:
            if len(data) > 65536:
                raise HandshakeError("upgrade response headers too long")
            if time.monotonic() > deadline:
                raise HandshakeError("timed out waiting for the upgrade response")
            chunk = sock.recv(65536)
            if not chunk:
                raise HandshakeError(f"connection closed during the upgrade: {data[:200]!r}")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        status, *header_lines = head.decode("latin-1").split("\r\n")
        if not status.startswith("HTTP/1.1 101"):
            raise HandshakeError(f"upgrade refused: {status!r}")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        expected = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != expected:
            raise HandshakeError("bad Sec-WebSocket-Accept")
        if headers.get("sec-websocket-protocol") != SUBPROTOCOL:
            raise HandshakeError(f"subprotocol not accepted: {headers.get('sec-websocket-protocol')!r}")
        if "sec-websocket-extensions" in headers:
            raise HandshakeError(f"unexpected extension: {headers['sec-websocket-extensions']!r}")
        return sock, rest
    except BaseException:
        sock.close()
        raise
