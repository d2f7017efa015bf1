"""The per-connection session state machine, sans I/O.

A :class:`Session` is fed the payload of each binary WebSocket message and
returns, in order, the client events to serve and the :class:`FrameError`
replies for the frames that were bad. It enforces what the protocol says
about a connection on its own: nothing but AUTH/REGISTER before READY, the
frames-per-message limit, and the malformed-frame budget. It does not know
about users, the store or sockets; the server tells it :meth:`authenticated`
once an AUTH/REGISTER succeeded.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import cast

from relay.errors import (
    BAD_REQUEST,
    CLOSE_POLICY,
    UNAUTHORIZED,
    FrameError,
)
from relay.protocol import frames
from relay.protocol.frames import ClientEvent

MAX_MALFORMED = 16


class SessionState(enum.Enum):
    AWAIT_AUTH = "await_auth"
    AUTHENTICATING = "authenticating"
    READY = "ready"
    CLOSED = "closed"


class Session:
    """Feed :meth:`receive_message` each binary message; serve what it returns.

    Items returned are either a client event (``frames.Auth``, ``frames.Send``,
    ...) or a :class:`FrameError` to answer with ERROR. When a FrameError has
    ``close`` set, the caller sends the ERROR, closes with that code, and
    ignores the rest; the session is then CLOSED and returns nothing more.
    """

    # One per live connection: slotted, it is half the size.
    __slots__ = (
        "max_frames_per_message", "max_message_size", "_decode_sends_and_acks", "state", "malformed", "user", "device",
    )

    def __init__(
        self,
        max_frames_per_message: int = 1024,
        max_message_size: int = 1 << 20,
        decode_sends_and_acks: Callable[[bytes, int], list[frames.Send | frames.Ack] | None] | None = None,
    ) -> None:
        self.max_frames_per_message = max_frames_per_message
        self.max_message_size = max_message_size
        # The fast path's decoder for the two frames clients send most (see
        # relay._fastpath_py.decode_sends_and_acks): once READY, a message it
        # decodes skips the general path, which gives the same events.
        self._decode_sends_and_acks = decode_sends_and_acks
        self.state = SessionState.AWAIT_AUTH
        self.malformed = 0
        self.user: str | None = None
        self.device: int | None = None

    def authenticated(self, user: str, device: int) -> None:
        """AUTH or REGISTER succeeded: every frame type is allowed from now on."""
        self.state = SessionState.READY
        self.user = user
        self.device = device

    def close(self) -> None:
        self.state = SessionState.CLOSED

    def receive_message(self, payload: bytes) -> list[ClientEvent | FrameError]:
        state = self.state
        if state is SessionState.READY and self._decode_sends_and_acks is not None:
            events = self._decode_sends_and_acks(payload, self.max_frames_per_message)
            if events is not None:
                return cast(list[ClientEvent | FrameError], events)
        elif state is SessionState.CLOSED:
            return []
        objs, tail_error = frames.unpack_frames(payload, self.max_frames_per_message, self.max_message_size)
        out: list[ClientEvent | FrameError] = []
        for obj in objs:
            item = self._one(obj)
            out.append(item)
            if isinstance(item, FrameError) and item.close is not None:
                self.state = SessionState.CLOSED
                return out
        if tail_error is not None:
            out.append(self._count(tail_error))
        return out

    def _count(self, error: FrameError) -> FrameError:
        if error.malformed:
            self.malformed += 1
            if self.malformed > MAX_MALFORMED and error.close is None:
                error.close = CLOSE_POLICY
                error.reason += "; too many malformed frames"
        if error.close is not None:
            self.state = SessionState.CLOSED
        return error

    def _one(self, obj: object) -> ClientEvent | FrameError:
        if self.state is SessionState.READY:
            try:
                event = frames.parse_frame(obj)
            except FrameError as error:
                # A second AUTH/REGISTER is refused like any other bad frame:
                # the session it would replace is healthy, so it stays open.
                error.close = None
                return self._count(error)
            if isinstance(event, frames.Auth | frames.Register):
                return FrameError(BAD_REQUEST, "already authenticated", ref=frames.AUTH if isinstance(event, frames.Auth) else frames.REGISTER)
            return event
        if self.state is SessionState.AWAIT_AUTH:
            ftype = obj[0] if type(obj) is list and obj and type(obj[0]) is int else None
            if ftype not in (frames.AUTH, frames.REGISTER):
                self.state = SessionState.CLOSED
                return FrameError(UNAUTHORIZED, "authenticate first", ref=ftype, close=CLOSE_POLICY)
            try:
                event = frames.parse_frame(obj)
            except FrameError as error:
                error.close = CLOSE_POLICY
                self.state = SessionState.CLOSED
                return error
            self.state = SessionState.AUTHENTICATING
            return event
        # AUTHENTICATING: a second frame before the answer to AUTH/REGISTER.
        self.state = SessionState.CLOSED
        return FrameError(UNAUTHORIZED, "wait for READY", ref=obj[0] if type(obj) is list and obj else None, close=CLOSE_POLICY)
