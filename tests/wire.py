"""A frame-level test client: speaks PROTOCOL.md directly over trio-websocket,
so integration tests can send exactly the frames they mean (good or bad)
without the client library's retries and de-duplication in the way."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import nacl.signing
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

AUTH_CONTEXT = b"relay-auth-v1"
TIMEOUT = 10


def unpack_all(data: bytes) -> list[Any]:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(data)
    return list(unpacker)


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


class WireClient:
    """One WebSocket connection; frames received are buffered in ``inbox``."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.buffer: list[Any] = []
        self.hello: list[Any] | None = None
        self.ready: list[Any] | None = None

    async def send(self, *frames_: Any) -> None:
        await self.ws.send_message(b"".join(packb(f) for f in frames_))

    async def send_raw(self, data: bytes | str) -> None:
        await self.ws.send_message(data)

    async def recv(self, timeout: float = TIMEOUT) -> list[Any]:
        """The next frame (from a batch or a new message)."""
        with trio.fail_after(timeout):
            while not self.buffer:
                message = await self.ws.get_message()
                assert isinstance(message, bytes), "relay sent a text message"
                self.buffer.extend(unpack_all(message))
        return self.buffer.pop(0)

    async def recv_type(self, ftype: int, timeout: float = TIMEOUT, keep: bool = False) -> list[Any]:
        """Skip frames until one of ``ftype`` arrives. Skipped frames are dropped,
        or with ``keep`` left in order for later ``recv`` calls."""
        kept: list[Any] = []
        try:
            with trio.fail_after(timeout):
                while True:
                    frame = await self.recv(timeout)
                    if frame[0] == ftype:
                        return frame
                    if keep:
                        kept.append(frame)
        finally:
            self.buffer[:0] = kept

    async def expect_nothing(self, seconds: float = 0.3) -> None:
        with trio.move_on_after(seconds):
            frame = await self.recv(seconds + 1)
            raise AssertionError(f"unexpected frame {frame!r}")

    async def closed(self, timeout: float = TIMEOUT) -> int | None:
        """Wait for the relay to close; return the close code."""
        with trio.fail_after(timeout):
            try:
                while True:
                    message = await self.ws.get_message()
                    if isinstance(message, bytes):
                        self.buffer.extend(unpack_all(message))
            except ConnectionClosed as exc:
                return exc.reason.code
        return None

    async def auth(self, user: str, device: int, key: nacl.signing.SigningKey, server_name: str = "relay") -> list[Any]:
        assert self.hello is not None
        sig = key.sign(AUTH_CONTEXT + server_name.encode() + self.hello[3]).signature
        await self.send([1, user, device, sig])
        frame = await self.recv()
        if frame[0] == 3:
            self.ready = frame
        return frame

    async def register(self, user: str, key: nacl.signing.SigningKey, token: str | None = None, server_name: str = "relay") -> list[Any]:
        assert self.hello is not None
        sig = key.sign(AUTH_CONTEXT + server_name.encode() + self.hello[3]).signature
        await self.send([2, user, bytes(key.verify_key), sig, token])
        frame = await self.recv()
        if frame[0] == 3:
            self.ready = frame
        return frame

    async def send_msg(self, to: str, payloads: dict[int, bytes], msg_id: bytes | None = None) -> bytes:
        msg_id = msg_id or os.urandom(16)
        await self.send([10, msg_id, to, payloads])
        return msg_id

    async def request(self, req_id: int, op: str, args: dict[str, Any]) -> list[Any]:
        await self.send([20, req_id, op, args])
        return await self.recv_type(21, keep=True)


@asynccontextmanager
async def connect(url: str, subprotocols: tuple[str, ...] = ("relay.v1",)) -> AsyncIterator[WireClient]:
    """``async with connect(url) as client:`` -- HELLO already received."""
    try:
        async with open_websocket_url(
            url, subprotocols=list(subprotocols), max_message_size=(1 << 20) + 8192
        ) as ws:
            client = WireClient(ws)
            client.hello = await client.recv()
            assert client.hello[0] == 0
            yield client
    except ConnectionClosed:
        pass


class User:
    """A registered user with one device key, for tests."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.key = nacl.signing.SigningKey.generate()

    async def register(self, url: str) -> None:
        async with connect(url) as client:
            frame = await client.register(self.name, self.key)
            assert frame[0] == 3, frame

    @asynccontextmanager
    async def online(self, url: str, device: int = 1) -> AsyncIterator[WireClient]:
        async with connect(url) as client:
            frame = await client.auth(self.name, device, self.key)
            assert frame[0] == 3, frame
            yield client
