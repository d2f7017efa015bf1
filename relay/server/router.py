"""Who is online: (user, device) -> connection, and the wake-ups that follow a commit.

The router never holds message data; it only tells a connection's delivery
pump that its inbox has something new, or hands it an ephemeral signal.
"""

from __future__ import annotations

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
        self._online: dict[str, dict[int, Routable]] = {}

    def attach(self, conn: Routable, user: str, device: int) -> Routable | None:
        """Make ``conn`` the connection of (user, device); return the one it replaces."""
        devices = self._online.setdefault(user, {})
        old = devices.get(device)
        devices[device] = conn
        return old

    def detach(self, conn: Routable, user: str, device: int) -> None:
        devices = self._online.get(user)
        if devices is not None and devices.get(device) is conn:
            del devices[device]
            if not devices:
                del self._online[user]

    def connection(self, user: str, device: int) -> Routable | None:
        devices = self._online.get(user)
        return None if devices is None else devices.get(device)

    def wake(self, user: str, devices: tuple[int, ...] | list[int] | None = None) -> None:
        """New inbox entries for ``user`` (these devices, or all)."""
        online = self._online.get(user)
        if not online:
            return
        if devices is None:
            for conn in online.values():
                conn.wake()
            return
        for device in devices:
            target = online.get(device)
            if target is not None:
                target.wake()

    def deliver(self, user: str, entries: tuple[tuple[int, InboxEntry], ...]) -> None:
        """Entries just committed for ``user``: hand each to its device's pump, if online."""
        online = self._online.get(user)
        if not online:
            return
        for device, entry in entries:
            conn = online.get(device)
            if conn is not None:
                conn.offer(entry)

    def devices_online(self, user: str) -> list[Routable]:
        return list(self._online.get(user, {}).values())

    def count(self) -> int:
        return sum(len(d) for d in self._online.values())

    def all(self) -> list[Routable]:
        return [c for d in self._online.values() for c in d.values()]
