"""Property tests: bad input never crashes the relay nor touches stored data.

Network properties run against one relay per test function (per fast path):
the async test starts the relay (the ``relay`` fixture), then runs a
hypothesis-decorated *sync* function in a worker thread, and each example
drives the relay back on the trio loop with ``trio.from_thread.run``. So the
relay, its store and its memory carry over from one example to the next, as
they would in production. Runs are derandomized (the same examples every
run) and kept to ~60 examples each.

After the examples every network test checks the relay is healthy: nothing
was logged as a crash, an offline message stored before the fuzzing is
delivered intact, and a fresh well-behaved session works end to end.

The pure-unit properties feed random msgpack objects and bytes straight to
``relay.protocol.frames.parse_frame`` and ``Session.receive_message``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import nacl.signing
import psutil
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from relay.errors import FrameError
from relay.protocol import frames
from relay.protocol.session import Session, SessionState
from tests.wire import User, WireClient, connect, packb, unpack_all

HELLO, AUTH, REGISTER, READY, ERROR = 0, 1, 2, 3, 4
SEND, SEND_GROUP, SENT, MSG, ACK, RECEIPT, READ = 10, 11, 12, 13, 14, 15, 16
REQ, RES, EVENT, SIGNAL, SIGNALED = 20, 21, 22, 30, 31
CLIENT_TYPES = (AUTH, REGISTER, SEND, SEND_GROUP, ACK, READ, REQ, SIGNAL)
SERVER_TYPES = {ERROR, RES, SENT, MSG, RECEIPT, EVENT, SIGNALED}
ERROR_CODES = {400, 401, 403, 404, 409, 413, 429, 503}  # 500 would be a relay bug
SENTINEL = 2**40 + 7
GROUP_ID = "g." + "B" * 22
EXAMPLES = 60

NETWORK = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
UNIT = settings(max_examples=150, deadline=None, derandomize=True, database=None)


# ------------------------------------------------------------------ harness


async def run_property(prop: Callable[[], None]) -> None:
    """Run a ``@given`` sync function in a worker thread (it calls back into trio)."""
    await trio.to_thread.run_sync(prop)


def on_trio(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    return trio.from_thread.run(fn, *args)


class Fixture:
    """The users of a fuzzing run and the message that must survive it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.alice, self.bob, self.fuzz, self.sink = (
            User(n) for n in ("alice", "bob", "fuzz", "sink")
        )
        self.precious_id = os.urandom(16)
        self.precious_ts: int | None = None

    async def setup(self) -> None:
        for user in (self.alice, self.bob, self.fuzz, self.sink):
            await user.register(self.url)
        async with self.alice.online(self.url) as a:
            await a.send_msg("bob", {1: b"precious \x00\xff payload"}, self.precious_id)
            sent = await a.recv()
            assert sent[:2] == [SENT, self.precious_id]
            self.precious_ts = sent[2]

    async def assert_healthy(self, relay: Any, caplog: pytest.LogCaptureFixture) -> None:
        crashes = [
            r for r in caplog.records if r.name.startswith("relay") and r.levelno >= logging.ERROR
        ]
        assert not crashes, "\n".join(r.getMessage() + "\n" + (r.exc_text or "") for r in crashes)
        # The offline message stored before the fuzzing is intact and alone.
        async with self.bob.online(self.url) as b:
            assert b.ready == [READY, "bob", 1, 1]
            msg = await b.recv()
            assert msg == [
                MSG,
                1,
                self.precious_id,
                "alice",
                1,
                None,
                self.precious_ts,
                b"precious \x00\xff payload",
            ]
            await b.send([ACK, 1])
            # A fresh session works end to end.
            async with self.alice.online(self.url) as a:
                msg_id = await a.send_msg("bob", {1: b"after the storm"})
                live = await b.recv_type(MSG)
                assert live[2] == msg_id and live[7] == b"after the storm"
                await b.send([ACK, live[1]])
                # alice: SENT, and the receipts of both messages (in any order).
                seen: list[Any] = []
                while len(seen) < 3:
                    frame = await a.recv()
                    assert frame[0] in (SENT, RECEIPT), frame
                    seen.append(frame)
                assert [f[1] for f in seen if f[0] == SENT] == [msg_id]
                assert sorted(f[2] for f in seen if f[0] == RECEIPT) == sorted(
                    [self.precious_id, msg_id]
                )
        assert relay.store.get_user("alice") is not None and relay.store.get_user("bob") is not None


