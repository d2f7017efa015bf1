"""The relay client library: connect a device, send, receive, ack, reconnect.

Start with :func:`open_client` and :class:`DeviceIdentity`; see ``docs/client.md``.
"""

from .client import RelayClient, open_client
from .errors import AuthError, ClientError, ConnectionClosed, RequestError, SendError
from .identity import DeviceIdentity, auth_signature
from .receipts import ReceiptCounts, ReceiptTally
from .types import Entry, Event, GroupInfo, Message, Receipt, Signal

__all__ = [
    "AuthError",
    "ClientError",
    "ConnectionClosed",
    "DeviceIdentity",
    "Entry",
    "Event",
    "GroupInfo",
    "Message",
    "Receipt",
    "ReceiptCounts",
    "ReceiptTally",
    "RelayClient",
    "RequestError",
    "SendError",
    "Signal",
    "auth_signature",
    "open_client",
]
