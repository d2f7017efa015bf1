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
from collections.abc import Callable
from typing import Any

import trio

from relay.errors import (
    BAD_REQUEST,
    CONFLICT,
    INTERNAL,
    NOT_FOUND,
    FrameError,
)
from relay.protocol import frames
from relay.protocol.groups import GroupInfo, check_users, new_group
from relay.server.clock import now_ms
from relay.server.context import Caller, ServerContext
from relay.server.requests import RequestHandler
from relay.server.wire_errors import raise_for_result
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

GROUP_OPS = ("group.add", "group.remove", "group.leave", "group.info", "group.rename", "group.promote", "group.demote")


def new_group_id() -> str:
    return "g." + base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()


class Groups:
    """Registers the ``group.*`` ops on ``requests``; :meth:`send` serves SEND_GROUP."""

    def __init__(self, ctx: ServerContext, requests: RequestHandler) -> None:
        self.ctx = ctx
        self._fanouts: dict[bytes, trio.Event] = {}
        for op in GROUP_OPS:
            requests.register(op, functools.partial(self.change, op=op))
        requests.register("group.create", self.create)

    # --- requests -------------------------------------------------------------

    def _require_users(self, users: list[str]) -> None:
        store = self.ctx.store
        for user in users:
            if store.get_user(user) is None:
                raise FrameError(NOT_FOUND, f"no such user {user}")

    async def create(self, conn: Caller, args: dict[Any, Any]) -> object:
        assert conn.user is not None
        settings = self.ctx.settings
        members = check_users(args.get("members", []))
        self._require_users(members)
        for _ in range(3):
            info = new_group(new_group_id(), conn.user, args.get("name"), members, settings.max_group_members)
            result = await self.ctx.writer_for(info.group).call(CreateGroup(info, now_ms()))
            if isinstance(result, FrameError) and result.code == CONFLICT:
                continue  # 128-bit ids collide only in theory; draw again
            raise_for_result(result)
            await self._notify(info, conn.user, info.members)
            return info.as_result()
        raise FrameError(INTERNAL, "could not allocate a group id")

    async def change(self, conn: Caller, args: dict[Any, Any], op: str = "") -> object:
        assert conn.user is not None
        group = args.get("group")
        if not frames.is_group(group):
            raise FrameError(BAD_REQUEST, "group must be a group id")
        assert isinstance(group, str)
        if op == "group.add":
            self._require_users(check_users(args.get("members")))
        result = await self.ctx.writer_for(group).call(
            ChangeGroup(group, conn.user, op, args, self.ctx.settings.max_group_members)
        )
        raise_for_result(result)
        assert isinstance(result, tuple)
        info, notify = result
        if notify:
            await self._notify(info, conn.user, notify)
        return info.as_result()

    async def _notify(self, info: GroupInfo, actor: str, users: tuple[str, ...]) -> None:
        """EVENT group.changed into every device inbox of ``users``; returns once committed."""
        now = now_ms()
        tail = frames.event_tail("group.changed", info.event_body(actor), now)
        await self.ctx.append_to_users(users, frames.EVENT, frames.EVENT_FIELDS, tail, now)

    # --- SEND_GROUP ---------------------------------------------------------------

    async def send(self, conn: Caller, event: frames.SendGroup, ts: int, done: Callable[[], None]) -> None:
        """Start the three steps for one SEND_GROUP; SENT or ERROR is queued on
        ``conn`` (even if it closed meanwhile) and ``done()`` called at the end.

        Only step 1 is awaited (for queue room). The rest runs in commit
        callbacks, queued as writer follow-ups in commit order, so the
        references of one sender's messages land in every inbox in send order
        however many fan-outs are in flight.
        """
        assert conn.user is not None and conn.device is not None
        prepare = PrepareGroupMessage(event.to, conn.user, conn.device, event.msg_id, event.payload, ts)
        await self.ctx.writer_for(event.to).submit(prepare, functools.partial(self._prepared, conn, event, prepare, done))

    def _prepared(
        self, conn: Caller, event: frames.SendGroup, prepare: PrepareGroupMessage, done: Callable[[], None], result: object
    ) -> None:
        try:
            if isinstance(result, FrameError):
                result.ref = event.msg_id
            raise_for_result(result)
        except FrameError as error:
            error.ref = event.msg_id
            conn.queue_error(error)
            done()
            return
        assert isinstance(result, GroupPrepared)
        if result.complete:
            conn.queue_sent(event.msg_id, result.ts)
            done()
            return
        running = self._fanouts.get(result.body_key)
        if running is not None:
            # A retry while the first attempt still runs: wait for it, then ask again.
            self.ctx.spawn(self._retry_after, running, conn, event, prepare, done)
            return
        self._fan_out(conn, event, prepare, result, done)

    async def _retry_after(
        self, running: trio.Event, conn: Caller, event: frames.SendGroup, prepare: PrepareGroupMessage, done: Callable[[], None]
    ) -> None:
        await running.wait()
        await self.ctx.writer_for(event.to).submit(prepare, functools.partial(self._prepared, conn, event, prepare, done))

    def _fan_out(
        self, conn: Caller, event: frames.SendGroup, prepare: PrepareGroupMessage, prepared: GroupPrepared, done: Callable[[], None]
    ) -> None:
        ctx = self.ctx
        key = prepared.body_key
        finished = self._fanouts[key] = trio.Event()
        by_shard: dict[int, list[str]] = defaultdict(list)
        for user in prepared.members:
            by_shard[ctx.store.shard_of(user)].append(user)
        remaining = len(by_shard)
        refs = 0
        failure: list[object] = []

        def end(error: FrameError | None) -> None:
            del self._fanouts[key]
            finished.set()
            if error is None:
                conn.queue_sent(event.msg_id, prepared.ts)
                for shard in by_shard:
                    ctx.writers[shard].submit_followup(DropFanOutMarker(key))
            else:
                error.ref = event.msg_id
                conn.queue_error(error)
            done()

        def completed(result: object) -> None:
            try:
                raise_for_result(result)
            except FrameError as error:
                end(error)
                return
            end(None)

        def one_shard_done(result: object) -> None:
            nonlocal remaining, refs
            remaining -= 1
            if isinstance(result, FannedOut):
                refs += result.refs
                router = ctx.router
                for user, entries in result.entries:
                    if entries:
                        router.deliver(user, entries)
                    else:
                        router.wake(user)
            else:
                failure.append(result)
            if remaining:
                return
            if failure:
                # Step 3 not reached: the sender gets the error and its retry
                # completes the fan-out (the shards done are skipped).
                try:
                    raise_for_result(failure[0])
                except FrameError as error:
                    end(error)
                return
            ctx.writer_for_group_body(key).submit_followup(CompleteGroupMessage(key, refs), completed)

        if not by_shard:
            ctx.writer_for_group_body(key).submit_followup(CompleteGroupMessage(key, 0), completed)
            return
        for shard, users in by_shard.items():
            fan_out = FanOut(key, prepare.sender, prepare.sender_device, users, prepared.ts, prepared.tail)
            ctx.writers[shard].submit_followup(fan_out, one_shard_done)
