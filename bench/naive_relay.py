"""A naive relay baseline: plain trio-websocket, one task per connection,
in-memory dicts, no durability, no flow window.

It implements just enough of PROTOCOL.md for the bench scenarios: HELLO,
REGISTER, AUTH, READY, SEND → SENT, MSG, ACK → RECEIPT (status 1), REQ
``group.create`` (EVENT ``group.changed`` to every member) and SEND_GROUP
(one MSG per member device, each a copy: there is no store to share a body
in), ERROR for anything else. It is what a careful but straightforward first version of the
relay would look like, and the yardstick the real relay is compared with.

    python -m bench.naive_relay --port 0      # prints "listening ws://HOST:PORT/v1"
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

USER_RE = re.compile(r"[a-z0-9._-]{1,64}\Z")
AUTH_CONTEXT = b"relay-auth-v1"
MAX_MESSAGE = 1 << 20
MAX_FRAMES = 1024

HELLO, AUTH, REGISTER, READY, ERROR = 0, 1, 2, 3, 4
SEND, SEND_GROUP, SENT, MSG, ACK, RECEIPT = 10, 11, 12, 13, 14, 15
REQ, RES, EVENT = 20, 21, 22


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Entry:
    seq: int
    frame: bytes
    # For a MSG: whom to send the delivery receipt to.
    receipt_to: tuple[str, int] | None = None
    msg_id: bytes | None = None


@dataclass
class Device:
    key: VerifyKey
    inbox: dict[int, Entry] = field(default_factory=dict)
    next_seq: int = 1
    conn: Conn | None = None


@dataclass
class Conn:
    ws: WebSocketConnection
    user: str
    device: int


class State:
    def __init__(self, name: str) -> None:
        self.name = name
        self.devices: dict[tuple[str, int], Device] = {}
        self.users: dict[str, list[int]] = {}
        self.sent: dict[tuple[str, int, bytes], int] = {}
        self.groups: dict[str, dict[str, Any]] = {}

    def deposit(self, owner: tuple[str, int], frame_tail: list[Any], kind: int, **extra: Any) -> Entry:
        dev = self.devices[owner]
        seq = dev.next_seq
        dev.next_seq += 1
        entry = Entry(seq, msgpack.packb([kind, seq, *frame_tail]), **extra)
        dev.inbox[seq] = entry
        return entry


def error(ref: Any, code: int, reason: str) -> bytes:
    return msgpack.packb([ERROR, ref, code, reason])


async def handler(state: State, request: WebSocketRequest) -> None:
    if request.path != "/v1" or "relay.v1" not in request.proposed_subprotocols:
        await request.reject(400)
        return
    ws = await request.accept(subprotocol="relay.v1")
    try:
        conn = await handshake(state, ws)
        if conn is None:
            return
        try:
            await serve(state, conn)
        finally:
            dev = state.devices.get((conn.user, conn.device))
            if dev is not None and dev.conn is conn:
                dev.conn = None
    except ConnectionClosed:
        pass


async def handshake(state: State, ws: WebSocketConnection) -> Conn | None:
    challenge = os.urandom(32)
    await ws.send_message(msgpack.packb([HELLO, 1, state.name, challenge, now_ms()]))
    with trio.move_on_after(30):
        message = await ws.get_message()
        if not isinstance(message, bytes):
            await ws.aclose(1003)
            return None
        try:
            frame = msgpack.unpackb(message, raw=False, strict_map_key=False)
        except Exception:
            frame = None
        signed = AUTH_CONTEXT + state.name.encode() + challenge
        if isinstance(frame, list) and len(frame) == 5 and frame[0] == REGISTER:
            _, user, key, sig, _token = frame
            if not isinstance(user, str) or not USER_RE.match(user) or not isinstance(key, bytes) or len(key) != 32:
                await ws.send_message(error(REGISTER, 400, "bad user or key"))
                await ws.aclose(1008)
                return None
            if user in state.users:
                await ws.send_message(error(REGISTER, 409, "user taken"))
                await ws.aclose(1008)
                return None
            try:
                vk = VerifyKey(key)
                vk.verify(signed, sig)
            except (BadSignatureError, ValueError, TypeError):
                await ws.send_message(error(REGISTER, 401, "bad signature"))
                await ws.aclose(1008)
                return None
            state.users[user] = [1]
            state.devices[(user, 1)] = Device(vk)
            device = 1
        elif isinstance(frame, list) and len(frame) == 4 and frame[0] == AUTH:
            _, user, device, sig = frame
            dev = state.devices.get((user, device)) if isinstance(user, str) and isinstance(device, int) else None
            try:
                if dev is None:
                    raise BadSignatureError("unknown device")
                dev.key.verify(signed, sig)
            except (BadSignatureError, ValueError, TypeError):
                await ws.send_message(error(AUTH, 401, "authentication failed"))
                await ws.aclose(1008)
                return None
        else:
            ref = frame[0] if isinstance(frame, list) and frame and isinstance(frame[0], int) else None
            await ws.send_message(error(ref, 401, "AUTH or REGISTER first"))
            await ws.aclose(1008)
            return None
        conn = Conn(ws, user, device)
        dev = state.devices[(user, device)]
        old = dev.conn
        dev.conn = conn
        if old is not None:
            await old.ws.aclose(4409, "connected elsewhere")
        await ws.send_message(msgpack.packb([READY, user, device, len(dev.inbox)]))
        waiting = [e.frame for e in dev.inbox.values()]
        for i in range(0, len(waiting), MAX_FRAMES):  # the client's limits: ≤ 1024 frames per message
            await ws.send_message(b"".join(waiting[i : i + MAX_FRAMES]))
        return conn
    await ws.aclose(1008)
    return None


async def serve(state: State, conn: Conn) -> None:
    me = (conn.user, conn.device)
    while True:
        message = await conn.ws.get_message()
        if not isinstance(message, bytes):
            await conn.ws.aclose(1003)
            return
        replies: list[bytes] = []
        pushes: dict[tuple[str, int], list[bytes]] = {}
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        unpacker.feed(message)
        try:
            frames = list(unpacker)
        except Exception:
            frames = [None]
        if len(frames) > MAX_FRAMES:
            await conn.ws.send_message(error(None, 413, "too many frames"))
            continue
        for frame in frames:
            if not isinstance(frame, list) or not frame or not isinstance(frame[0], int):
                replies.append(error(None, 400, "malformed frame"))
                continue
            kind = frame[0]
            if kind == SEND and len(frame) == 4:
                handle_send(state, me, frame, replies, pushes)
            elif kind == SEND_GROUP and len(frame) == 4:
                handle_send_group(state, me, frame, replies, pushes)
            elif kind == REQ and len(frame) == 4:
                handle_req(state, me, frame, replies, pushes)
            elif kind == ACK and len(frame) == 2 and isinstance(frame[1], int):
                handle_ack(state, me, frame[1], pushes)
            else:
                replies.append(error(kind, 400, f"frame type {kind} not supported by the naive relay"))
        if replies:
            await conn.ws.send_message(b"".join(replies))
        for owner, frames_out in pushes.items():
            target = state.devices[owner].conn
            if target is not None:
                with contextlib.suppress(ConnectionClosed):
                    await target.ws.send_message(b"".join(frames_out))


def handle_send(
    state: State,
    me: tuple[str, int],
    frame: list[Any],
    replies: list[bytes],
    pushes: dict[tuple[str, int], list[bytes]],
) -> None:
    _, msg_id, to, payloads = frame
    if not isinstance(msg_id, bytes) or len(msg_id) != 16 or not isinstance(to, str) or not isinstance(payloads, dict):
        replies.append(error(msg_id if isinstance(msg_id, bytes) else SEND, 400, "malformed SEND"))
        return
    key = (me[0], me[1], msg_id)
    if key in state.sent:
        replies.append(msgpack.packb([SENT, msg_id, state.sent[key]]))
        return
    devices = state.users.get(to)
    if devices is None:
        replies.append(error(msg_id, 404, "no such user"))
        return
    if set(payloads) != set(devices):
        missing = sorted(set(devices) - set(payloads))
        extra = sorted(set(payloads) - set(devices))
        replies.append(error(msg_id, 409, f"missing {missing}; extra {extra}"))
        return
    ts = now_ms()
    for device, payload in payloads.items():
        owner = (to, device)
        entry = state.deposit(
            owner, [msg_id, me[0], me[1], None, ts, payload], MSG, receipt_to=me, msg_id=msg_id
        )
        pushes.setdefault(owner, []).append(entry.frame)
    state.sent[key] = ts
    replies.append(msgpack.packb([SENT, msg_id, ts]))


def handle_req(
    state: State,
    me: tuple[str, int],
    frame: list[Any],
    replies: list[bytes],
    pushes: dict[tuple[str, int], list[bytes]],
) -> None:
    """Only ``group.create {name, members}``; the creator is a member and the admin."""
    _, req_id, op, args = frame
    if op != "group.create" or not isinstance(args, dict):
        replies.append(msgpack.packb([RES, req_id, False, {"code": 400, "reason": f"op {op!r} not supported"}]))
        return
    others = args.get("members")
    name = args.get("name")
    if not isinstance(others, list) or not all(isinstance(u, str) for u in others) or not isinstance(name, str):
        replies.append(msgpack.packb([RES, req_id, False, {"code": 400, "reason": "bad args"}]))
        return
    unknown = [u for u in others if u not in state.users]
    if unknown:
        replies.append(msgpack.packb([RES, req_id, False, {"code": 404, "reason": f"no such user {unknown[0]}"}]))
        return
    members = list(dict.fromkeys([me[0], *others]))
    group = "g." + base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
    info = {"group": group, "name": name, "version": 1, "members": members, "admins": [me[0]]}
    state.groups[group] = info
    ts = now_ms()
    body = dict(info, actor=me[0])
    for user in members:
        for device in state.users[user]:
            entry = state.deposit((user, device), ["group.changed", body, ts], EVENT)
            pushes.setdefault((user, device), []).append(entry.frame)
    replies.append(msgpack.packb([RES, req_id, True, info]))


def handle_send_group(
    state: State,
    me: tuple[str, int],
    frame: list[Any],
    replies: list[bytes],
    pushes: dict[tuple[str, int], list[bytes]],
) -> None:
    _, msg_id, group, payload = frame
    if not isinstance(msg_id, bytes) or len(msg_id) != 16 or not isinstance(group, str) or not isinstance(payload, bytes):
        replies.append(error(msg_id if isinstance(msg_id, bytes) else SEND_GROUP, 400, "malformed SEND_GROUP"))
        return
    key = (me[0], me[1], msg_id)
    if key in state.sent:
        replies.append(msgpack.packb([SENT, msg_id, state.sent[key]]))
        return
    info = state.groups.get(group)
    if info is None or me[0] not in info["members"]:
        replies.append(error(msg_id, 403, "not a member of that group"))
        return
    ts = now_ms()
    tail = [msg_id, me[0], me[1], group, ts, payload]
    for user in info["members"]:
        for device in state.users[user]:
            owner = (user, device)
            if owner == me:
                continue
            entry = state.deposit(owner, tail, MSG, receipt_to=me, msg_id=msg_id)
            pushes.setdefault(owner, []).append(entry.frame)
    state.sent[key] = ts
    replies.append(msgpack.packb([SENT, msg_id, ts]))


def handle_ack(state: State, me: tuple[str, int], seq: int, pushes: dict[tuple[str, int], list[bytes]]) -> None:
    dev = state.devices[me]
    done = []
    for s in dev.inbox:  # insertion order is seq order
        if s > seq:
            break
        done.append(s)
    ts = now_ms()
    for s in done:
        entry = dev.inbox.pop(s)
        if entry.receipt_to is not None and entry.receipt_to in state.devices:
            receipt = state.deposit(entry.receipt_to, [entry.msg_id, me[0], me[1], 1, ts], RECEIPT)
            pushes.setdefault(entry.receipt_to, []).append(receipt.frame)


async def main(host: str, port: int, name: str) -> None:
    state = State(name)

    async def handle(request: WebSocketRequest) -> None:
        await handler(state, request)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handle, host, port, None)
        print(f"listening ws://{host}:{server.port}/v1", flush=True)


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_relay", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="naive.local", help="server_name in HELLO")
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        print("the naive relay is a bench baseline: loopback only", file=sys.stderr)
        raise SystemExit(2)
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main, args.host, args.port, args.name)


if __name__ == "__main__":
    cli()