async def exchange(
    client: WireClient, data: bytes, user: str = "fuzz"
) -> tuple[list[Any], int | None]:
    """Send ``data`` as one binary message, then a sentinel REQ.

    Returns the frames that came before the sentinel's RES and None, or,
    when the relay closed the connection, every frame received and the close
    code.
    """
    received = list(client.buffer)
    client.buffer.clear()
    with trio.fail_after(10):
        try:
            await client.ws.send_message(data)
            await client.ws.send_message(packb([REQ, SENTINEL, "devices.list", {"user": user}]))
            while True:
                for frame in unpack_all(await client.ws.get_message()):
                    if frame[:2] == [RES, SENTINEL]:
                        assert frame[2] is True, frame
                        return received, None
                    received.append(frame)
        except ConnectionClosed as exc:
            return received, exc.reason.code


def check_answers(received: list[Any]) -> list[list[Any]]:
    """Every frame the relay sent is a well-formed server frame; return the ERRORs."""
    errors = []
    for frame in received:
        assert type(frame) is list and frame and frame[0] in SERVER_TYPES, frame
        if frame[0] == ERROR:
            assert len(frame) == 4 and frame[2] in ERROR_CODES and isinstance(frame[3], str), frame
            errors.append(frame)
    return errors


def must_error(data: bytes) -> bool:
    """An independent oracle: does ``data`` contain something that is surely not a client frame?"""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(data)
    try:
        objs = list(unpacker)
    except Exception:  # noqa: BLE001 - any decoding failure is an error to report
        return True
    if unpacker.tell() != len(data):
        return True
    return any(
        not (type(o) is list and o and type(o[0]) is int and o[0] in CLIENT_TYPES) for o in objs
    )


# ------------------------------------------------------------- strategies


leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=40),
)
msgpack_objects = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(
            st.one_of(st.integers(-5, 300), st.text(max_size=8), st.binary(max_size=8)),
            inner,
            max_size=5,
        ),
    ),
    max_leaves=20,
)
frame_like = st.builds(
    lambda t, rest: [t, *rest],
    st.sampled_from([*CLIENT_TYPES, 0, 3, 4, 12, 99, -1, 2**40]),
    st.lists(msgpack_objects, max_size=6),
)


def packed(objs: list[Any]) -> bytes:
    return b"".join(packb(o) for o in objs)


garbage = st.one_of(
    st.binary(max_size=600),
    st.lists(st.one_of(msgpack_objects, frame_like), min_size=1, max_size=8).map(packed),
    st.tuples(st.lists(frame_like, max_size=3).map(packed), st.binary(min_size=1, max_size=40)).map(
        lambda t: t[0] + t[1]
    ),
)


def valid_frames() -> list[list[Any]]:
    """One valid frame per client type, touching only the ``fuzz`` and ``sink`` users."""
    key = nacl.signing.SigningKey.generate()
    return [
        [SEND, os.urandom(16), "sink", {1: b"payload"}],
        [SEND_GROUP, os.urandom(16), GROUP_ID, b"payload"],
        [ACK, 0],
        [READ, "sink", [os.urandom(16)]],
        [REQ, 5, "devices.list", {"user": "sink"}],
        [SIGNAL, "sink", "typing"],
        [AUTH, "fuzz", 1, os.urandom(64)],
        [REGISTER, "fuzz2", bytes(key.verify_key), os.urandom(64), None],
    ]


TEMPLATES = [packb(f) for f in valid_frames()]


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    data = bytearray(draw(st.sampled_from(TEMPLATES)))
    kind = draw(st.sampled_from(["truncate", "flip", "splice"]))
    if kind == "truncate":
        return kind, bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        return kind, bytes(data)
    i = draw(st.integers(0, len(data)))
    j = draw(st.integers(i, min(len(data), i + 8)))
    return kind, bytes(data[:i] + draw(st.binary(max_size=8)) + data[j:])


# Field kinds of every client frame (index 1..): what a right value's type is.
FIELD_KINDS: dict[int, list[str]] = {
    AUTH: ["str", "int", "bin"],
    REGISTER: ["str", "bin", "bin", "str?"],
    SEND: ["bin", "str", "map"],
    SEND_GROUP: ["bin", "str", "bin"],
    ACK: ["int"],
    READ: ["str", "list"],
    REQ: ["int", "str", "map"],
    SIGNAL: ["str", "str"],
}
TEMPLATE_BY_TYPE = {f[0]: f for f in valid_frames()}


def wrong_for(kind: str, value: Any) -> bool:
    ok = {
        "str": type(value) is str,
        "str?": value is None or type(value) is str,
        "int": type(value) is int,
        "bin": type(value) is bytes,
        "map": type(value) is dict,
        "list": type(value) is list,
    }[kind]
    return not ok


