"""Parked connections: idle authenticated clients that own no task and no buffer.

An authenticated connection with nothing to read, write or wait for, and no
bytes from its client for ``park_after_s``, hands its socket to the
:class:`ParkingLot` and its tasks end. What stays is a
:class:`ParkedConnection` (a slotted object: file descriptor, user, device,
acked seq, idle deadline) in the router, where a live one would be.

One watcher task waits on an epoll set holding every parked socket
(``trio.lowlevel.wait_readable`` on the epoll's own descriptor). When a
parked client sends bytes, or the relay has something for it (a wake-up, a
signal, a replacement), the lot *revives* it: a fresh
:class:`~relay.server.connection.Connection` resumes the session on the same
socket, in READY state, its window starting after the acked seq. Parked
connections past their idle deadline are closed (1001) by the watcher.

The lot does not build that Connection itself (it sits below the
connection module): the server hands it ``resume``, which builds one and
starts serving it.

Measured per parked connection: the object, its idle-deadline heap entry and
the user name (0.3 KiB of Python objects), slots in the lot's and the
router's tables, and an epoll entry in the kernel (see docs/benchmarks.md,
``idle``).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import select
import socket
import struct
from collections.abc import Callable
from typing import Protocol

import trio

from relay.errors import CLOSE_GOING_AWAY
from relay.server.context import ServerContext
from relay.server.memory import HeapTrimmer
from relay.server.router import Routable
from relay.store.base import InboxEntry

log = logging.getLogger(__name__)


class Revived(Routable, Protocol):
    """The live connection a parked one became."""

    def begin_close(self, code: int, reason: str = "") -> None: ...


# Start a live connection resuming the parked session on the stream; the
# server builds it and starts serving it.
Resume = Callable[[trio.SocketStream, "ParkedConnection"], Revived]


class ParkedConnection:
    """A parked session (see the module docstring); implements the router's Routable."""

    __slots__ = (
        "lot", "fd", "user", "device", "acked", "idle_deadline", "signals", "revived", "revive_requested", "registered",
    )

    def __init__(self, lot: ParkingLot, user: str, device: int, acked: int, idle_deadline: float) -> None:
        self.lot = lot
        self.fd = -1
        self.user: str | None = user
        self.device: int | None = device
        self.acked = acked
        self.idle_deadline = idle_deadline
        # Signals that arrived while the socket was being handed over.
        self.signals: list[bytes] | None = None
        self.revived: Revived | None = None
        # Set when something needs the session while its socket is still
        # being handed over; park() then revives it at once.
        self.revive_requested = False
        self.registered = False

    def _revive(self) -> Revived | None:
        return self.revived if self.revived is not None else self.lot.revive(self)

    def wake(self) -> None:
        self._revive()

    def offer(self, entry: InboxEntry) -> None:
        # The entry is in the store; the revived pump reads it from there.
        self._revive()

    def push_ephemeral(self, frame: bytes) -> bool:
        conn = self._revive()
        if conn is None:
            if self.signals is None:
                self.signals = []
            self.signals.append(frame)
            return True
        return conn.push_ephemeral(frame)

    def replace(self) -> None:
        conn = self._revive()
        if conn is not None:
            conn.replace()

    def abort(self) -> None:
        self.lot.drop(self, rst=True)


