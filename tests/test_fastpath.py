"""One suite for both fast path twins: ``relay._fastpath_py`` and ``relay._fastpath``.

Every test taking ``fp`` runs once per implementation. The compiled one must
be built (``python3 -m pip install -e .``): if it is missing its tests
FAIL, unless ``RELAY_NO_EXT=1`` says the build was skipped on purpose. The
differential tests at the end check that both give identical results (or the
same close code and reason) on random input.
"""

from __future__ import annotations

import struct
from types import ModuleType

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import _fastpath_py
from relay.fastpath import load
from relay.protocol import frames
from relay.protocol.session import Session
from tests.twins import load_twin_or_fail

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
MASK = b"\x37\xfa\x21\x3d"  # the RFC 6455 section 5.7 example key

FAST = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _load(name: str) -> ModuleType:
    return load_twin_or_fail(load, name, "relay._fastpath")


@pytest.fixture(params=["pure", "cython"], scope="module")
def fp(request: pytest.FixtureRequest) -> ModuleType:
    return _load(request.param)


@pytest.fixture(scope="module")
def both() -> tuple[ModuleType, ModuleType]:
    return _load("pure"), _load("cython")


# ------------------------------------------------------------------ helpers


def naive_mask(data: bytes, mask: bytes) -> bytes:
    return bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def raw_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = MASK,
    width: int | None = None,
    length: int | None = None,
) -> bytes:
    """A frame built by hand, able to break every rule: ``width`` 7/16/64 forces
    the length encoding, ``length`` lies about the payload size."""
    n = len(payload) if length is None else length
    if width is None:
        width = 7 if n < 126 else 16 if n < 65536 else 64
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    mbit = 0x80 if mask is not None else 0
    if width == 7:
        head = bytes((b0, mbit | n))
    elif width == 16:
        head = bytes((b0, mbit | 126)) + struct.pack(">H", n)
    else:
        head = bytes((b0, mbit | 127)) + struct.pack(">Q", n)
    if mask is None:
        return head + payload
    return head + mask + naive_mask(payload, mask)


def feed_all(parser, chunks) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    for chunk in chunks:
        out.extend(parser.feed(chunk))
    return out


def outcome(mod: ModuleType, chunks, max_size: int = 1000, require_mask: bool = True):
    """What feeding ``chunks`` gives: the messages and bytes held, or the error."""
    parser = mod.FrameParser(max_size, require_mask=require_mask)
    out: list[tuple[int, bytes]] = []
    try:
        for chunk in chunks:
            out.extend(parser.feed(chunk))
    except mod.WebSocketError as exc:
        return ("error", exc.close_code, exc.reason, out)
    return ("ok", out, parser.buffered())


def per_chunk(mod: ModuleType, chunks, max_size=1000, require_mask: bool = True):
    """What each feed gives, carrying on after errors (a twin must match even the
    state an error leaves behind)."""
    parser = mod.FrameParser(max_size, require_mask=require_mask)
    results = []
    for chunk in chunks:
        try:
            results.append(("ok", parser.feed(chunk), parser.buffered()))
        except mod.WebSocketError as exc:
            results.append(("error", exc.close_code, exc.reason, parser.buffered()))
    return results


def expect_error(fp, data: bytes, code: int, reason: str, **kw) -> None:
    parser = fp.FrameParser(kw.pop("max_size", 1000), **kw)
    with pytest.raises(fp.WebSocketError) as info:
        parser.feed(data)
    assert info.value.close_code == code
    assert info.value.reason == reason
    assert str(info.value) == reason


# ------------------------------------------------------------------ module surface


def test_surface(fp):
    assert fp.IMPLEMENTATION in ("pure", "cython")
    # One exception class and one set of constants shared by both twins.
    assert fp.WebSocketError is _fastpath_py.WebSocketError
    for name in (
        "OP_CONTINUATION",
        "OP_TEXT",
        "OP_BINARY",
        "OP_CLOSE",
        "OP_PING",
        "OP_PONG",
        "CLOSE_PROTOCOL_ERROR",
        "CLOSE_TOO_BIG",
    ):
        assert getattr(fp, name) == getattr(_fastpath_py, name)
    parser = fp.FrameParser(4096)
    assert parser.max_message_size == 4096
    assert parser.require_mask is True
    parser = fp.FrameParser(max_message_size=10, require_mask=False)
    assert parser.max_message_size == 10
    assert parser.require_mask is False
    assert parser.buffered() == 0
    assert parser.feed(b"") == []


def test_attributes_are_settings(fp):
    # require_mask is a truth value (a truthy non-bool used to reject every frame)
    for flag in (1, "yes"):
        parser = fp.FrameParser(10, require_mask=flag)
        assert parser.require_mask is True
        assert parser.feed(raw_frame(OP_BINARY, b"ok")) == [(OP_BINARY, b"ok")]
    # a new max_message_size applies to the next frame
    parser = fp.FrameParser(10)
    parser.max_message_size = 2
    assert parser.max_message_size == 2
    with pytest.raises(fp.WebSocketError, match="message too big"):
        parser.feed(raw_frame(OP_BINARY, b"abc"))


def test_implementation_names():
    assert _load("pure").IMPLEMENTATION == "pure"
    assert _load("cython").IMPLEMENTATION == "cython"


