"""relay.e2ee.plaintext: the one msgpack map inside every encrypted message."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.e2ee import plaintext
from relay.e2ee.errors import DecodeError

GROUP = "g.cmVsYXktdjEgdmVjdG9ycw"
KEY = bytes(range(32))


def pack(obj: object) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def good_messages() -> list[dict]:
    return [
        plaintext.text("hello", 1),
        plaintext.text("", 0),
        plaintext.media("a1b2", KEY, bytes(32), 0, "image/png", "cat.png", 5),
        plaintext.skdm(GROUP, 2**32 - 1, 0, KEY, KEY, 7),
    ]


@pytest.mark.parametrize("message", good_messages(), ids=lambda m: m["type"])
def test_known_types_round_trip(message: dict) -> None:
    data = plaintext.encode(message)
    assert plaintext.decode(data) == message
    # Unpadded: exactly the msgpack of the map.
    assert data == pack(message)


def test_constants() -> None:
    assert plaintext.KNOWN_TYPES == ("text", "media", "skdm")
    assert plaintext.CONTROL_TYPES == ("skdm",)
    assert set(plaintext.CONTROL_TYPES) <= set(plaintext.KNOWN_TYPES)


def test_unknown_type_passes_through() -> None:
    # A newer sender's type: decoded, never dropped; the caller shows "unsupported".
    message = {"type": "poll", "ts": 3, "question": "tea?", "options": ["yes", "no"]}
    assert plaintext.decode(pack(message)) == message
    assert plaintext.decode(plaintext.encode(message)) == message
    assert plaintext.decode(pack({"type": "", "ts": -1})) == {"type": "", "ts": -1}


def test_extra_fields_of_a_known_type_are_kept() -> None:
    message = {**plaintext.text("hi", 1), "reply_to": b"\x01" * 16}
    assert plaintext.decode(plaintext.encode(message)) == message


BAD_MAPS = [
    {"ts": 1, "body": "x"},  # no type
    {"type": 1, "ts": 1},  # type not str
    {"type": "text", "body": "x"},  # no ts
    {"type": "text", "ts": "1", "body": "x"},
    {"type": "text", "ts": True, "body": "x"},  # bool is not an int
    {"type": "text", "ts": 1.5, "body": "x"},
    {"type": "text", "ts": 1},  # no body
    {"type": "text", "ts": 1, "body": b"x"},
    {**plaintext.media("i", KEY, KEY, 1, "m", "n", 1), "key": bytes(31)},
    {**plaintext.media("i", KEY, KEY, 1, "m", "n", 1), "sha256": "00" * 32},
    {**plaintext.media("i", KEY, KEY, 1, "m", "n", 1), "size": -1},
    {**plaintext.media("i", KEY, KEY, 1, "m", "n", 1), "size": False},
    {**plaintext.media("i", KEY, KEY, 1, "m", "n", 1), "mime": None},
    {k: v for k, v in plaintext.media("i", KEY, KEY, 1, "m", "n", 1).items() if k != "name"},
    {**plaintext.skdm(GROUP, 1, 0, KEY, KEY, 1), "group": "g.short"},
    {**plaintext.skdm(GROUP, 1, 0, KEY, KEY, 1), "chain_id": 2**32},
    {**plaintext.skdm(GROUP, 1, 0, KEY, KEY, 1), "iteration": -1},
    {**plaintext.skdm(GROUP, 1, 0, KEY, KEY, 1), "chain_key": bytes(33)},
    {**plaintext.skdm(GROUP, 1, 0, KEY, KEY, 1), "signing_key": None},
]


@pytest.mark.parametrize("message", BAD_MAPS)
def test_bad_fields_refused_both_ways(message: dict) -> None:
    with pytest.raises(ValueError):
        plaintext.encode(message)
    with pytest.raises(DecodeError):
        plaintext.decode(pack(message))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        pack([1, 2]),
        pack("text"),
        pack({b"type": "text", "ts": 1, "body": "x"}),  # a bin key
        pack(plaintext.text("a", 1)) + pack(plaintext.text("b", 2)),  # two maps
        pack(plaintext.text("a", 1)) + b"\x00",  # trailing byte
        pack(plaintext.text("a", 1))[:-1],  # truncated
        b"\x81\xa4type\xa4\xff\xfe\xfd\xfc",  # invalid UTF-8 in a str
        b"\xc1",  # a never-used msgpack byte
    ],
)
def test_not_one_map_is_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        plaintext.decode(data)


def test_encode_refuses_non_maps_and_non_str_keys() -> None:
    with pytest.raises(ValueError):
        plaintext.encode(["text"])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        plaintext.encode({"type": "text", "ts": 1, "body": "x", 3: 4})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        plaintext.encode({"type": "x", "ts": 1, "extra": object()})


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_decode_random_bytes_raises_only_decode_error(data: bytes) -> None:
    try:
        out = plaintext.decode(data)
    except DecodeError:
        return
    assert plaintext.field_problem(out) is None


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=8)
    | st.binary(max_size=40)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
maps = st.dictionaries(
    st.sampled_from(
        [
            "type",
            "ts",
            "body",
            "id",
            "key",
            "sha256",
            "size",
            "mime",
            "name",
            "group",
            "chain_id",
            "iteration",
            "chain_key",
            "signing_key",
            "x",
        ]
    ),
    values | st.sampled_from(["text", "media", "skdm", GROUP]) | st.just(KEY),
    max_size=12,
)


@settings(max_examples=500, deadline=None)
@given(maps)
def test_decode_of_random_maps_agrees_with_encode(message: dict) -> None:
    data = pack(message)
    try:
        decoded = plaintext.decode(data)
    except DecodeError:
        with pytest.raises(ValueError):
            plaintext.encode(message)
        return
    assert decoded == message
    assert plaintext.encode(message) == data


MEDIA_BYTES = plaintext.encode(plaintext.media("id", KEY, KEY, 5, "image/png", "x.png", 1))


@settings(max_examples=500, deadline=None)
@given(st.integers(0, len(MEDIA_BYTES) - 1), st.integers(0, 255), st.integers(0, len(MEDIA_BYTES)))
def test_mutated_plaintext_raises_only_decode_error(index: int, value: int, cut: int) -> None:
    # Near-valid bytes reach deeper into the decoder than random ones.
    mutated = bytearray(MEDIA_BYTES)
    mutated[index] = value
    for data in (bytes(mutated), bytes(mutated[:cut])):
        try:
            out = plaintext.decode(data)
        except DecodeError:
            continue
        assert plaintext.field_problem(out) is None
