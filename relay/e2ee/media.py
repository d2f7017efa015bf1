"""Media blobs (profile ``relay-v1``): files encrypted before they go over HTTP.

A blob is a libsodium secretstream XChaCha20-Poly1305 stream under a random
32-byte key::

    header (24) || chunk_0 || ... || chunk_n        chunk = 65,536 plaintext bytes + 17

Every chunk but the last holds exactly 65,536 plaintext bytes and carries tag
MESSAGE; the last one holds the rest and carries tag FINAL. Our encoder
always ends with a chunk shorter than 65,536 bytes, EMPTY when the size is a
multiple of 65,536 (size 0 included), so a blob has ``size // 65536 + 1``
chunks. The decoder is lenient in one way only: it also accepts a FINAL on
the last full chunk, with no empty chunk after it. ``sha256`` is over the
whole blob and is checked before decrypting; ``size`` is the plaintext size.
No associated data is used.

One shot: :func:`encrypt_media` then :func:`decrypt_media`. Streaming (the
HTTP upload/download code): :class:`MediaEncryptor` and
:class:`MediaDecryptor`, which also keep the running sha256 and size; a
downloader reads :data:`CIPHER_CHUNK_BYTES` at a time after the header and
calls :meth:`MediaDecryptor.finish` at the end of the body, and must not use
any plaintext before ``finish`` has checked the sha256.

Pure: bytes in, bytes out. Raises :class:`~relay.e2ee.errors.MediaError` for
every blob (or key, sha256, size from a message) that does not check out;
``ValueError`` for misuse of the encoder.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field

from nacl import bindings as sodium
from nacl.exceptions import CryptoError

from .errors import MediaError
from .primitives import KEY_BYTES, Random

__all__ = [
    "CHUNK_BYTES",
    "CIPHER_CHUNK_BYTES",
    "HEADER_BYTES",
    "EncryptedMedia",
    "MediaDecryptor",
    "MediaEncryptor",
    "blob_size",
    "decrypt_media",
    "encrypt_media",
]

CHUNK_BYTES = 65_536
ABYTES = sodium.crypto_secretstream_xchacha20poly1305_ABYTES  # 17: tag byte + MAC
CIPHER_CHUNK_BYTES = CHUNK_BYTES + ABYTES
HEADER_BYTES = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES  # 24
_TAG_MESSAGE = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
_TAG_FINAL = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL
_SIZE_MAX = 2**64 - 1


def blob_size(size: int) -> int:
    """The length of the blob our encoder makes for ``size`` plaintext bytes
    (what to ask ``media.token`` for)."""
    return HEADER_BYTES + size + (size // CHUNK_BYTES + 1) * ABYTES


@dataclass(frozen=True, slots=True)
class EncryptedMedia:
    """A blob to upload and what the ``media`` plaintext carries about it."""

    blob: bytes = field(repr=False)
    key: bytes = field(repr=False)
    sha256: bytes
    size: int  # plaintext bytes


class MediaEncryptor:
    """Encrypts a file chunk by chunk: send :attr:`header`, then the bytes
    :meth:`push` returns for each chunk of exactly :data:`CHUNK_BYTES`
    plaintext bytes, then ``push(rest, final=True)`` with the shorter rest
    (``b""`` after a full chunk). :attr:`sha256` and :attr:`size` are those of
    the blob and plaintext so far; read them after the final push.
    """

    __slots__ = ("_hash", "_state", "finished", "header", "size")

    def __init__(self, key: bytes) -> None:
        """``ValueError`` unless ``key`` is 32 bytes. libsodium draws the
        24-byte header itself (randomly)."""
        if type(key) is not bytes or len(key) != KEY_BYTES:
            raise ValueError("a media key is 32 bytes")
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        self.header: bytes = sodium.crypto_secretstream_xchacha20poly1305_init_push(
            self._state, key
        )
        self._hash = hashlib.sha256(self.header)
        self.size = 0
        self.finished = False

    def push(self, chunk: bytes, final: bool) -> bytes:
        """The encrypted ``chunk`` (``len(chunk) + 17`` bytes).

        Raises ``ValueError`` after the final chunk, for a non-final chunk
        that is not exactly 65,536 bytes, or a final one that is not shorter
        (our blobs always end with a short, possibly empty, chunk).
        """
        if self.finished:
            raise ValueError("the media stream is already finished")
        if final and len(chunk) >= CHUNK_BYTES:
            raise ValueError(
                "the final chunk is shorter than 65,536 bytes (push b'' after a full chunk)"
            )
        if not final and len(chunk) != CHUNK_BYTES:
            raise ValueError("every chunk but the final one is exactly 65,536 bytes")
        tag = _TAG_FINAL if final else _TAG_MESSAGE
        out = sodium.crypto_secretstream_xchacha20poly1305_push(
            self._state, bytes(chunk), None, tag
        )
        self._hash.update(out)
        self.size += len(chunk)
        self.finished = final
        return out

    @property
    def sha256(self) -> bytes:
        """SHA-256 of the blob so far (header and every pushed chunk)."""
        return self._hash.digest()


class MediaDecryptor:
    """Decrypts a blob chunk by chunk: construct it with the blob's first
    :data:`HEADER_BYTES`, :meth:`pull` each following run of
    :data:`CIPHER_CHUNK_BYTES` (the last run may be shorter), then call
    :meth:`finish` with the sha256 and size from the ``media`` message. Until
    ``finish`` returns, treat every plaintext as unverified. A blob is
    refused as a whole: once a call raised, discard the decryptor.
    """

    __slots__ = ("_hash", "_state", "finished", "size")

    def __init__(self, key: bytes, header: bytes) -> None:
        """``MediaError`` for a key that is not 32 bytes or a header that is
        not 24 (both come from the sender)."""
        if type(key) is not bytes or len(key) != KEY_BYTES:
            raise MediaError("a media key is 32 bytes")
        if len(header) != HEADER_BYTES:
            raise MediaError("a media blob starts with a 24-byte header")
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        sodium.crypto_secretstream_xchacha20poly1305_init_pull(self._state, bytes(header), key)
        self._hash = hashlib.sha256(header)
        self.size = 0
        self.finished = False

    def pull(self, chunk: bytes) -> tuple[bytes, bool]:
        """(plaintext, final) of one encrypted chunk.

        Raises ``MediaError`` for a chunk after the FINAL one, a chunk longer
        than 65,553 bytes or shorter than 17, one that does not authenticate,
        a tag other than MESSAGE or FINAL, or a MESSAGE chunk that is not full
        (the stream would not split the way the format says).
        """
        if self.finished:
            raise MediaError("media blob continues after its FINAL chunk")
        if not ABYTES <= len(chunk) <= CIPHER_CHUNK_BYTES:
            raise MediaError("a media chunk is 17 .. 65,553 bytes (truncated blob?)")
        try:
            plain, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(
                self._state, bytes(chunk), None
            )
        except (CryptoError, RuntimeError, ValueError) as exc:
            raise MediaError(f"a media chunk does not authenticate: {exc}") from None
        if tag == _TAG_FINAL:
            self.finished = True
        elif tag != _TAG_MESSAGE:
            # PUSH and REKEY are valid secretstream tags the format never uses.
            raise MediaError(f"media chunk with tag {tag}, expected MESSAGE or FINAL")
        elif len(chunk) != CIPHER_CHUNK_BYTES:
            raise MediaError("a media chunk before the last is 65,536 plaintext bytes")
        self._hash.update(chunk)
        self.size += len(plain)
        return plain, self.finished

    @property
    def sha256(self) -> bytes:
        """SHA-256 of the header and every chunk pulled so far."""
        return self._hash.digest()

    def finish(self, sha256: bytes | None = None, size: int | None = None) -> None:
        """Call at the end of the blob. ``MediaError`` when no FINAL chunk
        came (truncated), or the blob's sha256 or the plaintext size differ
        from those given."""
        if not self.finished:
            raise MediaError("media blob ends without a FINAL chunk (truncated)")
        if sha256 is not None and not hmac.compare_digest(self._hash.digest(), sha256):
            raise MediaError("media blob does not match its sha256")
        if size is not None and size != self.size:
            raise MediaError(f"media plaintext is {self.size} bytes, the message said {size}")


def encrypt_media(
    plaintext: bytes, key: bytes | None = None, random: Random = os.urandom
) -> EncryptedMedia:
    """Encrypt a whole file. ``key`` defaults to ``random(32)``; libsodium
    draws the header. ``ValueError`` for a key that is not 32 bytes."""
    if key is None:
        key = random(KEY_BYTES)
    encryptor = MediaEncryptor(key)
    view = memoryview(plaintext)
    parts = [encryptor.header]
    full = len(view) // CHUNK_BYTES
    for i in range(full):
        parts.append(
            encryptor.push(bytes(view[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES]), final=False)
        )
    parts.append(encryptor.push(bytes(view[full * CHUNK_BYTES :]), final=True))
    return EncryptedMedia(b"".join(parts), key, encryptor.sha256, encryptor.size)


def decrypt_media(blob: bytes, key: bytes, sha256: bytes, size: int | None = None) -> bytes:
    """The plaintext of a whole blob, checked against the ``media`` message.

    Raises ``MediaError`` when the blob's sha256 differs (checked before any
    decryption), the key is not 32 bytes, the stream is truncated, reordered
    or tampered, has FINAL before its end or not at all, or the plaintext is
    not ``size`` bytes.
    """
    if size is not None and (type(size) is not int or not 0 <= size <= _SIZE_MAX):
        raise MediaError("a media size is an int 0 .. 2**64-1")
    if type(sha256) is not bytes or len(sha256) != 32:
        raise MediaError("a media sha256 is 32 bytes")
    if not hmac.compare_digest(hashlib.sha256(blob).digest(), sha256):
        raise MediaError("media blob does not match its sha256")
    if len(blob) < HEADER_BYTES:
        raise MediaError("media blob is shorter than its header")
    decryptor = MediaDecryptor(key, blob[:HEADER_BYTES])
    view = memoryview(blob)
    parts = []
    for start in range(HEADER_BYTES, len(blob), CIPHER_CHUNK_BYTES):
        plain, _ = decryptor.pull(bytes(view[start : start + CIPHER_CHUNK_BYTES]))
        parts.append(plain)
    # The hash was checked above; finish() checks FINAL and the size.
    decryptor.finish(size=size)
    return b"".join(parts)