# ------------------------------------------------------------------ masking


def test_apply_mask_matches_naive_and_round_trips(fp):
    data = bytes(range(256)) * 3
    for n in [*range(0, 70), 255, 256, 767, 768]:
        chunk = data[:n]
        masked = fp.apply_mask(chunk, MASK)
        assert type(masked) is bytes
        assert masked == naive_mask(chunk, MASK)
        assert fp.apply_mask(masked, MASK) == chunk


def test_apply_mask_rfc_example(fp):
    assert fp.apply_mask(b"Hello", MASK) == bytes.fromhex("7f9f4d5158")


def test_apply_mask_accepts_bytes_like(fp):
    expected = naive_mask(b"abcdefghij", b"wxyz")
    assert fp.apply_mask(bytearray(b"abcdefghij"), b"wxyz") == expected
    assert fp.apply_mask(memoryview(b"abcdefghij"), memoryview(b"wxyz")) == expected
    assert fp.apply_mask(b"abcdefghij", bytearray(b"wxyz")) == expected


@pytest.mark.parametrize("mask", [b"", b"abc", b"abcde"])
def test_apply_mask_rejects_bad_mask(fp, mask):
    with pytest.raises(ValueError, match="mask must be 4 bytes"):
        fp.apply_mask(b"data", mask)
    with pytest.raises(ValueError, match="mask must be 4 bytes"):
        fp.apply_mask(b"", mask)
    with pytest.raises(ValueError, match="mask must be 4 bytes"):
        fp.encode_frame(OP_BINARY, b"data", mask)


# ------------------------------------------------------------------ encode_frame


def test_encode_frame_rfc_examples(fp):
    assert fp.encode_frame(OP_TEXT, b"Hello") == bytes.fromhex("810548656c6c6f")
    assert fp.encode_frame(OP_TEXT, b"Hello", MASK) == bytes.fromhex("818537fa213d7f9f4d5158")
    assert fp.encode_frame(OP_TEXT, b"Hel", fin=False) == bytes.fromhex("010348656c")
    assert fp.encode_frame(OP_CONT, b"lo") == bytes.fromhex("80026c6f")
    assert fp.encode_frame(OP_PING, b"Hello") == bytes.fromhex("890548656c6c6f")
    assert fp.encode_frame(OP_PONG, b"Hello", MASK) == bytes.fromhex("8a8537fa213d7f9f4d5158")
    assert fp.encode_frame(OP_BINARY, bytes(256)) == b"\x82\x7e\x01\x00" + bytes(256)
    assert fp.encode_frame(OP_BINARY, bytes(65536)) == (
        b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00" + bytes(65536)
    )


@pytest.mark.parametrize(
    ("n", "header"), [(0, 2), (1, 2), (125, 2), (126, 4), (65535, 4), (65536, 10), (70000, 10)]
)
@pytest.mark.parametrize("masked", [False, True])
def test_encode_frame_length_widths(fp, n, header, masked):
    payload = bytes(i & 0xFF for i in range(n))
    mask = MASK if masked else None
    frame = fp.encode_frame(OP_BINARY, payload, mask)
    assert type(frame) is bytes
    assert frame == raw_frame(OP_BINARY, payload, mask=mask)
    assert len(frame) == header + (4 if masked else 0) + n
    parser = fp.FrameParser(1 << 20, require_mask=masked)
    assert parser.feed(frame) == [(OP_BINARY, payload)]
    assert parser.buffered() == 0


def test_encode_frame_bytes_like_and_opcode_bits(fp):
    assert fp.encode_frame(OP_BINARY, bytearray(b"xy")) == b"\x82\x02xy"
    assert fp.encode_frame(OP_BINARY, memoryview(b"xy"), memoryview(MASK)) == raw_frame(
        OP_BINARY, b"xy"
    )
    assert fp.encode_frame(0x12, b"") == b"\x82\x00"  # only the low 4 bits of the opcode
    assert fp.encode_frame(OP_BINARY, b"", fin=False) == b"\x02\x00"


# ------------------------------------------------------------------ lengths


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (raw_frame(OP_BINARY, b"x" * 125, width=16), "non-minimal length"),
        (raw_frame(OP_BINARY, b"", width=16), "non-minimal length"),
        (raw_frame(OP_BINARY, b"x" * 100, width=64), "non-minimal length"),
        (raw_frame(OP_BINARY, b"x" * 65535, width=64), "non-minimal length"),
        (raw_frame(OP_BINARY, b"", width=64, length=1 << 63), "length has top bit set"),
        (raw_frame(OP_BINARY, b"", width=64, length=(1 << 64) - 1), "length has top bit set"),
    ],
    ids=["16-for-125", "16-for-0", "64-for-100", "64-for-65535", "64-top-bit", "64-all-ones"],
)
def test_non_minimal_and_invalid_lengths(fp, frame, reason):
    # Rejected as soon as the extended length is in, before any payload.
    expect_error(fp, frame[:10], 1002, reason, max_size=1 << 20)
    expect_error(fp, frame, 1002, reason, max_size=1 << 20)


