"""Typed settings of ``relay serve``, with units in the names.

Precedence: defaults < environment (``RELAY_<NAME>``, e.g. ``RELAY_PORT``)
< command line. :meth:`Settings.validate` raises :class:`ConfigError` with a
message naming the setting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from relay.errors import ConfigError

SYNC_MODES = ("durable", "none")


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8765
    data: str = "./relay-data"
    server_name: str = "relay"
    shards: int = 4
    map_size_bytes: int = 8 << 30
    # durable: SENT only after fsync; none: the OS flushes later (a crash of
    # the machine, not of the relay, may lose acknowledged messages).
    sync: str = "durable"
    registration_token: str | None = None
    max_message_bytes: int = 1 << 20
    max_frames_per_message: int = 1024
    idle_timeout_s: float = 120.0
    # An idle authenticated connection is parked (no task, no buffer) after
    # this long without input; 0 never parks.
    park_after_s: float = 2.0
    handshake_timeout_s: float = 10.0
    window: int = 256
    max_group_members: int = 1024
    # Per connection: REQ and SIGNAL frames per second (and the burst
    # allowed at once); past them the frame is answered 429. The REQ burst
    # admits one full message of requests (max_frames_per_message).
    requests_per_s: float = 100.0
    requests_burst: int = 1024
    signals_per_s: float = 20.0
    signals_burst: int = 50
    max_unacked_sends: int = 1024
    # keys.fetch per (requester user, target user): a burst, then one per
    # 3 s; past it 429. Each fetch hands out one-time prekeys, so this is
    # what stops a client from draining someone's supply.
    keys_fetch_burst: int = 20
    keys_fetch_per_s: float = 1 / 3
    # EVENT keys.low when a device's one-time prekeys drop below this (0: never).
    keys_low_threshold: int = 10
    # keys.publish: one-time prekeys per request, and stored per device (413 past them).
    max_prekeys_per_publish: int = 200
    max_prekeys_per_device: int = 1000
    retention_s: float = 30 * 24 * 3600.0
    sweep_interval_s: float = 3600.0
    commit_batch_max: int = 4096
    fastpath: str | None = None  # "cython", "pure" or None (default pick)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        environ = dict(os.environ if environ is None else environ)
        settings = cls()
        for f in fields(cls):
            raw = environ.get("RELAY_" + f.name.upper())
            if raw is not None:
                setattr(settings, f.name, _convert(f.name, f.type, raw))
        for name, value in overrides.items():
            if value is not None:
                setattr(settings, name, value)
        settings.validate()
        return settings

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is not in 0-65535")
        if self.sync not in SYNC_MODES:
            raise ConfigError(f"sync must be one of {', '.join(SYNC_MODES)}, not {self.sync!r}")
        if not 1 <= self.shards <= 256:
            raise ConfigError("shards must be between 1 and 256")
        if self.window < 2:
            raise ConfigError("window must be at least 2")
        if self.max_message_bytes < 1024:
            raise ConfigError("max_message_bytes must be at least 1024")
        if self.fastpath not in (None, "cython", "pure"):
            raise ConfigError("fastpath must be 'cython' or 'pure'")
        if self.requests_per_s <= 0 or self.signals_per_s <= 0 or self.requests_burst < 1 or self.signals_burst < 1:
            raise ConfigError("rate limits must be positive (burst at least 1)")
        if self.keys_fetch_per_s <= 0 or self.keys_fetch_burst < 1:
            raise ConfigError("keys_fetch_per_s must be positive and keys_fetch_burst at least 1")
        if self.keys_low_threshold < 0:
            raise ConfigError("keys_low_threshold must be 0 (never) or positive")
        if not 1 <= self.max_prekeys_per_publish <= self.max_prekeys_per_device:
            raise ConfigError("max_prekeys_per_publish must be between 1 and max_prekeys_per_device")
        if self.park_after_s < 0:
            raise ConfigError("park_after_s must be 0 (never park) or positive")
        for name in ("idle_timeout_s", "handshake_timeout_s", "retention_s", "sweep_interval_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if not self.server_name or len(self.server_name) > 255:
            raise ConfigError("server_name must be 1-255 characters")


def _convert(name: str, type_: Any, raw: str) -> Any:
    type_name = type_ if isinstance(type_, str) else getattr(type_, "__name__", str(type_))
    try:
        if type_name.startswith("int"):
            return int(raw)
        if type_name.startswith("float"):
            return float(raw)
    except ValueError as exc:
        raise ConfigError(f"RELAY_{name.upper()}={raw!r} is not a number") from exc
    return raw
