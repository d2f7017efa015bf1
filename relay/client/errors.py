"""The client library's exceptions.

::

    ClientError                 base of everything raised by relay.client
    ├── AuthError               ERROR before READY: 401 bad key / unknown device,
    │                           409 user taken, 403 token refused, 400 bad name
    ├── SendError               ERROR (or a local check) about one SEND/SEND_GROUP
    ├── RequestError            RES ok=false, or a request that timed out (code 408)
    └── ConnectionClosed        the connection is gone for good: closed by the user,
                                replaced by the same device elsewhere (4409), or
                                lost with ``reconnect=False``; also raised by a
                                request that was on the wire when the link dropped

Every exception carries ``code`` (a protocol error code, a WebSocket close code,
or 0 when there is none) and ``reason`` (human readable).
"""

from __future__ import annotations

__all__ = ["AuthError", "ClientError", "ConnectionClosed", "RequestError", "SendError"]


class ClientError(Exception):
    """Base class of every error raised by :mod:`relay.client`."""

    def __init__(self, code: int = 0, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        if self.code:
            return f"{self.reason} (code {self.code})" if self.reason else f"code {self.code}"
        return self.reason or type(self).__name__


class AuthError(ClientError):
    """The relay refused AUTH or REGISTER (ERROR frame before READY)."""


class SendError(ClientError):
    """A SEND was refused (ERROR whose ``ref`` is its msg_id) or could not be built."""


class RequestError(ClientError):
    """A REQ was answered ``ok=false`` (``code``/``reason`` from the result), or
    timed out on the client (``code`` 408)."""


class ConnectionClosed(ClientError):
    """The connection is closed for good; ``code`` is the WebSocket close code
    when the relay closed it (e.g. 4409 "connected elsewhere")."""