@st.composite
def wrong_typed(draw: st.DrawFn, types: tuple[int, ...]) -> tuple[list[Any], int]:
    """A valid frame of one of ``types`` with one field of a wrong type, or a
    container field holding a wrong-typed element. Returns (frame, index)."""
    ftype = draw(st.sampled_from(types))
    frame = list(TEMPLATE_BY_TYPE[ftype])
    index = draw(st.integers(1, len(frame) - 1))
    kind = FIELD_KINDS[ftype][index - 1]
    nested = (
        draw(st.booleans()) and kind in ("map", "list") and not (ftype == REQ and kind == "map")
    )
    if nested and kind == "map":  # SEND payloads: a wrong key or a wrong value
        bad = draw(msgpack_objects.filter(lambda v: type(v) is not bytes))
        bad_key = draw(
            st.one_of(
                st.text(max_size=5), st.binary(max_size=5), st.booleans(), st.integers(256, 2**40)
            )
        )
        frame[index] = draw(st.sampled_from([{1: bad}, {bad_key: b"x"}]))
    elif nested:  # READ msg_ids: an element that is not bin16
        frame[index] = [
            draw(msgpack_objects.filter(lambda v: not (type(v) is bytes and len(v) == 16)))
        ]
    else:
        frame[index] = draw(msgpack_objects.filter(lambda v: wrong_for(kind, v)))
    return frame, index


huge_headers = [
    b"\xdd\xff\xff\xff\xff",  # array32 of 2**32-1 elements
    b"\xdf\xff\xff\xff\xff",  # map32
    b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB
    b"\xdb\xff\xff\xff\xff",  # str32
    b"\xc9\xff\xff\xff\xff\x01",  # ext32
    b"\xdc\xff\xff",  # array16 with no elements present
    b"\xde\xff\xff",  # map16
    b"\x94\x0a\xc4\x10"
    + b"\x01" * 16
    + b"\xa4sink\xdf\xff\xff\xff\xff",  # SEND whose payload map claims 2**32 entries
    b"\x93\x10\xa4sink\xdd\x00\x01\x00\x00",  # READ with 65536 ids declared, none present
    b"\xc7\xff\x05" + b"\x00" * 10,  # ext8 claiming 255 bytes
]


# ----------------------------------------------------- network properties


async def test_random_bytes_after_auth(relay, caplog):
    fx = Fixture(relay.url)
    await fx.setup()

    async def one(data: bytes) -> None:
        async with fx.fuzz.online(relay.url) as c:
            received, code = await exchange(c, data)
        errors = check_answers(received)
        if code is not None:
            assert code == 1008, (code, received)
            assert errors, "the relay closed without saying why"
        elif must_error(data):
            assert errors, f"no ERROR for {data!r}: {received}"

    @NETWORK
    @given(garbage)
    def prop(data: bytes) -> None:
        on_trio(one, data)

    await run_property(prop)
    await fx.assert_healthy(relay, caplog)


async def test_truncated_and_mutated_valid_frames(relay, caplog):
    fx = Fixture(relay.url)
    await fx.setup()

    async def one(kind: str, data: bytes) -> None:
        async with fx.fuzz.online(relay.url) as c:
            received, code = await exchange(c, data)
        errors = check_answers(received)
        if kind == "truncate" and data:
            # A strict prefix of a msgpack array never decodes: ERROR 400, connection kept.
            assert code is None, (data, received)
            assert [e[1:3] for e in errors] == [[None, 400]], (data, received)
        if code is not None:
            assert code == 1008 and errors, (code, received)

    @NETWORK
    @given(mutated())
    def prop(example: tuple[str, bytes]) -> None:
        on_trio(one, *example)

    await run_property(prop)
    await fx.assert_healthy(relay, caplog)


async def test_wrong_field_types_after_ready(relay, caplog):
    fx = Fixture(relay.url)
    await fx.setup()

    async def one(frame: list[Any], index: int) -> None:
        async with fx.fuzz.online(relay.url) as c:
            received, code = await exchange(c, packb(frame))
        assert code is None, (frame, received)
        (answer,) = received
        ftype = frame[0]
        if ftype == REQ and index != 1:
            # A readable req_id: RES ok=false 400.
            assert answer[:3] == [RES, frame[1], False] and answer[3]["code"] == 400, (
                frame,
                answer,
            )
            return
        assert answer[0] == ERROR and answer[2] == 400, (frame, answer)
        if ftype in (SEND, SEND_GROUP) and index != 1:
            assert answer[1] == frame[1], "ERROR ref is the msg_id when it is readable"
        else:
            assert answer[1] == ftype, (frame, answer)

    @NETWORK
    @given(wrong_typed((SEND, SEND_GROUP, ACK, READ, REQ, SIGNAL)))
    def prop(example: tuple[list[Any], int]) -> None:
        on_trio(one, *example)

    await run_property(prop)
    await fx.assert_healthy(relay, caplog)


