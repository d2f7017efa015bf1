"""Who is online: (user, device) -> connection, and the wake-ups that follow a commit.

The router never holds message data; it only tells a connection's delivery
pump that its inbox has something new, or hands it an ephemeral signal.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from relay.store.base import InboxEntry


class Routable(Protocol):
    user: str | None
    device: int | None

    def wake(self) -> None: ...

    def offer(self, entry: InboxEntry) -> None: ...

    def push_ephemeral(self, frame: bytes) -> bool: ...

    def replace(self) -> None: ...

    def abort(self) -> None: ...


class Router:
    def __init__(self) -> None:
        # user -> the connection of its one online device (whose ``device``
        # says which), or a dict by device once it has had several online.
        # Most users have one, and a dict each was a third of the memory of a
        # parked connection.
        self._online: dict[str, Routable | dict[int, Routable]] = {}

    def attach(self, conn: Routable, user: str, device: int) -> Routable | None:
        """Make ``conn`` the connection of (user, device); return the one it replaces."""
        online = self._online
        current = online.get(user)
        if current is None:
            online[user] = conn if conn.device == device else {device: conn}
            return None
        if isinstance(current, dict):
            old = current.get(device)
            current[device] = conn
            return old
        if current.device == device:
            online[user] = conn if conn.device == device else {device: conn}
            return current
        assert current.device is not None
        online[user] = {current.device: current, device: conn}
        return None

    def detach(self, conn: Routable, user: str, device: int) -> None:
        online = self._online
        current = online.get(user)
        if current is conn:
            if conn.device == device:
                del online[user]
        elif isinstance(current, dict) and current.get(device) is conn:
            del current[device]
            if not current:
                del online[user]

    def connection(self, user: str, device: int) -> Routable | None:
        current = self._online.get(user)
        if isinstance(current, dict):
            return current.get(device)
        return current if current is not None and current.device == device else None

    def _devices(self, user: str) -> Iterable[Routable]:
        current = self._online.get(user)
        if current is None:
            return ()
        if isinstance(current, dict):
            return current.values()
        return (current,)

    def wake(self, user: str, devices: tuple[int, ...] | list[int] | None = None) -> None:
        """New inbox entries for ``user`` (these devices, or all)."""
        if devices is None:
            for conn in self._devices(user):
                conn.wake()
            return
        for device in devices:
            target = self.connection(user, device)
            if target is not None:
                target.wake()

    def deliver(self, user: str, entries: tuple[tuple[int, InboxEntry], ...]) -> None:
        """Entries just committed for ``user``: hand each to its device's pump, if online."""
        current = self._online.get(user)
        if current is None:
            return
        if isinstance(current, dict):
            for device, entry in entries:
                conn = current.get(device)
                if conn is not None:
                    conn.offer(entry)
            return
        only = current.device
        for device, entry in entries:
            if device == only:
                current.offer(entry)

    def devices_online(self, user: str) -> list[Routable]:
        return list(self._devices(user))

    def count(self) -> int:
        return sum(len(c) if isinstance(c, dict) else 1 for c in self._online.values())

    def all(self) -> list[Routable]:
        return [conn for user in self._online for conn in self._devices(user)]