def test_minimal_boundary_lengths_accepted(fp):
    parser = fp.FrameParser(1 << 20)
    for n in (125, 126, 65535, 65536):
        assert parser.feed(raw_frame(OP_BINARY, b"z" * n)) == [(OP_BINARY, b"z" * n)]


def test_incomplete_extended_length_waits(fp):
    frame = raw_frame(OP_BINARY, b"q" * 70000)
    parser = fp.FrameParser(1 << 20)
    for i in range(9):  # 2 + 8 byte header, then 4 bytes of key
        assert parser.feed(frame[i : i + 1]) == []
    assert parser.buffered() == 9
    assert parser.feed(frame[9:]) == [(OP_BINARY, b"q" * 70000)]
    assert parser.buffered() == 0


# ------------------------------------------------------------------ fragmentation


def test_fragmented_message(fp):
    stream = (
        raw_frame(OP_TEXT, b"Hel", fin=False)
        + raw_frame(OP_CONT, b"", fin=False)
        + raw_frame(OP_CONT, b"lo", fin=False)
        + raw_frame(OP_CONT, b", world")
    )
    assert fp.FrameParser(1000).feed(stream) == [(OP_TEXT, b"Hello, world")]


def test_fragmented_rfc_example_unmasked(fp):
    parser = fp.FrameParser(1000, require_mask=False)
    assert parser.feed(bytes.fromhex("010348656c")) == []
    assert parser.buffered() == 3  # the first fragment, held
    assert parser.feed(bytes.fromhex("80026c6f")) == [(OP_TEXT, b"Hello")]
    assert parser.buffered() == 0


def test_control_frames_between_fragments(fp):
    parser = fp.FrameParser(1000)
    out = parser.feed(
        raw_frame(OP_BINARY, b"ab", fin=False)
        + raw_frame(OP_PING, b"p1")
        + raw_frame(OP_CONT, b"cd", fin=False)
        + raw_frame(OP_PONG, b"")
        + raw_frame(OP_CONT, b"ef")
        + raw_frame(OP_TEXT, b"next")
    )
    assert out == [(OP_PING, b"p1"), (OP_PONG, b""), (OP_BINARY, b"abcdef"), (OP_TEXT, b"next")]


def test_close_inside_fragmented_message(fp):
    parser = fp.FrameParser(1000)
    out = parser.feed(raw_frame(OP_TEXT, b"ab", fin=False) + raw_frame(OP_CLOSE, b"\x03\xe8"))
    assert out == [(OP_CLOSE, b"\x03\xe8")]


def test_continuation_without_start(fp):
    expect_error(fp, raw_frame(OP_CONT, b"x"), 1002, "continuation without a message")
    expect_error(fp, raw_frame(OP_CONT, b"x", fin=False), 1002, "continuation without a message")
    # ... and after a finished fragmented message
    parser = fp.FrameParser(1000)
    parser.feed(raw_frame(OP_TEXT, b"a", fin=False) + raw_frame(OP_CONT, b"b"))
    with pytest.raises(fp.WebSocketError, match="continuation without a message"):
        parser.feed(raw_frame(OP_CONT, b"c"))


@pytest.mark.parametrize("second", [OP_TEXT, OP_BINARY])
@pytest.mark.parametrize("first_payload", [b"", b"abc"])
def test_new_data_frame_inside_fragmented_message(fp, second, first_payload):
    stream = raw_frame(OP_TEXT, first_payload, fin=False) + raw_frame(second, b"x")
    expect_error(fp, stream, 1002, "new message inside a fragmented one")


# ------------------------------------------------------------------ control frames


@pytest.mark.parametrize("opcode", [OP_CLOSE, OP_PING, OP_PONG])
def test_control_frame_limits(fp, opcode):
    parser = fp.FrameParser(1000)
    assert parser.feed(raw_frame(opcode, b"c" * 125)) == [(opcode, b"c" * 125)]
    expect_error(fp, raw_frame(opcode, b"c" * 126), 1002, "control frame too long")
    # too long even when the message limit is smaller, and before the payload
    expect_error(fp, raw_frame(opcode, b"c" * 126)[:4], 1002, "control frame too long", max_size=10)
    expect_error(fp, raw_frame(opcode, b"", fin=False), 1002, "fragmented control frame")
    expect_error(fp, raw_frame(opcode, b"c" * 200, fin=False), 1002, "fragmented control frame")


def test_control_frames_ignore_message_limit(fp):
    parser = fp.FrameParser(0)
    assert parser.feed(raw_frame(OP_PING, b"x" * 100)) == [(OP_PING, b"x" * 100)]
    assert parser.feed(raw_frame(OP_BINARY, b"")) == [(OP_BINARY, b"")]


# ------------------------------------------------------------------ header bits


@pytest.mark.parametrize("rsv", [1, 2, 4, 7])
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_CONT, OP_PING, 0x3])
def test_reserved_bits(fp, rsv, opcode):
    frame = raw_frame(opcode, b"payload", rsv=rsv)
    expect_error(fp, frame[:2], 1002, "reserved bits set")  # checked on the first 2 bytes
    expect_error(fp, frame, 1002, "reserved bits set")


