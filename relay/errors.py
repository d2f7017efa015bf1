"""The relay's error tree.

::

    RelayError                      base of everything raised on purpose
    ├── FrameError                  the peer sent a bad frame: answer ERROR(code) (maybe close)
    ├── StoreError                  the store refused a write
    │   └── StoreFullError          map or disk full: answer 503, keep serving reads and acks
    └── ConfigError                 bad settings given by the operator

Errors are split by blame as in h11: ``FrameError`` is the peer's fault and
carries the reply to send; ``StoreError`` is ours (or the disk's).
"""

from __future__ import annotations

# Protocol error codes (PROTOCOL.md, "Error codes").
BAD_REQUEST = 400
UNAUTHORIZED = 401
FORBIDDEN = 403
NOT_FOUND = 404
CONFLICT = 409
TOO_LARGE = 413
RATE_LIMITED = 429
INTERNAL = 500
UNAVAILABLE = 503

# WebSocket close codes used by the relay.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_REPLACED = 4409


class RelayError(Exception):
    """Base of every error the relay raises on purpose."""


class FrameError(RelayError):
    """A frame the peer sent cannot be served.

    ``code`` is the protocol error code, ``ref`` what ERROR's ``ref`` names
    (a msg_id, a frame type number or None), ``close`` the WebSocket close
    code to send after the ERROR, or None to keep the connection open.
    ``malformed`` counts toward the per-connection limit of malformed frames.
    ``req_id`` is set when the bad frame is a REQ with a readable req_id: the
    answer is then ``RES ok=false {code, reason}`` instead of ERROR.
    """

    def __init__(
        self,
        code: int,
        reason: str,
        ref: object = None,
        close: int | None = None,
        malformed: bool = False,
        req_id: int | None = None,
    ) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason
        self.ref = ref
        self.close = close
        self.malformed = malformed
        # Set for a malformed REQ whose req_id was readable: answer RES ok=false.
        self.req_id = req_id


class StoreError(RelayError):
    """The store could not do what was asked."""


class StoreFullError(StoreError):
    """The LMDB map or the disk is full; writes fail, reads and deletes go on."""


class ConfigError(RelayError):
    """A setting is invalid; the message says which and why."""
