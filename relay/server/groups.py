"""Groups on the server: the ``group.*`` requests and the SEND_GROUP fan-out.

SEND_GROUP in three committed steps (see ``relay.store.base``):

1. ``PrepareGroupMessage`` in the group's shard: membership checked, the
   body stored once (incomplete, no references yet);
2. ``FanOut`` in every shard holding members, concurrently: a reference in
   each member device's inbox, idempotent per (shard, body) by a marker;
   devices are woken as each shard commits;
3. ``CompleteGroupMessage``: the reference count is added and the body marked
   complete; only then is SENT queued, and the markers are dropped.

A crash before step 3 leaves an incomplete body: the sender never got SENT,
retries with the same msg_id, step 1 finds the body, step 2 skips the shards
already done, so no member gets the message twice. A retry that arrives while
the first attempt is still running waits for it.
"""

from __future__ import annotations

import base64
import functools
import os
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import trio

from relay.errors import (
    BAD_REQUEST,
    CONFLICT,
    INTERNAL,
    NOT_FOUND,
    UNAVAILABLE,
    FrameError,
    StoreError,
    StoreFullError,
)
from relay.protocol import frames
from relay.protocol.groups import GroupInfo, check_users, new_group
from relay.server.clock import now_ms
from relay.store.base import (
    ChangeGroup,
    CompleteGroupMessage,
    CreateGroup,
    DropFanOutMarker,
    FannedOut,
    FanOut,
    GroupPrepared,
    PrepareGroupMessage,
)

if TYPE_CHECKING:
    from relay.server.app import RelayServer
    from relay.server.connection import Connection

GROUP_OPS = ("group.add", "group.remove", "group.leave", "group.info", "group.rename", "group.promote", "group.demote")


def new_group_id() -> str:
    return "g." + base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()


def _raise_store(result: object) -> None:
    if isinstance(result, FrameError):
        raise result
    if isinstance(result, StoreFullError):
        raise FrameError(UNAVAILABLE, "store full")
    if isinstance(result, BaseException):
        raise FrameError(INTERNAL, f"store error: {result}")


class Groups:
    def __init__(self, server: RelayServer) -> None:
        self.server = server
        self._fanouts: dict[bytes, trio.Event] = {}
        for op in GROUP_OPS:
            server.requests.register(op, functools.partial(self.change, op=op))
        server.requests.register("group.create", self.create)

    # --- requests -------------------------------------------------------------

    def _require_users(self, users: list[str]) -> None:
        store = self.server.store
        for user in users:
            if store.get_user(user) is None:
                raise FrameError(NOT_FOUND, f"no such user {user}")

    async def create(self, conn: Connection, args: dict[Any, Any]) -> object:
        assert conn.user is not None
        settings = self.server.settings
        members = check_users(args.get("members", []))
        self._require_users(members)
        for _ in range(3):
            info = new_group(new_group_id(), conn.user, args.get("name"), members, settings.max_group_members)
            result = await self.server.writer_for(info.group).call(CreateGroup(info, now_ms()))
            if isinstance(result, FrameError) and result.code == CONFLICT:
                continue  # 128-bit ids collide only in theory; draw again
            _raise_store(result)
            await self._notify(info, conn.user, info.members)
            return info.as_result()
        raise FrameError(INTERNAL, "could not allocate a group id")

    async def change(self, conn: Connection, args: dict[Any, Any], op: str = "") -> object:
        assert conn.user is not None
        group = args.get("group")
        if not frames.is_group(group):
            raise FrameError(BAD_REQUEST, "group must be a group id")
        assert isinstance(group, str)
        if op == "group.add":
            self._require_users(check_users(args.get("members")))
        result = await self.server.writer_for(group).call(
            ChangeGroup(group, conn.user, op, args, self.server.settings.max_group_members)
        )
        _raise_store(result)
        assert isinstance(result, tuple)
        info, notify = result
        if notify:
            await self._notify(info, conn.user, notify)
        return info.as_result()

    async def _notify(self, info: GroupInfo, actor: str, users: tuple[str, ...]) -> None:
        """EVENT group.changed into every device inbox of ``users``; returns once committed."""
        now = now_ms()
        tail = frames.event_tail("group.changed", info.event_body(actor), now)
        await self.server.append_to_users(users, frames.EVENT, frames.EVENT_FIELDS, tail, now)

    # --- SEND_GROUP ---------------------------------------------------------------

    async def send(self, conn: Connection, event: frames.SendGroup, ts: int) -> None:
        """Run the three steps; queue SENT or ERROR on ``conn`` (even if it closed meanwhile)."""
        assert conn.user is not None and conn.device is not None
        server = self.server
        group_writer = server.writer_for(event.to)
        prepare = PrepareGroupMessage(event.to, conn.user, conn.device, event.msg_id, event.payload, ts)
        try:
            while True:
                prepared = await group_writer.call(prepare)
                if isinstance(prepared, FrameError):
                    prepared.ref = event.msg_id
                _raise_store(prepared)
                assert isinstance(prepared, GroupPrepared)
                running = self._fanouts.get(prepared.body_key)
                if running is None:
                    break
                await running.wait()
            if not prepared.complete:
                await self._fan_out(conn.user, conn.device, prepared)
        except FrameError as error:
            error.ref = event.msg_id
            conn.queue_error(error)
            return
        conn.queue_sent(event.msg_id, prepared.ts)

    async def _fan_out(self, sender: str, sender_device: int, prepared: GroupPrepared) -> None:
        server = self.server
        key = prepared.body_key
        done = self._fanouts[key] = trio.Event()
        try:
            by_shard: dict[int, list[str]] = defaultdict(list)
            for user in prepared.members:
                by_shard[server.store.shard_of(user)].append(user)
            results: list[object] = []

            async def one_shard(shard: int, users: list[str]) -> None:
                result = await server.writers[shard].call(FanOut(key, sender, sender_device, users, prepared.ts))
                if isinstance(result, FannedOut):
                    for user, devices in result.devices:
                        server.router.wake(user, devices)
                results.append(result)

            async with trio.open_nursery() as nursery:
                for shard, users in by_shard.items():
                    nursery.start_soon(one_shard, shard, users)
            for result in results:
                if isinstance(result, StoreError):
                    # Step 3 not reached: the sender gets 503 and its retry completes the fan-out.
                    _raise_store(result)
            refs = sum(r.refs for r in results if isinstance(r, FannedOut))
            _raise_store(await server.writer_for_group_body(key).call(CompleteGroupMessage(key, refs)))
            for shard in by_shard:
                server.spawn_submit(server.writers[shard], DropFanOutMarker(key))
        finally:
            del self._fanouts[key]
            done.set()
