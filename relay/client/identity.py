"""A device's identity: who it is, where its relay is, and its Ed25519 key.

The state lives in ``<state_dir>/state.json`` (mode 0600, written atomically)::

    {"version": 1, "server_url": "ws://host:port/v1", "user": "alice",
     "device": 1, "seed": "<base64 of the 32-byte Ed25519 seed>"}

Call :meth:`DeviceIdentity.generate` for a new account, then
``open_client(identity, state_dir, register=True)`` and
:meth:`DeviceIdentity.save`; later :meth:`DeviceIdentity.load` and
``open_client(identity, state_dir)``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from nacl.signing import SigningKey, VerifyKey

__all__ = [
    "AUTH_CONTEXT",
    "STATE_FILE",
    "DeviceIdentity",
    "auth_signature",
    "normalize_server_url",
    "valid_user",
    "write_private_file",
]

AUTH_CONTEXT = b"relay-auth-v1"
STATE_FILE = "state.json"
_STATE_VERSION = 1
_USER_RE = re.compile(r"[a-z0-9._-]{1,64}")


def valid_user(name: str) -> bool:
    """True when ``name`` is a valid user name (1-64 of ``[a-z0-9._-]``)."""
    return _USER_RE.fullmatch(name) is not None


def auth_signature(signing_key: SigningKey, server_name: str, challenge: bytes) -> bytes:
    """The 64-byte Ed25519 signature that AUTH/REGISTER carry:
    over ``b"relay-auth-v1" + server_name.encode() + challenge``."""
    message = AUTH_CONTEXT + server_name.encode() + challenge
    return bytes(signing_key.sign(message).signature)


def write_private_file(target: Path, data: bytes) -> Path:
    """Replace ``target`` with ``data`` atomically and durably: a temp file in
    the same directory (mode 0600), fsync, rename, fsync of the directory.
    The directory is created 0700 if missing. A crash leaves the old file or
    the new one, never a mix."""
    directory = target.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


def normalize_server_url(url: str) -> str:
    """``ws://host:port`` -> ``ws://host:port/v1``; keeps an explicit path.

    Raises :class:`ValueError` for anything but a ``ws://`` or ``wss://`` URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    path = parts.path if parts.path not in ("", "/") else "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


@dataclass
class DeviceIdentity:
    """One device of one user on one relay, with its identity (AUTH) key."""

    server_url: str
    user: str
    device: int
    signing_key: SigningKey

    @classmethod
    def generate(cls, server_url: str, user: str) -> DeviceIdentity:
        """A fresh key for a new account; REGISTER makes it device 1.

        Raises :class:`ValueError` for an invalid user name or URL."""
        if not valid_user(user):
            raise ValueError(f"invalid user name {user!r}: 1-64 chars of [a-z0-9._-]")
        return cls(normalize_server_url(server_url), user, 1, SigningKey.generate())

    @property
    def verify_key(self) -> VerifyKey:
        return self.signing_key.verify_key

    @property
    def identity_key(self) -> bytes:
        """The 32 raw bytes of the public Ed25519 identity key."""
        return bytes(self.signing_key.verify_key)

    def sign_challenge(self, server_name: str, challenge: bytes) -> bytes:
        return auth_signature(self.signing_key, server_name, challenge)

    def to_json(self) -> dict[str, object]:
        return {
            "version": _STATE_VERSION,
            "server_url": self.server_url,
            "user": self.user,
            "device": self.device,
            "seed": base64.b64encode(bytes(self.signing_key)).decode("ascii"),
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> DeviceIdentity:
        """Parse :meth:`to_json` output; raises :class:`ValueError` when malformed."""
        try:
            if data.get("version") != _STATE_VERSION:
                raise ValueError(f"unsupported state version {data.get('version')!r}")
            server_url, user, device, seed = (
                data["server_url"],
                data["user"],
                data["device"],
                data["seed"],
            )
            if not isinstance(server_url, str) or not isinstance(user, str):
                raise ValueError("server_url and user must be strings")
            if not isinstance(device, int) or not 1 <= device <= 255:
                raise ValueError(f"invalid device {device!r}")
            if not isinstance(seed, str):
                raise ValueError("seed must be a base64 string")
            raw = base64.b64decode(seed, validate=True)
            if len(raw) != 32:
                raise ValueError("seed must be 32 bytes")
        except KeyError as exc:
            raise ValueError(f"state is missing {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid state: {exc}") from None
        return cls(server_url, user, device, SigningKey(raw))

    def save(self, state_dir: str | os.PathLike[str]) -> Path:
        """Write ``state.json`` into ``state_dir`` (created 0700 if missing)
        atomically (temp file, fsync, rename) with mode 0600; returns its path."""
        data = (json.dumps(self.to_json(), indent=2) + "\n").encode()
        return write_private_file(Path(state_dir) / STATE_FILE, data)

    @classmethod
    def load(cls, state_dir: str | os.PathLike[str]) -> DeviceIdentity:
        """Read ``state.json`` from ``state_dir``.

        Raises :class:`FileNotFoundError` when there is none and
        :class:`ValueError` when it is malformed."""
        path = Path(state_dir) / STATE_FILE
        with open(path, "rb") as f:
            raw = f.read()
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"{path}: not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a JSON object")
        return cls.from_json(data)

    def __repr__(self) -> str:  # never print the seed
        return (
            f"DeviceIdentity(server_url={self.server_url!r}, user={self.user!r}, "
            f"device={self.device}, identity_key={self.identity_key.hex()[:16]}...)"
        )
