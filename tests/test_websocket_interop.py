"""RFC 6455 behaviour of the relay, on both fast paths, and interoperability.

The first part speaks WebSocket by hand over a raw trio TCP stream (its own
handshake, masking and frame parser, sharing no code with the relay) so it can
break each rule on purpose. The second part runs two independent client
libraries, trio-websocket and ``websockets`` (sync and asyncio clients, in a
worker thread), through register + send + receive against the relay.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import struct
from typing import Any

import msgpack
import nacl.signing
import pytest
import trio
import websockets.asyncio.client
import websockets.sync.client
from trio_websocket import open_websocket_url

from tests.wire import AUTH_CONTEXT, User, connect

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
HELLO, REGISTER, READY, SEND, SENT, MSG, ACK, RECEIPT = 0, 2, 3, 10, 12, 13, 14, 15
TIMEOUT = 10
CLIENT_MAX = (1 << 20) + 8192


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack_all(data: bytes) -> list[Any]:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(data)
    return list(unpacker)


def register_frame(name: str, key: nacl.signing.SigningKey, hello: list[Any]) -> bytes:
    sig = key.sign(AUTH_CONTEXT + hello[2].encode() + hello[3]).signature
    return packb([REGISTER, name, bytes(key.verify_key), sig, None])


def auth_frame(name: str, key: nacl.signing.SigningKey, hello: list[Any]) -> bytes:
    sig = key.sign(AUTH_CONTEXT + hello[2].encode() + hello[3]).signature
    return packb([1, name, 1, sig])


# ------------------------------------------------------- a hand-made client


def client_frame(
    opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, masked: bool = True
) -> bytes:
    """One client frame, built by hand (RFC 6455 section 5.2)."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack(">Q", n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawClient:
    """A WebSocket client over a bare TCP stream."""

    def __init__(
        self, stream: trio.SocketStream, status: int, headers: dict[str, str], rest: bytes
    ) -> None:
        self.stream = stream
        self.status = status
        self.headers = headers
        self.buf = bytearray(rest)

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        if not data:
            return False
        self.buf += data
        return True

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def read_frame(self) -> tuple[bool, int, bytes] | None:
        """(fin, opcode, payload) of the next server frame; None at EOF."""
        with trio.fail_after(TIMEOUT):
            while True:
                if len(self.buf) >= 2:
                    b0, b1 = self.buf[0], self.buf[1]
                    assert b0 & 0x70 == 0, "server set reserved bits"
                    assert b1 & 0x80 == 0, "server frames must not be masked"
                    n, pos = b1 & 0x7F, 2
                    if n == 126 and len(self.buf) >= 4:
                        n, pos = struct.unpack(">H", self.buf[2:4])[0], 4
                    elif n == 127 and len(self.buf) >= 10:
                        n, pos = struct.unpack(">Q", self.buf[2:10])[0], 10
                    header_complete = (b1 & 0x7F) < 126 or pos > 2
                    if header_complete and len(self.buf) >= pos + n:
                        payload = bytes(self.buf[pos : pos + n])
                        del self.buf[: pos + n]
                        return bool(b0 & 0x80), b0 & 0x0F, payload
                if not await self._fill():
                    return None

    async def read_message(self) -> tuple[int, bytes]:
        """The next data message, answering nothing; control frames are returned as is."""
        frame = await self.read_frame()
        assert frame is not None, "connection closed"
        fin, opcode, payload = frame
        assert fin, "the relay does not fragment"
        return opcode, payload

    async def frames(self) -> list[Any]:
        """The msgpack frames of the next binary message (skipping control frames)."""
        while True:
            opcode, payload = await self.read_message()
            if opcode == OP_BINARY:
                return unpack_all(payload)
            assert opcode in (OP_PING, OP_PONG), (opcode, payload)

    async def close_code(self) -> int | None:
        """Read until the server's close frame; return its code (None if empty) and
        check that the server then ends the TCP connection."""
        while True:
            frame = await self.read_frame()
            assert frame is not None, "EOF without a close frame"
            _fin, opcode, payload = frame
            if opcode == OP_CLOSE:
                break
        code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
        # Complete the close handshake if the relay started it (it may have
        # closed already after echoing ours: then this write may fail).
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.stream.send_all(client_frame(OP_CLOSE, payload[:2]))
        # RFC 6455 7.1.1: after the close handshake the server closes TCP first.
        with trio.fail_after(2):
            try:
                while await self.stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
        return code


