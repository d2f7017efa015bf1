"""The key directory: ``keys.publish``, ``keys.fetch``, ``keys.count`` and
EVENT ``keys.low`` (PROTOCOL.md, "Control requests"; decisions in
docs/protocol.md, "Keys").

Requests are checked here: their shape (400), the per-publish limit (413),
the signed prekey's signature against the calling device's identity key
(400, through :func:`relay.server.auth.verify_signed_prekey`), and the
keys.fetch rate limit per (requester, target) user (429). What depends on
what is stored is checked by the write ops in the owner's shard
(:class:`~relay.store.base.PublishKeys`, :class:`~relay.store.base.FetchBundles`:
404, 409, 413), and :func:`relay.server.wire_errors.raise_for_result` turns
their errors into wire codes.

A fetch takes each device's one-time prekey out of the store in the
transaction that makes the answer, so a prekey is handed out once, however
many fetches run at once and across restarts; a keys.low event that the
fetch causes is committed with it and handed to the router after the commit.
"""

from __future__ import annotations

from typing import Any

import trio

from relay.errors import BAD_REQUEST, NOT_FOUND, RATE_LIMITED, TOO_LARGE, FrameError
from relay.protocol.limits import KeyedBuckets
from relay.server import auth
from relay.server.clock import now_ms
from relay.server.context import Caller, ServerContext
from relay.server.requests import RequestHandler, user_arg
from relay.server.wire_errors import raise_for_result
from relay.store.base import Bundle, Bundles, FetchBundles, PublishKeys, SignedPrekey, WriteOp

U32_MAX = 2**32 - 1
KEY_BYTES = 32
SIG_BYTES = 64
MAX_DEVICE = 255
# keys.fetch buckets kept at once (least recently used forgotten first). At
# the per-connection REQ rate a client needs minutes to cycle through this
# many targets, far longer than one bucket takes to refill.
MAX_FETCH_BUCKETS = 1 << 16


