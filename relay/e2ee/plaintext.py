"""The plaintext inside every end-to-end-encrypted message (profile ``relay-v1``).

A plaintext is exactly one msgpack map, unpadded, with at least ``type`` (str)
and ``ts`` (int, the sender's clock in ms) and the fields of its type beside
them::

    text   {body: str}
    media  {id: str, key: bin32, sha256: bin32, size: int, mime: str, name: str}
    skdm   {group, chain_id: u32, iteration: u32, chain_key: bin32, signing_key: bin32}

Build a map with :func:`text`, :func:`media` or :func:`skdm`, turn it into
bytes with :func:`encode`, encrypt those; :func:`decode` is the inverse after
decrypting. ``skdm`` (a sender-key distribution message, see
:mod:`relay.e2ee.sender_keys`) is a *control* type: the client library
consumes it and never shows it to the user. A map of an UNKNOWN type decodes
fine and is handed to the caller, which shows it as unsupported; it is never
dropped silently.

Rules this module adds where the profile is silent (restated in docs/e2e.md):
every key of the map is a str; fields beyond those listed are allowed and
kept (a newer sender may add some); ``bool`` is never an int; ``size`` is
0 .. 2**64-1; ``chain_id`` and ``iteration`` are u32; ``group`` has the wire
form ``g.`` + 22 url-safe base64 chars.

Raises: :func:`encode` ``ValueError`` for a map we must not send;
:func:`decode` :class:`~relay.e2ee.errors.DecodeError` for bytes that are
not such a map, and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack

from relay.protocol.frames import is_group

from .errors import DecodeError

__all__ = [
    "CONTROL_TYPES",
    "KNOWN_TYPES",
    "Plaintext",
    "decode",
    "encode",
    "field_problem",
    "media",
    "skdm",
    "text",
]

Plaintext = dict[str, Any]

KNOWN_TYPES = ("text", "media", "skdm")
# Consumed by the client library, never shown to the user.
CONTROL_TYPES = ("skdm",)

_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1


def _is_int(value: object, low: int, high: int) -> bool:
    # type() rather than isinstance(): True/False are ints in Python, not in msgpack.
    return type(value) is int and low <= value <= high


def _is_bin32(value: object) -> bool:
    return type(value) is bytes and len(value) == 32


def _is_str(value: object) -> bool:
    return type(value) is str


# Field name -> (check, what the field must be); per known type.
_FIELDS: dict[str, dict[str, tuple[Any, str]]] = {
    "text": {"body": (_is_str, "a str")},
    "media": {
        "id": (_is_str, "a str"),
        "key": (_is_bin32, "32 bytes"),
        "sha256": (_is_bin32, "32 bytes"),
        "size": (lambda v: _is_int(v, 0, _U64_MAX), "an int 0 .. 2**64-1"),
        "mime": (_is_str, "a str"),
        "name": (_is_str, "a str"),
    },
    "skdm": {
        "group": (is_group, "a group id (g. + 22 url-safe base64 chars)"),
        "chain_id": (lambda v: _is_int(v, 0, _U32_MAX), "a u32"),
        "iteration": (lambda v: _is_int(v, 0, _U32_MAX), "a u32"),
        "chain_key": (_is_bin32, "32 bytes"),
        "signing_key": (_is_bin32, "32 bytes"),
    },
}


def field_problem(message: object) -> str | None:
    """Why ``message`` is not a valid plaintext map, or None when it is.

    Checks the shape only (``type``, ``ts``, str keys, the known types'
    fields); it does not check that a key is a usable Ed25519 point.
    """
    if not isinstance(message, Mapping):
        return f"a plaintext is a map, not {type(message).__name__}"
    for name in message:
        if type(name) is not str:
            return f"a plaintext's keys are str, got {type(name).__name__}"
    kind = message.get("type")
    if type(kind) is not str:
        return "a plaintext needs a str 'type'"
    # ts is the sender's clock, shown not trusted: any int msgpack can carry.
    if not _is_int(message.get("ts"), -(2**63), _U64_MAX):
        return "a plaintext needs an int 'ts' (ms)"
    for name, (check, what) in _FIELDS.get(kind, {}).items():
        if name not in message:
            return f"a {kind} plaintext needs '{name}'"
        if not check(message[name]):
            return f"'{name}' of a {kind} plaintext must be {what}"
    return None


def encode(message: Mapping[str, Any]) -> bytes:
    """The plaintext bytes of ``message`` (one msgpack map, unpadded).

    Raises ``ValueError`` when :func:`field_problem` finds something wrong,
    or when a value of an extra field is not something msgpack can carry.
    """
    problem = field_problem(message)
    if problem is not None:
        raise ValueError(problem)
    try:
        data: bytes = msgpack.packb(dict(message), use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"a plaintext field cannot be encoded: {exc}") from None
    return data


def decode(data: bytes) -> Plaintext:
    """The map in decrypted plaintext ``data``.

    Raises :class:`DecodeError` unless ``data`` is exactly one msgpack map
    (nothing after it) whose keys are str, with a str ``type`` and an int
    ``ts``, and, for a known type, the fields of that type. An unknown type is
    returned as it is: show it as unsupported. Nothing but DecodeError is
    raised, whatever the bytes.
    """
    try:
        # raw=False: msgpack str -> str, bin -> bytes, invalid UTF-8 refused.
        obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise DecodeError(f"a plaintext is one msgpack map: {exc}") from None
    if type(obj) is not dict:
        raise DecodeError(f"a plaintext is a msgpack map, not {type(obj).__name__}")
    problem = field_problem(obj)
    if problem is not None:
        raise DecodeError(problem)
    return obj


def text(body: str, ts: int) -> Plaintext:
    """The map of a text message; pass it to :func:`encode`."""
    return {"type": "text", "ts": ts, "body": body}


def media(
    media_id: str, key: bytes, sha256: bytes, size: int, mime: str, name: str, ts: int
) -> Plaintext:
    """The map of a media message (the blob's id, key, sha256 and plaintext
    size, see :mod:`relay.e2ee.media`); pass it to :func:`encode`."""
    return {
        "type": "media",
        "ts": ts,
        "id": media_id,
        "key": key,
        "sha256": sha256,
        "size": size,
        "mime": mime,
        "name": name,
    }


def skdm(
    group: str, chain_id: int, iteration: int, chain_key: bytes, signing_key: bytes, ts: int
) -> Plaintext:
    """The map of a sender-key distribution message (made by
    :meth:`relay.e2ee.sender_keys.OwnChain.distribution`)."""
    return {
        "type": "skdm",
        "ts": ts,
        "group": group,
        "chain_id": chain_id,
        "iteration": iteration,
        "chain_key": chain_key,
        "signing_key": signing_key,
    }
