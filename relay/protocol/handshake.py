"""The server side of the WebSocket opening handshake (RFC 6455 section 4), sans I/O.

Feed :meth:`ServerHandshake.receive_data` the first bytes of a connection
until it returns a :class:`HandshakeOutcome`: the HTTP response to write and,
when accepted, the bytes that followed the request (the first WebSocket
frames). Parsing the HTTP request is h11's job; this module only applies the
relay's rules: path ``/v1``, subprotocol ``relay.v1`` offered (else 400), no
extensions negotiated (permessage-deflate is declined by omission).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

import h11

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_REQUEST_BYTES = 16 * 1024


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


@dataclass(frozen=True, slots=True)
class HandshakeOutcome:
    accepted: bool
    response: bytes
    trailing: bytes = b""
    reason: str = ""


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


class ServerHandshake:
    def __init__(self, path: str = "/v1", subprotocol: str = "relay.v1", server_header: str = "relay") -> None:
        self.path = path.encode()
        self.subprotocol = subprotocol.encode()
        self.server_header = server_header.encode()
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)

    def _reject(self, status: int, reason: str, extra: list[tuple[bytes, bytes]] | None = None) -> HandshakeOutcome:
        body = reason.encode() + b"\n"
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            (b"server", self.server_header),
            *(extra or []),
        ]
        try:
            data = self._conn.send(h11.Response(status_code=status, headers=headers, reason=reason.encode("ascii", "replace")[:60])) or b""
            data += self._conn.send(h11.Data(data=body)) or b""
            data += self._conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            # h11 refuses to answer a request it could not parse; write it by hand.
            data = (
                b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                % (status, reason.encode("ascii", "replace"), len(body))
            ) + body
        return HandshakeOutcome(False, data, reason=reason)

    def receive_data(self, data: bytes) -> HandshakeOutcome | None:
        """None: send more bytes. Otherwise the outcome; write ``response`` either way."""
        try:
            self._conn.receive_data(data)
            event = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            return self._reject(400, f"bad HTTP request: {exc}")
        if event is h11.NEED_DATA:
            if not data:
                return self._reject(400, "connection closed during handshake")
            return None
        if not isinstance(event, h11.Request):
            return self._reject(400, "expected an HTTP request")
        headers: dict[bytes, bytes] = {}
        for name, value in event.headers:
            headers[name] = headers[name] + b", " + value if name in headers else value
        if event.method != b"GET":
            return self._reject(405, "method not allowed")
        if event.target.split(b"?", 1)[0] != self.path:
            return self._reject(404, "not found: the relay speaks WebSocket at /v1")
        if b"websocket" not in _tokens(headers.get(b"upgrade", b"")) or b"upgrade" not in _tokens(
            headers.get(b"connection", b"")
        ):
            return self._reject(426, "upgrade to websocket required")
        if headers.get(b"sec-websocket-version", b"").strip() != b"13":
            # RFC 6455 4.4: name the version(s) the server speaks.
            return self._reject(426, "unsupported websocket version (need 13)", [(b"sec-websocket-version", b"13")])
        key = headers.get(b"sec-websocket-key", b"").strip()
        try:
            if len(base64.b64decode(key, validate=True)) != 16:
                raise ValueError
        except ValueError:
            return self._reject(400, "bad Sec-WebSocket-Key")
        if self.subprotocol not in _tokens(headers.get(b"sec-websocket-protocol", b"")):
            return self._reject(400, f"subprotocol {self.subprotocol.decode()} required")
        response = self._conn.send(
            h11.InformationalResponse(
                status_code=101,
                reason=b"Switching Protocols",
                headers=[
                    (b"upgrade", b"websocket"),
                    (b"connection", b"Upgrade"),
                    (b"sec-websocket-accept", accept_key(key)),
                    (b"sec-websocket-protocol", self.subprotocol),
                    (b"server", self.server_header),
                ],
            )
        )
        trailing, _closed = self._conn.trailing_data
        return HandshakeOutcome(True, response or b"", bytes(trailing))