async def raw_handshake(
    port: int,
    path: str = "/v1",
    *,
    protocols: str | None = "relay.v1",
    extra: list[tuple[str, str]] | None = None,
    key: bytes | None = None,
    version: str = "13",
) -> RawClient:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    key = key if key is not None else base64.b64encode(os.urandom(16))
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key.decode()}",
        f"Sec-WebSocket-Version: {version}",
    ]
    if protocols is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocols}")
    lines += [f"{k}: {v}" for k, v in extra or []]
    await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
    buf = b""
    with trio.fail_after(TIMEOUT):
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some(65536)
            assert data, f"EOF during handshake after {buf!r}"
            buf += data
    head, rest = buf.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    client = RawClient(stream, int(status_line.split()[1]), headers, rest)
    client.key = key  # type: ignore[attr-defined]
    return client


async def open_raw(port: int) -> tuple[RawClient, list[Any]]:
    """An accepted raw connection and its HELLO."""
    client = await raw_handshake(port)
    assert client.status == 101, client.status
    (hello,) = await client.frames()
    assert hello[0] == HELLO
    return client, hello


# ------------------------------------------------------------------- handshake


async def test_handshake_accepted(relay):
    client = await raw_handshake(relay.port)
    async with client.stream:
        assert client.status == 101
        assert client.headers["upgrade"].lower() == "websocket"
        assert "upgrade" in client.headers["connection"].lower()
        expected = base64.b64encode(hashlib.sha1(client.key + GUID).digest()).decode()  # type: ignore[attr-defined]
        assert client.headers["sec-websocket-accept"] == expected
        assert client.headers["sec-websocket-protocol"] == "relay.v1"
        assert "sec-websocket-extensions" not in client.headers
        fin, opcode, payload = await client.read_frame()  # type: ignore[misc]
        assert fin and opcode == OP_BINARY
        (hello,) = unpack_all(payload)
        assert hello[0] == HELLO and hello[1] == 1


async def test_handshake_picks_relay_v1_among_several(relay):
    client = await raw_handshake(relay.port, protocols="chat, relay.v2, relay.v1")
    async with client.stream:
        assert client.status == 101
        assert client.headers["sec-websocket-protocol"] == "relay.v1"


@pytest.mark.parametrize("protocols", [None, "chat", "relay.v2", "relay.v1x", ""])
async def test_handshake_without_subprotocol_is_400(relay, protocols):
    client = await raw_handshake(relay.port, protocols=protocols)
    async with client.stream:
        assert client.status == 400
        assert "sec-websocket-accept" not in client.headers


@pytest.mark.parametrize("path", ["/", "/v2", "/v1/x", "/V1", "/v1/../v1x"])
async def test_handshake_wrong_path_is_404(relay, path):
    client = await raw_handshake(relay.port, path)
    async with client.stream:
        assert client.status == 404


async def test_handshake_query_string_on_v1_is_accepted(relay):
    client = await raw_handshake(relay.port, "/v1?client=test")
    async with client.stream:
        assert client.status == 101


async def test_handshake_bad_key_or_version_refused(relay):
    client = await raw_handshake(relay.port, key=b"not base64 of 16 bytes")
    async with client.stream:
        assert client.status == 400
    client = await raw_handshake(relay.port, version="8")
    async with client.stream:
        # RFC 6455 4.4: refuse, and say which version the server speaks.
        assert client.status == 426 or client.status == 400
        assert client.headers.get("sec-websocket-version") == "13"


async def test_permessage_deflate_is_not_negotiated(relay):
    offer = "permessage-deflate; client_max_window_bits, permessage-deflate"
    client = await raw_handshake(relay.port, extra=[("Sec-WebSocket-Extensions", offer)])
    async with client.stream:
        assert client.status == 101
        assert "sec-websocket-extensions" not in client.headers
        (hello,) = await client.frames()
        # Uncompressed frames work as usual.
        await client.send(
            client_frame(
                OP_BINARY, register_frame("alice", nacl.signing.SigningKey.generate(), hello)
            )
        )
        (ready,) = await client.frames()
        assert ready[0] == READY
        # A "compressed" frame (RSV1) is a protocol error: nothing was negotiated.
        await client.send(client_frame(OP_BINARY, b"\x00\x00", rsv=4))
        assert await client.close_code() == 1002


# ------------------------------------------------------------- framing rules


async def test_unmasked_client_frame_closes_1002(relay):
    client, hello = await open_raw(relay.port)
    async with client.stream:
        frame = register_frame("alice", nacl.signing.SigningKey.generate(), hello)
        await client.send(client_frame(OP_BINARY, frame, masked=False))
        assert await client.close_code() == 1002
    assert relay.store.get_user("alice") is None