async def test_wrong_field_types_in_auth_and_register(relay, caplog):
    fx = Fixture(relay.url)
    await fx.setup()

    async def one(frame: list[Any], index: int) -> None:
        async with connect(relay.url) as c:
            await c.send(frame)
            answer = await c.recv()
            assert answer[0] == ERROR and answer[1] == frame[0] and answer[2] == 400, (
                frame,
                answer,
            )
            assert await c.closed() == 1008

    @NETWORK
    @given(wrong_typed((AUTH, REGISTER)))
    def prop(example: tuple[list[Any], int]) -> None:
        on_trio(one, *example)

    await run_property(prop)
    assert relay.store.get_user("fuzz2") is None
    await fx.assert_healthy(relay, caplog)


async def test_huge_declared_sizes(relay, caplog):
    fx = Fixture(relay.url)
    await fx.setup()
    process = psutil.Process()
    rss_before = process.memory_info().rss

    async def one(prefix: list[Any], header: bytes, suffix: bytes) -> None:
        async with fx.fuzz.online(relay.url) as c:
            received, code = await exchange(c, packed(prefix) + header + suffix)
        assert code is None, received
        errors = check_answers(received)
        assert errors and all(e[2] == 400 for e in errors), received
        # The valid frames before the bad one were served.
        answered = {f[1] for f in received if f[0] == RES}
        assert answered == {f[1] for f in prefix}, (prefix, received)

    @NETWORK
    @given(
        st.lists(
            st.builds(lambda i: [REQ, i, "devices.list", {"user": "sink"}], st.integers(0, 1000)),
            max_size=3,
            unique_by=lambda f: f[1],
        ),
        st.sampled_from(huge_headers),
        st.binary(max_size=64),
    )
    def prop(prefix: list[Any], header: bytes, suffix: bytes) -> None:
        on_trio(one, prefix, header, suffix)

    await run_property(prop)
    growth = process.memory_info().rss - rss_before
    assert growth < 200 << 20, f"RSS grew by {growth >> 20} MiB: a declared size was believed"
    await fx.assert_healthy(relay, caplog)


async def test_random_bytes_before_handshake(relay, caplog):
    fx = Fixture(relay.url)
    await fx.setup()

    async def one(data: bytes) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
        response = b""
        async with stream:
            with trio.fail_after(10):
                try:
                    await stream.send_all(data)
                    await stream.send_eof()
                    while chunk := await stream.receive_some(65536):
                        response += chunk
                except trio.BrokenResourceError:
                    pass  # reset by the relay after it answered: fine
        if response:
            assert response.startswith(b"HTTP/1.1 "), response[:100]
            status = int(response.split()[1])
            assert 400 <= status < 500, response[:200]

    http_like = st.builds(
        lambda head, junk: head + junk,
        st.sampled_from(
            [
                b"GET /v1 HTTP/1.1\r\n",
                b"GET /v1 HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
                b"POST /v1/media HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello start
                b"",
            ]
        ),
        st.binary(max_size=300),
    )

    @NETWORK
    @given(st.one_of(st.binary(max_size=600), http_like))
    def prop(data: bytes) -> None:
        on_trio(one, data)

    await run_property(prop)
    await one(os.urandom(20_000))  # more than the request size limit
    await one(b"GET /v1 HTTP/1.1\r\nX: " + b"a" * 20_000)
    await fx.assert_healthy(relay, caplog)


# ------------------------------------------------------- pure-unit properties


def roundtrip(obj: Any) -> Any:
    """What the relay sees: the object after msgpack encoding and decoding."""
    return msgpack.unpackb(packb(obj), raw=False, strict_map_key=False)


EVENT_TYPES = (
    frames.Auth,
    frames.Register,
    frames.Send,
    frames.SendGroup,
    frames.Ack,
    frames.Read,
    frames.Request,
    frames.Signal,
)


def check_frame_error(error: FrameError) -> None:
    assert error.code == 400 and isinstance(error.reason, str)
    assert (
        error.ref is None
        or type(error.ref) is int
        or (type(error.ref) is bytes and len(error.ref) == 16)
    )


