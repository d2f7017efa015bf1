"""The relay client library: connect a device, send, receive, ack, reconnect,
every message end-to-end encrypted (profile ``relay-v1``).

Start with :func:`open_client` and :class:`DeviceIdentity`; see ``docs/client.md``
and ``docs/e2e.md``. :func:`open_transport` is the layer below: it moves
payload bytes as given (tests, load generators).
"""

from .client import EndToEnd, RelayClient, open_transport
from .errors import AuthError, ClientError, ConnectionClosed, RequestError, SendError
from .identity import DeviceIdentity, auth_signature
from .keystore import KeyStore
from .receipts import ReceiptCounts, ReceiptTally
from .secure import SecureClient, open_client
from .types import Entry, Event, GroupInfo, Message, Receipt, Signal

__all__ = [
    "AuthError",
    "ClientError",
    "ConnectionClosed",
    "DeviceIdentity",
    "EndToEnd",
    "Entry",
    "Event",
    "GroupInfo",
    "KeyStore",
    "Message",
    "Receipt",
    "ReceiptCounts",
    "ReceiptTally",
    "RelayClient",
    "RequestError",
    "SecureClient",
    "SendError",
    "Signal",
    "auth_signature",
    "open_client",
    "open_transport",
]