def _u32(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= U32_MAX:
        raise FrameError(BAD_REQUEST, f"{what} must be an integer 0-{U32_MAX}")
    return value


def _bin(value: object, size: int, what: str) -> bytes:
    if type(value) is not bytes or len(value) != size:
        raise FrameError(BAD_REQUEST, f"{what} must be {size} bytes (bin)")
    return value


def _map(value: object, what: str) -> dict[Any, Any]:
    if type(value) is not dict:
        raise FrameError(BAD_REQUEST, f"{what} must be a map")
    return value


def parse_signed_prekey(value: object) -> SignedPrekey:
    """``{id: u32, key: bin32, sig: bin64}``; FrameError(400) naming the field."""
    spk = _map(value, "signed_prekey")
    return SignedPrekey(
        _u32(spk.get("id"), "signed_prekey.id"),
        _bin(spk.get("key"), KEY_BYTES, "signed_prekey.key"),
        _bin(spk.get("sig"), SIG_BYTES, "signed_prekey.sig"),
    )


def parse_prekeys(value: object, limit: int) -> list[tuple[int, bytes]]:
    """``[{id: u32, key: bin32}]`` as (id, key) pairs; 400 naming the item, 413 past ``limit``."""
    if type(value) is not list:
        raise FrameError(BAD_REQUEST, "prekeys must be a list of {id, key} maps")
    if len(value) > limit:
        raise FrameError(TOO_LARGE, f"{len(value)} prekeys in one keys.publish; at most {limit}")
    out = []
    for i, item in enumerate(value):
        prekey = _map(item, f"prekeys[{i}]")
        out.append((_u32(prekey.get("id"), f"prekeys[{i}].id"), _bin(prekey.get("key"), KEY_BYTES, f"prekeys[{i}].key")))
    return out


def parse_devices(value: object) -> tuple[int, ...]:
    """keys.fetch's optional filter: a list of device numbers 1-255."""
    if type(value) is not list or len(value) > MAX_DEVICE:
        raise FrameError(BAD_REQUEST, f"devices must be a list of at most {MAX_DEVICE} device numbers")
    for device in value:
        if type(device) is not int or not 1 <= device <= MAX_DEVICE:
            raise FrameError(BAD_REQUEST, f"devices must be device numbers 1-{MAX_DEVICE}")
    return tuple(value)


def bundle_result(bundle: Bundle) -> dict[str, Any]:
    spk = bundle.signed_prekey
    prekey = None if bundle.prekey is None else {"id": bundle.prekey[0], "key": bundle.prekey[1]}
    return {
        "device": bundle.device,
        "identity_key": bundle.identity_key,
        "signed_prekey": {"id": spk.id, "key": spk.key, "sig": spk.sig},
        "prekey": prekey,
    }


class Keys:
    """Registers the ``keys.*`` ops on the server's :class:`RequestHandler`."""

    def __init__(self, ctx: ServerContext, requests: RequestHandler) -> None:
        self.ctx = ctx
        settings = ctx.settings
        self.fetch_limits: KeyedBuckets[tuple[str, str]] = KeyedBuckets(
            settings.keys_fetch_per_s, settings.keys_fetch_burst, MAX_FETCH_BUCKETS
        )
        requests.register("keys.publish", self.publish)
        requests.register("keys.fetch", self.fetch)
        requests.register("keys.count", self.count)

    async def publish(self, conn: Caller, args: dict[Any, Any]) -> object:
        """``{signed_prekey?, prekeys?, replace?}`` -> ``{count}``; see
        :class:`PublishKeys` for 404/409/413."""
        assert conn.user is not None and conn.device is not None
        settings = self.ctx.settings
        raw_spk = args.get("signed_prekey")
        spk = None if raw_spk is None else parse_signed_prekey(raw_spk)
        raw_prekeys = args.get("prekeys")
        prekeys = [] if raw_prekeys is None else parse_prekeys(raw_prekeys, settings.max_prekeys_per_publish)
        replace = args.get("replace", False)
        if type(replace) is not bool:
            raise FrameError(BAD_REQUEST, "replace must be true or false")
        if replace and spk is None:
            raise FrameError(BAD_REQUEST, "replace needs a signed_prekey")
        if spk is not None:
            record = self.ctx.store.get_user(conn.user)
            identity_key = None if record is None else record.devices.get(conn.device)
            if identity_key is None or not auth.verify_signed_prekey(identity_key, spk.key, spk.sig):
                reason = "signed_prekey.sig is not this device's identity key signature over signed_prekey.key"
                raise FrameError(BAD_REQUEST, reason)
        op = PublishKeys(conn.user, conn.device, spk, prekeys, settings.max_prekeys_per_device, replace)
        result = await self._call(conn.user, op)
        raise_for_result(result)
        assert isinstance(result, int)
        return {"count": result}

    async def fetch(self, conn: Caller, args: dict[Any, Any]) -> object:
        """``{user, devices?}`` -> ``{devices: [bundle]}``; 404 unknown user, 429 over the rate."""
        assert conn.user is not None and conn.device is not None
        user = user_arg(args)
        raw_devices = args.get("devices")
        devices = None if raw_devices is None else parse_devices(raw_devices)
        if self.ctx.store.get_user(user) is None:
            raise FrameError(NOT_FOUND, f"no such user {user}")
        if not self.fetch_limits.take((conn.user, user), trio.current_time()):
            raise FrameError(RATE_LIMITED, f"too many keys.fetch for {user}; try again later")
        op = FetchBundles(user, conn.user, conn.device, devices, self.ctx.settings.keys_low_threshold, now_ms())
        result = await self._call(user, op)
        raise_for_result(result)
        assert isinstance(result, Bundles)
        return {"devices": [bundle_result(b) for b in result.bundles]}

    async def count(self, conn: Caller, args: dict[Any, Any]) -> object:
        """One-time prekeys left for the calling device (a read, no write)."""
        assert conn.user is not None and conn.device is not None
        return self.ctx.store.prekey_count(conn.user, conn.device)

    async def _call(self, user: str, op: WriteOp) -> object:
        """Commit ``op`` in ``user``'s shard and return its result; keys.low
        events it appended go to the router from the commit callback, like
        every other committed entry."""
        done = trio.Event()
        box: list[object] = []

        def committed(result: object) -> None:
            if isinstance(result, Bundles) and result.entries:
                self.ctx.router.deliver(user, result.entries)
            box.append(result)
            done.set()

        await self.ctx.writer_for(user).submit(op, committed)
        await done.wait()
        return box[0]