@UNIT
@given(st.one_of(msgpack_objects, frame_like))
def test_parse_frame_returns_event_or_frame_error(obj):
    obj = roundtrip(obj)
    try:
        event = frames.parse_frame(obj)
    except FrameError as error:
        check_frame_error(error)
        return
    assert isinstance(event, EVENT_TYPES)
    assert type(obj) is list and obj[0] in CLIENT_TYPES


@UNIT
@given(wrong_typed(CLIENT_TYPES))
def test_parse_frame_rejects_every_wrong_field_type(example):
    frame, _index = example
    with pytest.raises(FrameError) as info:
        frames.parse_frame(roundtrip(frame))
    check_frame_error(info.value)


def check_session_output(session: Session, out: list[Any], ready: bool) -> None:
    for i, item in enumerate(out):
        assert isinstance(item, (FrameError, *EVENT_TYPES)), item
        if isinstance(item, FrameError):
            assert item.code in ERROR_CODES
            if item.close is not None:
                assert i == len(out) - 1, "nothing is served after a closing error"
                assert session.state is SessionState.CLOSED
        elif ready:
            assert not isinstance(item, (frames.Auth, frames.Register)), (
                "AUTH after READY is an error"
            )
        else:
            assert isinstance(item, (frames.Auth, frames.Register)), (
                "only AUTH/REGISTER before READY"
            )


@UNIT
@given(st.one_of(garbage, st.binary(max_size=2000)), st.booleans())
def test_session_receive_message_never_raises(data, ready):
    session = Session()
    if ready:
        session.authenticated("fuzz", 1)
    out = session.receive_message(data)
    check_session_output(session, out, ready)
    if session.state is SessionState.CLOSED:
        assert session.receive_message(data) == []


@settings(UNIT, max_examples=80)
@given(st.lists(st.one_of(msgpack_objects, frame_like), min_size=1, max_size=12), st.booleans())
def test_session_answers_every_frame(objs, ready):
    """One item per frame (until a closing error), each frame judged on its own."""
    session = Session()
    if ready:
        session.authenticated("fuzz", 1)
    out = session.receive_message(packed(objs))
    check_session_output(session, out, ready)
    if session.state is not SessionState.CLOSED:
        assert len(out) == len(objs)


def _same_unpack(session: Session, data: bytes) -> None:
    limits = (session.max_frames_per_message, session.max_message_size)
    fast_objs, fast_error = frames.unpack_frames(data, *limits)
    objs, error = frames.unpack_frames_stream(data, *limits)
    assert fast_objs == objs
    if error is None:
        assert fast_error is None
    else:
        assert fast_error is not None
        assert (fast_error.code, fast_error.reason, fast_error.malformed) == (error.code, error.reason, error.malformed)


@UNIT
@given(st.one_of(garbage, st.binary(max_size=2000)))
def test_single_frame_shortcut_matches_general_unpack_on_garbage(data):
    """The one-frame unpackb shortcut decodes exactly what the Unpacker path does."""
    _same_unpack(Session(), data)


@settings(UNIT, max_examples=80)
@given(st.lists(st.one_of(msgpack_objects, frame_like), min_size=1, max_size=4), st.integers(min_value=0, max_value=3))
def test_single_frame_shortcut_matches_general_unpack_on_frames(objs, cut):
    """Same objects and errors for one frame, several, and truncated ones."""
    data = packed(objs)
    _same_unpack(Session(), data)
    if cut and len(data) > cut:
        _same_unpack(Session(), data[:-cut])


@UNIT
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=30))
def test_session_malformed_budget(messages):
    """Closed exactly when the 17th malformed frame arrives (or a bad AUTH/REGISTER)."""
    session = Session()
    session.authenticated("fuzz", 1)
    malformed = 0
    for data in messages:
        out = session.receive_message(data)
        check_session_output(session, out, True)
        malformed += sum(1 for item in out if isinstance(item, FrameError) and item.malformed)
        if malformed > 16:
            assert session.state is SessionState.CLOSED and out[-1].close == 1008
        if session.state is SessionState.CLOSED:
            assert malformed > 16 or out[-1].ref in (AUTH, REGISTER), out
            return


def test_session_huge_declared_sizes():
    for header in huge_headers:
        session = Session()
        session.authenticated("fuzz", 1)
        out = session.receive_message(header)
        assert len(out) == 1 and isinstance(out[0], FrameError) and out[0].code == 400, (
            header,
            out,
        )