@pytest.mark.parametrize("opcode", [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_reserved_opcodes(fp, opcode):
    expect_error(fp, raw_frame(opcode, b"x"), 1002, "reserved opcode")
    expect_error(fp, raw_frame(opcode, b"", fin=False)[:2], 1002, "reserved opcode")


def test_unmasked_client_frame_rejected(fp):
    frame = raw_frame(OP_BINARY, b"hi", mask=None)
    expect_error(fp, frame, 1002, "client frames must be masked", require_mask=True)
    expect_error(fp, frame[:2], 1002, "client frames must be masked", require_mask=True)


def test_masked_server_frame_rejected(fp):
    frame = raw_frame(OP_BINARY, b"hi")
    expect_error(fp, frame, 1002, "server frames must not be masked", require_mask=False)
    parser = fp.FrameParser(1000, require_mask=False)
    assert parser.feed(raw_frame(OP_BINARY, b"hi", mask=None)) == [(OP_BINARY, b"hi")]


# ------------------------------------------------------------------ message size


@pytest.mark.parametrize("width", [7, 16, 64])
def test_too_big_single_frame_before_payload(fp, width):
    limit = {7: 100, 16: 1000, 64: 70000}[width]
    frame = raw_frame(OP_BINARY, b"", width=width, length=limit + 1)  # header + key only
    expect_error(fp, frame, 1009, "message too big", max_size=limit)
    header_only = frame[:-4]  # not even the masking key
    expect_error(fp, header_only, 1009, "message too big", max_size=limit)
    expect_error(fp, frame, 1009, "message too big", max_size=limit, require_mask=True)
    # exactly the limit is fine
    parser = fp.FrameParser(limit)
    assert parser.feed(raw_frame(OP_BINARY, b"m" * limit)) == [(OP_BINARY, b"m" * limit)]


def test_too_big_huge_declared_length(fp):
    frame = raw_frame(OP_TEXT, b"", width=64, length=(1 << 63) - 1)
    expect_error(fp, frame[:10], 1009, "message too big", max_size=1 << 20)


def test_too_big_non_final_first_fragment(fp):
    expect_error(
        fp, raw_frame(OP_TEXT, b"", fin=False, length=11)[:2], 1009, "message too big", max_size=10
    )


def test_too_big_fragmented_total(fp):
    parser = fp.FrameParser(100)
    assert parser.feed(raw_frame(OP_BINARY, b"a" * 60, fin=False)) == []
    assert parser.feed(raw_frame(OP_CONT, b"b" * 40, fin=False)) == []  # exactly 100 so far
    assert parser.buffered() == 100
    assert parser.feed(raw_frame(OP_CONT, b"")) == [(OP_BINARY, b"a" * 60 + b"b" * 40)]
    parser = fp.FrameParser(100)
    parser.feed(raw_frame(OP_BINARY, b"a" * 60, fin=False))
    with pytest.raises(fp.WebSocketError) as info:
        parser.feed(raw_frame(OP_CONT, b"", length=41)[:2])  # the header alone
    assert info.value.close_code == 1009
    assert info.value.reason == "message too big"


# ------------------------------------------------------------------ streaming


def mixed_stream() -> tuple[bytes, list[tuple[int, bytes]]]:
    frames = [
        (raw_frame(OP_TEXT, b"hello"), [(OP_TEXT, b"hello")]),
        (raw_frame(OP_BINARY, bytes(range(200))), [(OP_BINARY, bytes(range(200)))]),
        (raw_frame(OP_PING, b"are you there"), [(OP_PING, b"are you there")]),
        (raw_frame(OP_BINARY, b"one", fin=False), []),
        (raw_frame(OP_PONG, b""), [(OP_PONG, b"")]),
        (raw_frame(OP_CONT, b"two" * 50, fin=False), []),
        (raw_frame(OP_CONT, b"three"), [(OP_BINARY, b"one" + b"two" * 50 + b"three")]),
        (raw_frame(OP_BINARY, b""), [(OP_BINARY, b"")]),
        (raw_frame(OP_TEXT, b"\xe2\x82\xac" * 30000), [(OP_TEXT, b"\xe2\x82\xac" * 30000)]),
        (raw_frame(OP_CLOSE, b"\x03\xe8bye"), [(OP_CLOSE, b"\x03\xe8bye")]),
    ]
    return b"".join(f for f, _ in frames), [m for _, ms in frames for m in ms]


def test_several_frames_in_one_feed(fp):
    stream, expected = mixed_stream()
    parser = fp.FrameParser(1 << 20)
    assert parser.feed(stream) == expected
    assert parser.buffered() == 0


def test_byte_by_byte_equals_all_at_once(fp):
    stream, expected = mixed_stream()
    stream = stream[: -len(raw_frame(OP_CLOSE, b"\x03\xe8bye"))]  # keep it fast: the big one last
    stream = raw_frame(OP_TEXT, b"x" * 300) + stream[:2000]
    whole = fp.FrameParser(1 << 20)
    at_once = whole.feed(stream)
    parser = fp.FrameParser(1 << 20)
    one_by_one = feed_all(parser, [stream[i : i + 1] for i in range(len(stream))])
    assert one_by_one == at_once
    assert parser.buffered() == whole.buffered()


def test_large_fragmented_message_in_small_chunks(fp):
    big = bytes(i * 7 & 0xFF for i in range(300_000))
    stream = (
        raw_frame(OP_BINARY, big[:100_000], fin=False)
        + raw_frame(OP_PING, b"mid")
        + raw_frame(OP_CONT, big[100_000:280_000], fin=False)
        + raw_frame(OP_CONT, big[280_000:])
        + raw_frame(OP_TEXT, b"small")
    )
    parser = fp.FrameParser(300_000)
    chunks = [stream[i : i + 7000] for i in range(0, len(stream), 7000)]
    assert feed_all(parser, chunks) == [(OP_PING, b"mid"), (OP_BINARY, big), (OP_TEXT, b"small")]
    assert parser.buffered() == 0
    # and the parser is still fine afterwards
    assert parser.feed(raw_frame(OP_BINARY, b"again")) == [(OP_BINARY, b"again")]


def test_feed_accepts_bytes_like(fp):
    frame = raw_frame(OP_BINARY, b"payload")
    assert fp.FrameParser(100).feed(bytearray(frame)) == [(OP_BINARY, b"payload")]
    assert fp.FrameParser(100).feed(memoryview(frame)) == [(OP_BINARY, b"payload")]
    parser = fp.FrameParser(100)
    assert parser.feed(memoryview(frame)[:5]) == []
    assert parser.feed(bytearray(frame[5:])) == [(OP_BINARY, b"payload")]
    with pytest.raises(TypeError):
        parser.feed("not bytes")


def test_buffered_counts_partial_frame_and_fragments(fp):
    parser = fp.FrameParser(1000)
    parser.feed(raw_frame(OP_TEXT, b"abcd", fin=False))
    assert parser.buffered() == 4
    partial = raw_frame(OP_CONT, b"efgh")[:5]
    parser.feed(partial)
    assert parser.buffered() == 4 + 5
    assert parser.feed(raw_frame(OP_CONT, b"efgh")[5:]) == [(OP_TEXT, b"abcdefgh")]
    assert parser.buffered() == 0


def test_payload_is_immutable_copy(fp):
    data = bytearray(raw_frame(OP_BINARY, b"keep me"))
    parser = fp.FrameParser(100)
    ((_, payload),) = parser.feed(data)
    data[:] = bytes(len(data))
    assert payload == b"keep me"
    assert type(payload) is bytes


# ------------------------------------------------------------------ close


def test_data_after_close_frame(fp):
    parser = fp.FrameParser(100)
    assert parser.feed(raw_frame(OP_CLOSE, b"")) == [(OP_CLOSE, b"")]
    for data in (raw_frame(OP_TEXT, b"late"), b""):
        with pytest.raises(fp.WebSocketError) as info:
            parser.feed(data)
        assert info.value.close_code == 1002
        assert info.value.reason == "data after close frame"


def test_bytes_after_close_in_same_feed_are_not_parsed(fp):
    parser = fp.FrameParser(100)
    trailing = raw_frame(OP_TEXT, b"late") + b"\xff\xff"  # even garbage is not looked at
    out = parser.feed(raw_frame(OP_PING, b"") + raw_frame(OP_CLOSE, b"\x03\xe8") + trailing)
    assert out == [(OP_PING, b""), (OP_CLOSE, b"\x03\xe8")]
    assert parser.buffered() == len(trailing)
    with pytest.raises(fp.WebSocketError, match="data after close frame"):
        parser.feed(b"")


# ------------------------------------------------------------------ pack_entry

SEQ_BOUNDARIES = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]


@pytest.mark.parametrize("seq", SEQ_BOUNDARIES)
def test_pack_entry_decodes(fp, seq):
    rest = [b"ciphertext", 12345, "sender", None]
    tail = b"".join(msgpack.packb(x) for x in rest)
    frame = fp.pack_entry(3, seq, len(rest), tail)
    assert type(frame) is bytes
    assert msgpack.unpackb(frame) == [3, seq, *rest]
    # the same bytes msgpack itself writes
    assert frame == msgpack.packb([3, seq, *rest])


@pytest.mark.parametrize("seq", SEQ_BOUNDARIES)
@pytest.mark.parametrize("type_code", [0, 127])
def test_pack_entry_empty_tail_and_type_bounds(fp, seq, type_code):
    assert msgpack.unpackb(fp.pack_entry(type_code, seq, 0, b"")) == [type_code, seq]
    assert fp.pack_entry(type_code, seq, 0, bytearray()) == msgpack.packb([type_code, seq])


def test_pack_entry_max_fixarray(fp):
    rest = list(range(13))
    tail = b"".join(msgpack.packb(x) for x in rest)
    assert msgpack.unpackb(fp.pack_entry(1, 5, 13, memoryview(tail))) == [1, 5, *rest]


@pytest.mark.parametrize(
    ("type_code", "seq", "count", "exc"),
    [
        (1, 0, 14, ValueError),  # 16 items: not a fixarray
        (1, 0, -1, ValueError),  # would write a 1-item array followed by 2 items
        (1, 0, -2, ValueError),  # would write an empty array followed by 2 items
        (1, 0, -3, ValueError),
        (128, 0, 0, ValueError),
        (-1, 0, 0, ValueError),
        (1, -1, 0, ValueError),
        (1, 2**64, 0, OverflowError),
    ],
)
def test_pack_entry_rejects(fp, type_code, seq, count, exc):
    with pytest.raises(exc):
        fp.pack_entry(type_code, seq, count, b"")


# ------------------------------------------------------------------ properties

frame_spec = st.tuples(
    st.integers(0, 15),  # opcode
    st.booleans(),  # fin
    st.sampled_from([0, 0, 0, 0, 1, 4]),  # rsv
    st.booleans() | st.just(True),  # masked (mostly)
    st.binary(max_size=140),  # payload
    st.sampled_from([None, None, None, 16, 64]),  # forced length width
)


def build(specs) -> bytes:
    return b"".join(
        raw_frame(op, payload, fin=fin, rsv=rsv, mask=MASK if masked else None, width=width)
        for op, fin, rsv, masked, payload, width in specs
    )


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@FAST
@given(
    data=st.binary(max_size=300),
    cuts=st.lists(st.integers(0, 10_000), max_size=6),
    require_mask=st.booleans(),
    max_size=st.integers(0, 200),
)
def test_random_bytes_only_raise_websocket_error(fp, data, cuts, require_mask, max_size):
    parser = fp.FrameParser(max_size, require_mask=require_mask)
    try:
        for chunk in split(data, cuts):
            for opcode, payload in parser.feed(chunk):
                assert opcode in (OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG)
                assert type(payload) is bytes
    except fp.WebSocketError as exc:
        assert exc.close_code in (1002, 1009)


def valid_messages():
    """A valid client stream and the messages it carries."""
    control = st.tuples(st.sampled_from([OP_PING, OP_PONG]), st.binary(max_size=125))
    message = st.tuples(
        st.sampled_from([OP_TEXT, OP_BINARY]),
        st.lists(st.binary(max_size=150), min_size=1, max_size=4),  # fragments
        st.lists(control, max_size=2),  # control frames after the first fragment
        st.binary(min_size=4, max_size=4),  # masking key
    )
    return st.lists(message | control, max_size=8)


def encode_valid(items) -> tuple[bytes, list[tuple[int, bytes]]]:
    stream = []
    expected = []
    for item in items:
        if isinstance(item[1], bytes):  # a control frame on its own
            stream.append(raw_frame(item[0], item[1]))
            expected.append(item)
            continue
        opcode, fragments, controls, key = item
        for i, frag in enumerate(fragments):
            last = i == len(fragments) - 1
            stream.append(raw_frame(opcode if i == 0 else OP_CONT, frag, fin=last, mask=key))
            if i == 0 and not last:
                for c in controls:
                    stream.append(raw_frame(c[0], c[1], mask=key))
                    expected.append(c)
        expected.append((opcode, b"".join(fragments)))
    return b"".join(stream), expected


@FAST
@given(items=valid_messages(), cuts=st.lists(st.integers(0, 100_000), max_size=10))
def test_random_splits_of_valid_stream(fp, items, cuts):
    stream, expected = encode_valid(items)
    whole = fp.FrameParser(1000)
    assert whole.feed(stream) == expected
    assert whole.buffered() == 0
    parser = fp.FrameParser(1000)
    assert feed_all(parser, split(stream, cuts)) == expected
    assert parser.buffered() == 0


@FAST
@given(
    specs=st.lists(frame_spec, max_size=6),
    junk=st.binary(max_size=20),
    cuts=st.lists(st.integers(0, 10_000), max_size=4),
    require_mask=st.booleans(),
    max_size=st.sampled_from([0, 10, 100, 1000]),
)
def test_twins_agree_on_mutated_streams(both, specs, junk, cuts, require_mask, max_size):
    pure, cy = both
    chunks = split(build(specs) + junk, cuts)
    assert outcome(pure, chunks, max_size, require_mask) == outcome(
        cy, chunks, max_size, require_mask
    )
    chunks.append(raw_frame(OP_PING, b"after"))
    assert per_chunk(pure, chunks, max_size, require_mask) == per_chunk(
        cy, chunks, max_size, require_mask
    )


@FAST
@given(
    data=st.binary(max_size=200),
    cuts=st.lists(st.integers(0, 10_000), max_size=4),
    require_mask=st.booleans(),
)
def test_twins_agree_on_random_bytes(both, data, cuts, require_mask):
    pure, cy = both
    chunks = split(data, cuts)
    assert outcome(pure, chunks, 100, require_mask) == outcome(cy, chunks, 100, require_mask)


@pytest.mark.parametrize(
    "limit", [0, 10, 10.5, -0.5, -(2**70), 2**70, True, float("inf"), float("-inf"), float("nan")]
)
def test_twins_agree_on_odd_limits(both, limit):
    pure, cy = both
    assert repr(pure.FrameParser(limit).max_message_size) == repr(
        cy.FrameParser(limit).max_message_size
    )
    frames = [
        raw_frame(OP_BINARY, b""),
        raw_frame(OP_BINARY, b"x" * 10),
        raw_frame(OP_BINARY, b"x" * 11),
        raw_frame(OP_BINARY, b"x" * 5, fin=False) + raw_frame(OP_CONT, b"x" * 6),
        raw_frame(OP_BINARY, b"", width=64, length=(1 << 63) - 1),
    ]
    for frame in frames:
        assert per_chunk(pure, [frame], limit) == per_chunk(cy, [frame], limit)


@FAST
@given(
    data=st.binary(max_size=100),
    mask=st.binary(min_size=3, max_size=5),
    opcode=st.integers(0, 15),
    fin=st.booleans(),
    use_mask=st.booleans(),
)
def test_twins_agree_on_mask_and_encode(both, data, mask, opcode, fin, use_mask):
    pure, cy = both

    def result(fn, *args, **kw):
        try:
            return ("ok", fn(*args, **kw))
        except ValueError as exc:
            return ("error", str(exc))

    assert result(pure.apply_mask, data, mask) == result(cy.apply_mask, data, mask)
    m = mask if use_mask else None
    assert result(pure.encode_frame, opcode, data, m, fin) == result(
        cy.encode_frame, opcode, data, m, fin
    )


@FAST
@given(
    type_code=st.integers(-2, 130),
    seq=st.integers(-2, 2**64 + 2),
    count=st.integers(-4, 15),
    tail=st.binary(max_size=20),
)
def test_twins_agree_on_pack_entry(both, type_code, seq, count, tail):
    pure, cy = both

    def result(mod):
        try:
            return ("ok", mod.pack_entry(type_code, seq, count, tail))
        except (ValueError, OverflowError) as exc:
            return ("error", type(exc))

    assert result(pure) == result(cy)


# ------------------------------------------------------------ entry tails

INTS = st.one_of(st.integers(0, 300), st.integers(-2**63, 2**64 + 5), st.booleans())
TEXT = st.text(max_size=40) | st.sampled_from(["a" * 31, "b" * 32, "c" * 255, "d" * 256, "é" * 20, "\ud800"])
BLOBS = st.binary(max_size=40) | st.sampled_from([b"x" * 255, b"y" * 256, b"z" * 65535, b"w" * 65536])


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # noqa: BLE001 - both twins must fail the same way
        return ("error", type(exc))


def test_msg_tail_is_the_msgpack_array_without_its_header(fp):
    msg_id = bytes(range(16))
    tail = fp.msg_tail(msg_id, "alice", 2, None, 1_764_355_000_000, b"p" * 100)
    assert tail == msgpack.packb([msg_id, "alice", 2, None, 1_764_355_000_000, b"p" * 100], use_bin_type=True)[1:]
    grouped = fp.msg_tail(msg_id, "alice", 2, "g.x", 7, b"")
    assert msgpack.unpackb(b"\x96" + grouped, raw=False) == [msg_id, "alice", 2, "g.x", 7, b""]
    receipt = fp.receipt_tail(msg_id, "bob", 255, 1, 2**64 - 1)
    assert msgpack.unpackb(b"\x95" + receipt, raw=False) == [msg_id, "bob", 255, 1, 2**64 - 1]
    assert fp.msg_sender(tail) == (msg_id, "alice")


@FAST
@given(msg_id=BLOBS, user=TEXT, device=INTS, group=st.none() | TEXT, ts=INTS, payload=BLOBS, status=INTS)
def test_twins_agree_on_tails(both, msg_id, user, device, group, ts, payload, status):
    pure, cy = both
    made = _outcome(pure.msg_tail, msg_id, user, device, group, ts, payload)
    assert made == _outcome(cy.msg_tail, msg_id, user, device, group, ts, payload)
    assert _outcome(pure.receipt_tail, msg_id, user, device, status, ts) == _outcome(
        cy.receipt_tail, msg_id, user, device, status, ts
    )
    if made[0] == "ok":
        tail = made[1]
        assert msgpack.unpackb(b"\x96" + tail, raw=False, strict_map_key=False)[:2] == [msg_id, user]
        assert pure.msg_sender(tail) == cy.msg_sender(tail) == (msg_id, user)


@FAST
@given(tail=st.binary(max_size=40) | st.builds(lambda a, b: a + b, st.sampled_from([b"\xc4\x02ab", b"\xc5\x00\x01z", b"\xc6\x00\x00\x00\x00"]), st.binary(max_size=12)))
def test_twins_agree_on_msg_sender_of_any_bytes(both, tail):
    pure, cy = both
    got = _outcome(pure.msg_sender, tail)
    assert got == _outcome(cy.msg_sender, tail)
    if got[0] == "error":
        assert issubclass(got[1], ValueError)


def test_tails_refuse_other_types_like_msgpack(fp):
    with pytest.raises(TypeError):
        fp.msg_tail(b"id", "u", 1, None, 1, object())
    with pytest.raises(UnicodeEncodeError):
        fp.receipt_tail(b"id", "\ud800", 1, 1, 1)
    with pytest.raises(OverflowError):
        fp.receipt_tail(b"id", "u", 1, 1, 2**64)
    # A bool is packed exactly as msgpack packs it (true, not 1).
    assert fp.receipt_tail(b"id", "u", True, 1, 1) == msgpack.packb([b"id", "u", True, 1, 1], use_bin_type=True)[1:]


# ------------------------------------------------------ SEND and ACK frames

USERS = st.from_regex(r"[a-z0-9._-]{1,64}", fullmatch=True)
DEVICE_PAYLOADS = st.dictionaries(
    st.integers(1, 255), st.binary(max_size=300) | st.sampled_from([b"q" * 255, b"r" * 256, b"s" * 65536]), min_size=1, max_size=20
)
SEQS = st.integers(0, 2**63 - 1) | st.sampled_from([0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1])


def _general(payload: bytes) -> list[object]:
    """What the session's general path makes of ``payload`` once READY."""
    session = Session()
    session.authenticated("me", 1)
    return session.receive_message(payload)


def _packed(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _decode(fp: ModuleType, payload: bytes, max_frames: int = 1024) -> list[object] | None:
    return fp.decode_sends_and_acks(payload, max_frames)


SEND_FRAMES = st.builds(
    lambda msg_id, to, payloads: [10, msg_id, to, payloads], st.binary(min_size=16, max_size=16), USERS, DEVICE_PAYLOADS
)
ACK_FRAMES = st.builds(lambda seq: [14, seq], SEQS)


@FAST
@given(objs=st.lists(SEND_FRAMES | ACK_FRAMES, min_size=1, max_size=6))
def test_decode_sends_and_acks_takes_what_msgpack_packs(fp, objs):
    payload = b"".join(_packed(obj) for obj in objs)
    expected = [frames.Send(*obj[1:]) if obj[0] == 10 else frames.Ack(obj[1]) for obj in objs]
    assert _decode(fp, payload) == expected == _general(payload)
    # More frames than allowed: the general path answers TOO_LARGE.
    assert _decode(fp, payload, len(objs) - 1) is None
    assert _decode(fp, payload, len(objs)) == expected


@pytest.mark.parametrize(
    "obj",
    [
        [14, -1],
        [14, 2**63],
        [14, 1.0],
        [14],
        [14, 1, 2],
        [10, b"x" * 15, "bob", {1: b"p"}],
        [10, b"x" * 16, "Bob", {1: b"p"}],
        [10, b"x" * 16, "b" * 65, {1: b"p"}],
        [10, b"x" * 16, "", {1: b"p"}],
        [10, b"x" * 16, "bob", {}],
        [10, b"x" * 16, "bob", {0: b"p"}],
        [10, b"x" * 16, "bob", {256: b"p"}],
        [10, b"x" * 16, "bob", {1: "p"}],
        [10, b"x" * 16, "bob", {"1": b"p"}],
        [10, b"x" * 16, "bob", {1: b"p"}, 5],
        [11, b"x" * 16, "g." + "a" * 22, b"p"],
        [16, "bob", [b"x" * 16]],
    ],
)
def test_decode_sends_and_acks_leaves_the_rest_to_the_general_path(fp, obj):
    assert _decode(fp, _packed(obj)) is None
    # One such frame among good ones sends the whole message there.
    assert _decode(fp, _packed([14, 1]) + _packed(obj)) is None
    assert _decode(fp, _packed(obj) + _packed([14, 1])) is None


def test_decode_sends_and_acks_leaves_odd_encodings_to_the_general_path(both):
    pure, cy = both
    msg_id = b"m" * 16
    odd = [
        # ACK seq 5 as a uint16, a map16 of one entry, a bin16 of 3 bytes
        b"\x92\x0e\xcd\x00\x05",
        b"\x94\x0a\xc4\x10" + msg_id + b"\xa3bob\xde\x00\x01\x01\xc4\x01p",
        b"\x94\x0a\xc4\x10" + msg_id + b"\xa3bob\x81\x01\xc5\x00\x03abc",
    ]
    for payload in odd:
        general = _general(payload)
        # Either twin may decode a valid frame itself, as the general path would.
        assert _decode(pure, payload) in (None, general)
        assert _decode(cy, payload) in (None, general)
    # A duplicate device key: msgpack keeps the last; the compiled twin declines.
    duplicate = b"\x94\x0a\xc4\x10" + msg_id + b"\xa3bob\x82\x01\xc4\x01a\x01\xc4\x01b"
    assert _decode(cy, duplicate) is None
    assert _general(duplicate) == [frames.Send(msg_id, "bob", {1: b"b"})]
    # A truncated last frame
    assert _decode(pure, _packed([14, 1]) + b"\x92\x0e") is None
    assert _decode(cy, _packed([14, 1]) + b"\x92\x0e") is None


@FAST
@given(
    objs=st.lists(
        st.sampled_from([[14, 300], [10, b"i" * 16, "bob.x", {1: b"hello", 200: b""}]]), min_size=1, max_size=3
    ),
    cut=st.integers(0, 120),
    flips=st.lists(st.tuples(st.integers(0, 120), st.integers(0, 255)), max_size=4),
    extra=st.binary(max_size=4),
)
def test_decode_sends_and_acks_is_none_or_the_general_result_on_mutations(fp, objs, cut, flips, extra):
    payload = bytearray(b"".join(_packed(obj) for obj in objs))
    for pos, value in flips:
        if pos < len(payload):
            payload[pos] = value
    mutated = bytes(payload[: max(cut, 2)]) + extra
    got = _decode(fp, mutated)
    if got is not None:
        assert got == _general(mutated)


@FAST
@given(data=st.binary(max_size=64).map(lambda b: b"\x94\x0a" + b) | st.binary(max_size=16).map(lambda b: b"\x92\x0e" + b))
def test_decode_sends_and_acks_of_any_bytes(fp, data):
    got = _decode(fp, data)
    if got is not None:
        assert got == _general(data)