class ParkingLot:
    """The parked connections and their watcher; ``resume`` revives one (see the module docstring)."""

    def __init__(self, ctx: ServerContext, heap: HeapTrimmer, resume: Resume) -> None:
        self.ctx = ctx
        self._heap = heap
        self._resume = resume
        self._epoll = select.epoll()
        self._by_fd: dict[int, ParkedConnection] = {}
        self._deadlines: list[tuple[float, int, int]] = []  # (deadline, fd, id(parked))
        self._changed = trio.Event()
        self.parked_total = 0
        self.revived_total = 0

    def __len__(self) -> int:
        return len(self._by_fd)

    def statistics(self) -> dict[str, int]:
        return {"parked": len(self._by_fd), "parked_total": self.parked_total, "revived_total": self.revived_total}

    def reserve(self, user: str, device: int, acked: int, idle_deadline: float) -> ParkedConnection:
        """Step 1 of parking, synchronous: the router points at the parked object
        from now on, so no wake-up can reach the connection being torn down."""
        parked = ParkedConnection(self, user, device, acked, idle_deadline)
        self.ctx.router.attach(parked, user, device)
        return parked

    def park(self, parked: ParkedConnection, fd: int) -> None:
        """Step 2: the connection's tasks are gone; watch its socket."""
        parked.fd = fd
        if parked.revive_requested or parked.signals:
            # Something arrived during the hand-over: serve it at once.
            self._start(parked)
            return
        try:
            self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
        except OSError:
            self._close_fd(fd, rst=True)
            self.ctx.router.detach(parked, parked.user or "", parked.device or 0)
            return
        parked.registered = True
        self._by_fd[fd] = parked
        heapq.heappush(self._deadlines, (parked.idle_deadline, fd, id(parked)))
        self.parked_total += 1
        self._heap.note_parked()
        self._changed.set()

    def revive(self, parked: ParkedConnection) -> Revived | None:
        """Resume ``parked`` on a new Connection; None while its hand-over is still running."""
        if parked.fd < 0:
            # Still being handed over: park() revives it as soon as it can.
            parked.revive_requested = True
            return None
        if parked.registered:
            self._unregister(parked)
        return self._start(parked)

    def _start(self, parked: ParkedConnection) -> Revived:
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=parked.fd))
        # Its task is only scheduled: it runs after the attach and signals below.
        conn = self._resume(trio.SocketStream(sock), parked)
        parked.revived = conn
        assert parked.user is not None and parked.device is not None
        self.ctx.router.attach(conn, parked.user, parked.device)
        if parked.signals:
            for frame in parked.signals:
                conn.push_ephemeral(frame)
            parked.signals = None
        self.revived_total += 1
        return conn

    def _unregister(self, parked: ParkedConnection) -> None:
        self._by_fd.pop(parked.fd, None)
        parked.registered = False
        with contextlib.suppress(OSError):
            self._epoll.unregister(parked.fd)

    def drop(self, parked: ParkedConnection, rst: bool = False, close_frame: bytes | None = None) -> None:
        """Close a parked connection without reviving it."""
        revived = parked.revived
        if revived is not None:
            if rst:
                revived.abort()
            else:
                revived.begin_close(CLOSE_GOING_AWAY)
            return
        if parked.fd < 0:
            return  # mid hand-over (its revival serves it) or already closed
        if parked.registered:
            self._unregister(parked)
        if close_frame is not None:
            # Non-blocking, best effort: a close frame fits any socket buffer.
            with contextlib.suppress(OSError):
                _send_nonblocking(parked.fd, close_frame)
        self._close_fd(parked.fd, rst=rst)
        parked.fd = -2
        self.ctx.router.detach(parked, parked.user or "", parked.device or 0)

    def _close_fd(self, fd: int, rst: bool) -> None:
        sock = socket.socket(fileno=fd)
        if rst:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def close_all(self, close_frame: bytes) -> None:
        """Shutdown: every parked connection gets ``close_frame`` and is closed."""
        for parked in list(self._by_fd.values()):
            self.drop(parked, close_frame=close_frame)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The watcher: revive parked connections with input, expire idle ones."""
        task_status.started()
        epoll_fd = self._epoll.fileno()
        try:
            while True:
                timeout = self._deadlines[0][0] - trio.current_time() if self._deadlines else 3600.0
                if self._by_fd:
                    with trio.move_on_after(max(0.0, timeout)):
                        await trio.lowlevel.wait_readable(epoll_fd)
                else:
                    self._changed = trio.Event()
                    with trio.move_on_after(max(0.0, timeout)):
                        await self._changed.wait()
                for fd, _events in self._epoll.poll(0):
                    parked = self._by_fd.get(fd)
                    if parked is not None:
                        self._unregister(parked)
                        self._start(parked)
                self._expire(trio.current_time())
        finally:
            self._epoll.close()

    def _expire(self, now: float) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _deadline, fd, ident = heapq.heappop(deadlines)
            parked = self._by_fd.get(fd)
            if parked is not None and id(parked) == ident:
                self.drop(parked, close_frame=self.ctx.close_frame(CLOSE_GOING_AWAY, "idle timeout"))


def _send_nonblocking(fd: int, data: bytes) -> None:
    sock = socket.socket(fileno=fd)
    try:
        sock.setblocking(False)
        sock.send(data)
    finally:
        sock.detach()