@pytest.mark.parametrize("rsv", [1, 2, 4])
async def test_reserved_bits_close_1002(relay, rsv):
    client, _hello = await open_raw(relay.port)
    async with client.stream:
        await client.send(client_frame(OP_BINARY, packb([14, 0]), rsv=rsv))
        assert await client.close_code() == 1002


@pytest.mark.parametrize(
    "frames",
    [
        [client_frame(0x3, b"x")],  # reserved data opcode
        [client_frame(0xB, b"x")],  # reserved control opcode
        [client_frame(OP_CONT, b"x")],  # continuation with nothing to continue
        [client_frame(OP_PING, b"x" * 126)],  # control payload > 125
        [client_frame(OP_PING, b"x", fin=False)],  # fragmented control frame
        [
            client_frame(OP_BINARY, b"\x94", fin=False),
            client_frame(OP_BINARY, b"\x0e\x00"),
        ],  # new message inside one
    ],
    ids=[
        "opcode-3",
        "opcode-B",
        "lone-continuation",
        "long-ping",
        "fragmented-ping",
        "interleaved",
    ],
)
async def test_protocol_violations_close_1002(relay, frames):
    client, _hello = await open_raw(relay.port)
    async with client.stream:
        await client.send(b"".join(frames))
        assert await client.close_code() == 1002


async def test_oversize_header_closes_1009_before_payload(relay):
    client, _hello = await open_raw(relay.port)
    async with client.stream:
        # Only the header of a 2 MiB binary frame: the relay must not wait for the payload.
        size = relay.settings.max_message_bytes * 2
        await client.send(bytes([0x82, 0x80 | 127]) + struct.pack(">Q", size) + os.urandom(4))
        assert await client.close_code() == 1009


