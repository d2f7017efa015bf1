"""The relay.v1 frames the bench speaks, and the blocking session handshake.

Only what the scenarios need: HELLO → REGISTER/AUTH → READY, then the hot
frames are built by hand in :mod:`bench.workload` (byte templates are much
cheaper than ``msgpack.packb`` per message).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
from nacl.signing import SigningKey

from bench.wsclient import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    ProtocolError,
    ServerFrameParser,
    connect,
    encode_binary,
    encode_control,
)

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

AUTH_CONTEXT = b"relay-auth-v1"


def auth_signature(key: SigningKey, server_name: str, challenge: bytes) -> bytes:
    """Ed25519 over ``b"relay-auth-v1" + server_name + challenge`` (PROTOCOL.md, Session)."""
    return key.sign(AUTH_CONTEXT + server_name.encode() + challenge).signature


class SessionError(Exception):
    """The relay refused the session (ERROR frame) or answered something unexpected."""


@dataclass
class Session:
    """One authenticated connection, still blocking; the engine takes it over."""

    sock: socket.socket
    parser: ServerFrameParser
    unpacker: msgpack.Unpacker
    user: str
    device: int
    key: SigningKey
    pending: int
    early: list[Any] = field(default_factory=list)
    """Frames that arrived after READY during the handshake (handled by the engine)."""


def new_unpacker(read_size: int = 0) -> msgpack.Unpacker:
    """``read_size`` is the initial buffer (msgpack's default is 1 MiB per
    unpacker, which thousands of idle connections do not need)."""
    return msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=4 << 20, read_size=read_size)


def req_frame(req_id: int, op: str, args: dict[str, Any]) -> bytes:
    """``[20, req_id, op, args]`` (PROTOCOL.md, Control requests)."""
    return msgpack.packb([REQ, req_id, op, args])


def _read_frames(sock: socket.socket, parser: ServerFrameParser, unpacker: msgpack.Unpacker, deadline: float) -> list[Any]:
    """Block until at least one relay.v1 frame arrives; return all frames of that read."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SessionError("timed out waiting for the relay")
        sock.settimeout(remaining)
        try:
            data = sock.recv(1 << 20)
        except TimeoutError as exc:
            raise SessionError("timed out waiting for the relay") from exc
        if not data:
            raise SessionError("relay closed the connection during the handshake")
        frames: list[Any] = []
        for op, payload in parser.feed(data):
            if op == OP_BINARY:
                unpacker.feed(payload)
                frames.extend(unpacker)
            elif op == OP_PING:
                sock.sendall(encode_control(OP_PONG, payload))
            elif op == OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                raise SessionError(f"relay closed the connection: {code} {payload[2:]!r}")
            elif op == OP_PONG:
                pass
            else:
                raise ProtocolError(f"unexpected opcode {op} (text messages are not part of relay.v1)")
        if frames:
            return frames


@dataclass
class PendingHandshake:
    sock: socket.socket
    parser: ServerFrameParser
    unpacker: msgpack.Unpacker
    user: str
    key: SigningKey
    hello: list[Any] | None = None
    early: list[Any] = field(default_factory=list)


def open_connection(url: str, user: str, key: SigningKey, timeout: float, read_size: int = 0) -> PendingHandshake:
    sock, rest = connect(url, timeout=timeout)
    hs = PendingHandshake(sock, ServerFrameParser(), new_unpacker(read_size), user, key)
    if rest:
        for op, payload in hs.parser.feed(rest):
            if op == OP_BINARY:
                hs.unpacker.feed(payload)
                hs.early.extend(hs.unpacker)
    return hs


def _next_frame(hs: PendingHandshake, deadline: float) -> Any:
    while not hs.early:
        hs.early.extend(_read_frames(hs.sock, hs.parser, hs.unpacker, deadline))
    return hs.early.pop(0)


def auth_frame(
    hello: Any, user: str, key: SigningKey, register: bool, device: int = 1, token: str | None = None
) -> bytes:
    """The REGISTER or AUTH frame answering ``hello`` (checked here)."""
    if not isinstance(hello, list) or len(hello) < 5 or hello[0] != HELLO:
        raise SessionError(f"expected HELLO, got {hello!r:.200}")
    if hello[1] != 1:
        raise SessionError(f"unsupported protocol version {hello[1]!r}")
    server_name, challenge = hello[2], hello[3]
    sig = auth_signature(key, server_name, challenge)
    if register:
        return msgpack.packb([REGISTER, user, bytes(key.verify_key), sig, token])
    return msgpack.packb([AUTH, user, device, sig])


def send_auth(hs: PendingHandshake, register: bool, deadline: float, device: int = 1, token: str | None = None) -> None:
    """Read HELLO, answer REGISTER (new account) or AUTH."""
    hello = _next_frame(hs, deadline)
    frame = auth_frame(hello, hs.user, hs.key, register, device, token)
    hs.hello = hello
    hs.sock.settimeout(max(0.001, deadline - time.monotonic()))
    hs.sock.sendall(encode_binary(frame))


def finish_auth(hs: PendingHandshake, deadline: float) -> Session:
    """Wait for READY (ERROR → :class:`SessionError`)."""
    frame = _next_frame(hs, deadline)
    if isinstance(frame, list) and frame and frame[0] == ERROR:
        raise SessionError(f"relay refused {hs.user}: ERROR {frame[2:]!r}")
    if not isinstance(frame, list) or len(frame) < 4 or frame[0] != READY:
        raise SessionError(f"expected READY, got {frame!r:.200}")
    return Session(hs.sock, hs.parser, hs.unpacker, hs.user, frame[2], hs.key, frame[3], hs.early)


def open_sessions(
    url: str,
    users: list[str],
    register: bool = True,
    timeout: float = 30.0,
    token: str | None = None,
    keys: list[SigningKey] | None = None,
    read_size: int = 0,
) -> list[Session]:
    """Authenticate many users, pipelined in three phases (connect all, answer all
    HELLOs, collect all READYs) so a relay that group-commits registrations
    is not forced into one commit per user. ``keys`` (one per user) for AUTH
    of existing users; fresh keys by default. Everything opened is closed on error."""
    deadline = time.monotonic() + timeout
    pending: list[PendingHandshake] = []
    try:
        for i, user in enumerate(users):
            key = keys[i] if keys is not None else SigningKey.generate()
            pending.append(open_connection(url, user, key, timeout, read_size))
        for hs in pending:
            send_auth(hs, register, deadline, token=token)
        return [finish_auth(hs, deadline) for hs in pending]
    except BaseException:
        for hs in pending:
            hs.sock.close()
        raise


def close_sessions(sessions: list[Session]) -> None:
    """Close frame (1000) and close, without waiting for the relay's answer."""
    frame = encode_control(OP_CLOSE, (1000).to_bytes(2, "big"))
    for s in sessions:
        try:
            s.sock.setblocking(False)
            s.sock.send(frame)
        except OSError:
            pass
        s.sock.close()


def next_frames(session: Session, deadline: float) -> list[Any]:
    """Frames that arrived with READY, else block for the next read's frames."""
    if session.early:
        frames, session.early = session.early, []
        return frames
    return _read_frames(session.sock, session.parser, session.unpacker, deadline)
