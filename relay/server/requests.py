"""REQ/RES control operations (off the hot path, maps for readability).

Each op is a method ``op_<name with . as _>`` taking the caller's connection
and the args map and returning the result; a :class:`FrameError` becomes
``RES ok=false {code, reason}``. Unknown ops are 400, like a malformed REQ.
Ops that write pass the writer's result through
:func:`relay.server.wire_errors.raise_for_result`, where store failures
become wire codes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from relay.errors import BAD_REQUEST, NOT_FOUND, FrameError
from relay.protocol import frames
from relay.server.context import Caller, ServerContext

Op = Callable[[Caller, dict[Any, Any]], Awaitable[object]]


def user_arg(args: dict[Any, Any], name: str = "user") -> str:
    value = args.get(name)
    if not frames.is_user(value):
        raise FrameError(BAD_REQUEST, f"{name} must be a user name")
    return value  # type: ignore[return-value]


class RequestHandler:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self._ops: dict[str, Op] = {
            "devices.list": self.devices_list,
        }

    def register(self, name: str, op: Op) -> None:
        """Add an op (later features plug in here: groups, keys, media, push)."""
        self._ops[name] = op

    async def serve(self, conn: Caller, op: str, args: dict[Any, Any]) -> object:
        handler = self._ops.get(op)
        if handler is None:
            raise FrameError(BAD_REQUEST, f"unknown op {op[:64]!r}")
        return await handler(conn, args)

    async def devices_list(self, conn: Caller, args: dict[Any, Any]) -> object:
        user = user_arg(args)
        record = self.ctx.store.get_user(user)
        if record is None:
            raise FrameError(NOT_FOUND, f"no such user {user}")
        return {"devices": [{"device": d, "identity_key": k} for d, k in sorted(record.devices.items())]}