async def test_oversize_fragmented_message_closes_1009(relay):
    client, _hello = await open_raw(relay.port)
    async with client.stream:
        half = b"\x00" * (relay.settings.max_message_bytes // 2 + 1)
        await client.send(client_frame(OP_BINARY, half, fin=False))
        await client.send(client_frame(OP_CONT, half, fin=True))
        assert await client.close_code() == 1009


async def test_fragmented_message_reassembled(relay):
    client, hello = await open_raw(relay.port)
    async with client.stream:
        data = register_frame("alice", nacl.signing.SigningKey.generate(), hello)
        a, b = len(data) // 3, 2 * len(data) // 3
        wire = (
            client_frame(OP_BINARY, data[:a], fin=False)
            + client_frame(OP_CONT, data[a:b], fin=False)
            + client_frame(OP_CONT, b"", fin=False)  # empty fragments are legal
            + client_frame(OP_CONT, data[b:], fin=True)
        )
        # Dribbled a few bytes per TCP write, so frames split anywhere.
        for i in range(0, len(wire), 7):
            await client.send(wire[i : i + 7])
            await trio.sleep(0)
        (ready,) = await client.frames()
        assert ready == [READY, "alice", 1, 0]


async def test_control_frame_between_fragments(relay):
    client, hello = await open_raw(relay.port)
    async with client.stream:
        data = register_frame("alice", nacl.signing.SigningKey.generate(), hello)
        await client.send(client_frame(OP_BINARY, data[:10], fin=False))
        await client.send(client_frame(OP_PING, b"between"))
        await client.send(client_frame(OP_PONG, b"unsolicited"))  # must be ignored
        await client.send(client_frame(OP_CONT, data[10:], fin=True))
        seen: list[tuple[int, bytes]] = []
        while not any(op == OP_BINARY for op, _ in seen):
            seen.append(await client.read_message())
        assert (OP_PONG, b"between") in seen
        assert [unpack_all(p) for op, p in seen if op == OP_BINARY] == [[[READY, "alice", 1, 0]]]


async def test_ping_answered_with_same_payload(relay):
    client, _hello = await open_raw(relay.port)
    async with client.stream:
        for payload in (b"", b"x", os.urandom(125)):
            await client.send(client_frame(OP_PING, payload))
            assert await client.read_message() == (OP_PONG, payload)


@pytest.mark.parametrize("code", [1000, 1001, 3000, 4999])
async def test_close_handshake_echo(relay, code):
    client, _hello = await open_raw(relay.port)
    async with client.stream:
        await client.send(client_frame(OP_CLOSE, struct.pack(">H", code) + b"bye"))
        assert await client.close_code() == code


async def test_close_without_code_answered(relay):
    client, _hello = await open_raw(relay.port)
    async with client.stream:
        await client.send(client_frame(OP_CLOSE, b""))
        assert await client.close_code() in (None, 1000)


@pytest.mark.parametrize(
    "payload", [b"\x03", struct.pack(">H", 999), struct.pack(">H", 1005), struct.pack(">H", 1015)]
)
async def test_invalid_close_payload_closes_1002(relay, payload):
    client, _hello = await open_raw(relay.port)
    async with client.stream:
        await client.send(client_frame(OP_CLOSE, payload))
        assert await client.close_code() == 1002


async def test_text_frame_closes_1003(relay):
    client, _hello = await open_raw(relay.port)
    async with client.stream:
        await client.send(client_frame(OP_TEXT, b'{"type": "hello"}'))
        assert await client.close_code() == 1003


async def test_handshake_and_first_frames_in_one_write(relay):
    """Bytes that follow the HTTP request in the same segment are WebSocket frames."""
    stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
    async with stream:
        key = base64.b64encode(os.urandom(16))
        request = (
            b"GET /v1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Protocol: relay.v1\r\n\r\n"
        )
        await stream.send_all(request + client_frame(OP_PING, b"early"))
        buf = b""
        with trio.fail_after(TIMEOUT):
            while b"\r\n\r\n" not in buf:
                buf += await stream.receive_some(65536)
        head, rest = buf.split(b"\r\n\r\n", 1)
        client = RawClient(stream, int(head.split()[1]), {}, rest)
        assert client.status == 101
        seen = [await client.read_message(), await client.read_message()]
        assert (OP_PONG, b"early") in seen
        assert any(op == OP_BINARY and unpack_all(p)[0][0] == HELLO for op, p in seen)


# ---------------------------------------------------------- interoperability


async def test_trio_websocket_client(relay):
    alice_key, bob_key = nacl.signing.SigningKey.generate(), nacl.signing.SigningKey.generate()
    async with (
        open_websocket_url(relay.url, subprotocols=["relay.v1"], max_message_size=CLIENT_MAX) as a,
        open_websocket_url(relay.url, subprotocols=["relay.v1"], max_message_size=CLIENT_MAX) as b,
    ):
        assert a.subprotocol == "relay.v1"
        (hello_a,) = unpack_all(await a.get_message())
        (hello_b,) = unpack_all(await b.get_message())
        await a.send_message(register_frame("alice", alice_key, hello_a))
        await b.send_message(register_frame("bob", bob_key, hello_b))
        assert unpack_all(await a.get_message()) == [[READY, "alice", 1, 0]]
        assert unpack_all(await b.get_message()) == [[READY, "bob", 1, 0]]
        msg_id = os.urandom(16)
        await a.send_message(packb([SEND, msg_id, "bob", {1: b"over trio-websocket"}]))
        (sent,) = unpack_all(await a.get_message())
        assert sent[:2] == [SENT, msg_id]
        (msg,) = unpack_all(await b.get_message())
        assert (
            msg[0] == MSG and msg[2:5] == [msg_id, "alice", 1] and msg[7] == b"over trio-websocket"
        )
        await b.send_message(packb([ACK, msg[1]]))
        (receipt,) = unpack_all(await a.get_message())
        assert receipt[0] == RECEIPT and receipt[2:6] == [msg_id, "bob", 1, 1]
        with trio.fail_after(TIMEOUT):
            await a.ping(b"still there")
        await a.aclose(code=1000)
        assert a.closed is not None and a.closed.code == 1000


def websockets_sync_session(url: str) -> dict[str, Any]:
    """Two users over the websockets sync client: register, send, receive, ack."""
    out: dict[str, Any] = {}
    alice_key, bob_key = nacl.signing.SigningKey.generate(), nacl.signing.SigningKey.generate()
    with (
        websockets.sync.client.connect(
            url, subprotocols=["relay.v1"], max_size=CLIENT_MAX, open_timeout=TIMEOUT
        ) as a,
        websockets.sync.client.connect(
            url, subprotocols=["relay.v1"], max_size=CLIENT_MAX, open_timeout=TIMEOUT
        ) as b,
    ):
        out["subprotocol"] = a.subprotocol
        out["extensions"] = a.response.headers.get("Sec-WebSocket-Extensions")
        (hello_a,) = unpack_all(a.recv(timeout=TIMEOUT))
        (hello_b,) = unpack_all(b.recv(timeout=TIMEOUT))
        a.send(register_frame("alice", alice_key, hello_a))
        b.send(register_frame("bob", bob_key, hello_b))
        out["ready"] = [unpack_all(a.recv(timeout=TIMEOUT)), unpack_all(b.recv(timeout=TIMEOUT))]
        msg_id = os.urandom(16)
        out["msg_id"] = msg_id
        a.send(packb([SEND, msg_id, "bob", {1: b"over websockets"}]))
        out["sent"] = unpack_all(a.recv(timeout=TIMEOUT))
        out["msg"] = unpack_all(b.recv(timeout=TIMEOUT))
        b.send(packb([ACK, out["msg"][0][1]]))
        out["receipt"] = unpack_all(a.recv(timeout=TIMEOUT))
        out["pong"] = a.ping(b"hi").wait(TIMEOUT)
        a.close(code=1000, reason="bye")
        out["close_rcvd"] = a.close_code
    return out


async def test_websockets_sync_client(relay):
    out = await trio.to_thread.run_sync(websockets_sync_session, relay.url)
    assert out["subprotocol"] == "relay.v1"
    assert out["extensions"] is None, (
        "the websockets client offers permessage-deflate; it must be declined"
    )
    assert out["ready"] == [[[READY, "alice", 1, 0]], [[READY, "bob", 1, 0]]]
    msg_id = out["msg_id"]
    assert out["sent"][0][:2] == [SENT, msg_id]
    (msg,) = out["msg"]
    assert msg[0] == MSG and msg[2:5] == [msg_id, "alice", 1] and msg[7] == b"over websockets"
    (receipt,) = out["receipt"]
    assert receipt[0] == RECEIPT and receipt[2:6] == [msg_id, "bob", 1, 1]
    assert out["pong"] is True
    assert out["close_rcvd"] == 1000


async def _asyncio_alice(url: str, key: nacl.signing.SigningKey, bob_ready: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with websockets.asyncio.client.connect(
        url, subprotocols=["relay.v1"], max_size=CLIENT_MAX
    ) as ws:
        (hello,) = unpack_all(await ws.recv())
        await ws.send(auth_frame("alice", key, hello))
        out["ready"] = unpack_all(await ws.recv())
        bob_ready()  # wait until bob (on trio-websocket) is online
        msg_id = os.urandom(16)
        out["msg_id"] = msg_id
        await ws.send(packb([SEND, msg_id, "bob", {1: b"from asyncio websockets"}]))
        # SENT, then bob's reply and the receipt of our message, in any order.
        frames: list[Any] = []
        async with asyncio.timeout(TIMEOUT):
            while len(frames) < 3:
                frames.extend(unpack_all(await ws.recv()))
        out["frames"] = frames
        reply = next(f for f in frames if f[0] == MSG)
        await ws.send(packb([ACK, reply[1]]))
    return out


async def test_websockets_asyncio_client_talks_to_trio_websocket_client(relay):
    alice, bob = User("alice"), User("bob")
    await alice.register(relay.url)
    await bob.register(relay.url)
    bob_online = trio.Event()
    result: dict[str, Any] = {}

    def wait_for_bob() -> None:
        trio.from_thread.run(bob_online.wait)

    async def run_alice() -> None:
        result.update(
            await trio.to_thread.run_sync(
                lambda: asyncio.run(_asyncio_alice(relay.url, alice.key, wait_for_bob))
            )
        )

    async with bob.online(relay.url) as b, trio.open_nursery() as nursery:
        nursery.start_soon(run_alice)
        bob_online.set()
        msg = await b.recv()
        assert msg[0] == MSG and msg[3] == "alice" and msg[7] == b"from asyncio websockets"
        await b.send([ACK, msg[1]])
        reply_id = await b.send_msg("alice", {1: b"from trio-websocket"})
        assert (await b.recv_type(SENT))[1] == reply_id
    assert result["ready"] == [[READY, "alice", 1, 0]]
    kinds = sorted(f[0] for f in result["frames"])
    assert kinds == [SENT, MSG, RECEIPT]
    reply = next(f for f in result["frames"] if f[0] == MSG)
    assert reply[2:5] == [reply_id, "bob", 1] and reply[7] == b"from trio-websocket"
    receipt = next(f for f in result["frames"] if f[0] == RECEIPT)
    assert receipt[2:6] == [result["msg_id"], "bob", 1, 1]
    # alice's ACK of the reply reached the relay: bob gets the receipt.
    async with bob.online(relay.url) as b:
        receipt = await b.recv_type(RECEIPT)
        assert receipt[2:6] == [reply_id, "alice", 1, 1]


async def test_trio_websocket_sees_server_close_code(relay):
    """A client library reports the relay's close codes (here 1008 after a bad AUTH)."""
    async with connect(relay.url) as c:
        await c.send([1, "nobody", 1, b"\0" * 64])
        err = await c.recv()
        assert err[0] == 4 and err[2] == 401
        assert await c.closed() == 1008
