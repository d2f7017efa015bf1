"""relay.e2ee.media: secretstream blobs, their sha256, and the frozen vectors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from nacl import bindings as sodium

from relay.e2ee.errors import E2EEError, MediaError
from relay.e2ee.media import (
    ABYTES,
    CHUNK_BYTES,
    CIPHER_CHUNK_BYTES,
    HEADER_BYTES,
    EncryptedMedia,
    MediaDecryptor,
    MediaEncryptor,
    blob_size,
    decrypt_media,
    encrypt_media,
)

VECTORS = json.loads((Path(__file__).parent / "vectors" / "media.json").read_text())
SIZES = [0, 1, 65_535, 65_536, 65_537, 3 * 65_536]
KEY = bytes(range(64, 96))
TAG_MESSAGE = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
TAG_FINAL = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL
TAG_PUSH = sodium.crypto_secretstream_xchacha20poly1305_TAG_PUSH
TAG_REKEY = sodium.crypto_secretstream_xchacha20poly1305_TAG_REKEY


def data_of(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


def raw_stream(key: bytes, chunks: list[tuple[bytes, int]]) -> bytes:
    """A blob made straight with libsodium, any chunking and tags we like."""
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    parts = [sodium.crypto_secretstream_xchacha20poly1305_init_push(state, key)]
    parts += [
        sodium.crypto_secretstream_xchacha20poly1305_push(state, c, None, t) for c, t in chunks
    ]
    return b"".join(parts)


def split(blob: bytes) -> tuple[bytes, list[bytes]]:
    body = blob[HEADER_BYTES:]
    return blob[:HEADER_BYTES], [
        body[i : i + CIPHER_CHUNK_BYTES] for i in range(0, len(body), CIPHER_CHUNK_BYTES)
    ]


def refused(blob: bytes, size: int | None = None) -> None:
    """A blob whose sha256 is right (so the stream itself is what is refused)."""
    with pytest.raises(MediaError):
        decrypt_media(blob, KEY, hashlib.sha256(blob).digest(), size)


@pytest.mark.parametrize("size", SIZES)
def test_round_trip(size: int) -> None:
    data = data_of(size)
    made = encrypt_media(data)
    assert made.size == size
    assert made.sha256 == hashlib.sha256(made.blob).digest()
    assert (
        len(made.blob)
        == blob_size(size)
        == HEADER_BYTES + size + (size // CHUNK_BYTES + 1) * ABYTES
    )
    assert decrypt_media(made.blob, made.key, made.sha256, size) == data
    assert decrypt_media(made.blob, made.key, made.sha256) == data


@pytest.mark.parametrize("size", SIZES)
def test_encoder_shape_ends_with_short_final_chunk(size: int) -> None:
    made = encrypt_media(data_of(size), KEY)
    header, chunks = split(made.blob)
    assert len(chunks) == size // CHUNK_BYTES + 1
    assert len(chunks[-1]) == size % CHUNK_BYTES + ABYTES  # empty when size is a multiple
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, header, KEY)
    tags = [sodium.crypto_secretstream_xchacha20poly1305_pull(state, c, None)[1] for c in chunks]
    assert tags == [TAG_MESSAGE] * (len(chunks) - 1) + [TAG_FINAL]


def test_key_comes_from_random_and_is_not_printed() -> None:
    made = encrypt_media(b"x", random=lambda n: b"\x07" * n)
    assert made.key == b"\x07" * 32
    assert "blob" not in repr(made) and made.key.hex() not in repr(made)
    assert isinstance(made, EncryptedMedia)


def test_tampered_blob_is_refused_by_sha256() -> None:
    made = encrypt_media(data_of(70_000))
    for index in (0, HEADER_BYTES, len(made.blob) // 2, len(made.blob) - 1):
        tampered = bytearray(made.blob)
        tampered[index] ^= 1
        with pytest.raises(MediaError, match="sha256"):
            decrypt_media(bytes(tampered), made.key, made.sha256)
    with pytest.raises(MediaError, match="sha256"):
        decrypt_media(made.blob[:-1], made.key, made.sha256)
    with pytest.raises(MediaError, match="sha256"):
        decrypt_media(made.blob, made.key, bytes(32))


def test_wrong_size_key_or_sha256_refused() -> None:
    made = encrypt_media(data_of(10), KEY)
    with pytest.raises(MediaError):
        decrypt_media(made.blob, KEY, made.sha256, 11)
    with pytest.raises(MediaError):
        decrypt_media(made.blob, KEY, made.sha256, -1)
    with pytest.raises(MediaError):
        decrypt_media(made.blob, KEY[:31], made.sha256)
    with pytest.raises(MediaError):
        decrypt_media(made.blob, KEY, made.sha256[:31])
    with pytest.raises(MediaError):  # authentic sha256, wrong key: the MAC fails
        decrypt_media(made.blob, bytes(32), made.sha256)


def test_correct_sha256_but_bad_stream_is_refused() -> None:
    full = data_of(CHUNK_BYTES)
    made = encrypt_media(data_of(3 * CHUNK_BYTES + 5), KEY)
    header, chunks = split(made.blob)
    refused(header + b"".join(chunks[:-1]))  # truncated: no FINAL chunk
    refused(made.blob[:-1])  # truncated inside the FINAL chunk
    refused(header)  # no chunk at all
    refused(header[:10])  # not even a header
    refused(made.blob + chunks[-1])  # a chunk after FINAL
    refused(header + chunks[1] + chunks[0] + b"".join(chunks[2:]))  # reordered
    refused(header + b"".join(chunks[1:]))  # first chunk dropped
    refused(made.blob + b"\x00" * 5)  # trailing garbage shorter than a chunk
    # FINAL early: a valid stream whose FINAL chunk is followed by another chunk.
    refused(raw_stream(KEY, [(full, TAG_FINAL), (b"more", TAG_FINAL)]))
    refused(raw_stream(KEY, [(full, TAG_MESSAGE), (full, TAG_FINAL), (b"", TAG_FINAL)]))
    # Missing FINAL: every chunk MESSAGE.
    refused(raw_stream(KEY, [(full, TAG_MESSAGE), (b"tail", TAG_MESSAGE)]))
    refused(raw_stream(KEY, [(full, TAG_MESSAGE)]))
    # Tags the format never uses.
    refused(raw_stream(KEY, [(full, TAG_PUSH), (b"", TAG_FINAL)]))
    refused(raw_stream(KEY, [(full, TAG_REKEY), (b"", TAG_FINAL)]))
    refused(raw_stream(KEY, [(b"short", TAG_PUSH)]))
    # A short chunk that is not the last (another chunking than the format's).
    refused(raw_stream(KEY, [(b"short", TAG_MESSAGE), (b"", TAG_FINAL)]))


def test_size_checked_after_decrypting() -> None:
    made = encrypt_media(data_of(100), KEY)
    with pytest.raises(MediaError, match="100"):
        decrypt_media(made.blob, KEY, made.sha256, 99)


@pytest.mark.parametrize("size", [1, CHUNK_BYTES, 2 * CHUNK_BYTES])
def test_lenient_final_on_last_full_chunk_decrypts(size: int) -> None:
    data = data_of(size)
    pieces = [data[i : i + CHUNK_BYTES] for i in range(0, size, CHUNK_BYTES)]
    blob = raw_stream(KEY, [(p, TAG_MESSAGE) for p in pieces[:-1]] + [(pieces[-1], TAG_FINAL)])
    assert decrypt_media(blob, KEY, hashlib.sha256(blob).digest(), size) == data


@pytest.mark.parametrize("size", SIZES)
def test_streaming_equals_one_shot(size: int) -> None:
    data = data_of(size)
    encryptor = MediaEncryptor(KEY)
    parts = [encryptor.header]
    offset = 0
    while size - offset >= CHUNK_BYTES:
        parts.append(encryptor.push(data[offset : offset + CHUNK_BYTES], final=False))
        offset += CHUNK_BYTES
    parts.append(encryptor.push(data[offset:], final=True))
    blob = b"".join(parts)
    assert encryptor.finished and encryptor.size == size
    assert encryptor.sha256 == hashlib.sha256(blob).digest()
    assert len(blob) == blob_size(size)
    assert decrypt_media(blob, KEY, encryptor.sha256, size) == data

    one_shot = encrypt_media(data, KEY)
    header, chunks = split(one_shot.blob)
    decryptor = MediaDecryptor(KEY, header)
    out = []
    for i, chunk in enumerate(chunks):
        plain, final = decryptor.pull(chunk)
        assert final == (i == len(chunks) - 1)
        out.append(plain)
    decryptor.finish(one_shot.sha256, size)
    assert b"".join(out) == data and decryptor.sha256 == one_shot.sha256 and decryptor.size == size


def test_streaming_misuse_and_refusals() -> None:
    encryptor = MediaEncryptor(KEY)
    with pytest.raises(ValueError):
        encryptor.push(b"short", final=False)  # only full chunks before the final
    with pytest.raises(ValueError):
        encryptor.push(data_of(CHUNK_BYTES), final=True)  # our FINAL is always short
    encryptor.push(b"", final=True)
    with pytest.raises(ValueError):
        encryptor.push(b"", final=True)
    with pytest.raises(ValueError):
        MediaEncryptor(bytes(31))

    made = encrypt_media(data_of(10), KEY)
    header, chunks = split(made.blob)
    with pytest.raises(MediaError):
        MediaDecryptor(KEY, header[:-1])
    decryptor = MediaDecryptor(KEY, header)
    with pytest.raises(MediaError):
        decryptor.finish()  # nothing pulled: no FINAL yet
    with pytest.raises(MediaError):
        decryptor.pull(b"\x00" * (ABYTES - 1))
    with pytest.raises(MediaError):
        decryptor.pull(b"\x00" * (CIPHER_CHUNK_BYTES + 1))
    assert decryptor.pull(chunks[0]) == (data_of(10), True)
    with pytest.raises(MediaError):
        decryptor.pull(chunks[0])  # after FINAL
    with pytest.raises(MediaError):
        decryptor.finish(bytes(32))
    with pytest.raises(MediaError):
        decryptor.finish(made.sha256, 11)
    decryptor.finish(made.sha256, 10)


def test_media_error_is_an_e2ee_error() -> None:
    assert issubclass(MediaError, E2EEError)


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=lambda v: f"size{v['size']}")
def test_frozen_vectors(vector: dict) -> None:
    assert VECTORS["description"]
    key = bytes.fromhex(VECTORS["key"])
    blob = bytes.fromhex(vector["blob"])
    sha256 = bytes.fromhex(vector["sha256"])
    size = vector["size"]
    plain = bytes.fromhex(vector["plaintext"]) if "plaintext" in vector else data_of(size)
    assert hashlib.sha256(plain).hexdigest() == vector["plaintext_sha256"]
    assert hashlib.sha256(blob).digest() == sha256
    assert len(blob) == blob_size(size)
    assert decrypt_media(blob, key, sha256, size) == plain
    # The blob is the format's exact shape: a short (possibly empty) FINAL last.
    header, chunks = split(blob)
    assert len(chunks) == size // CHUNK_BYTES + 1
    assert len(chunks[-1]) == size % CHUNK_BYTES + ABYTES
