"""A single-threaded epoll loop over non-blocking WebSocket client connections.

The load generator must cost much less CPU than the relay it measures, so
there is no framework here: level-triggered epoll, one ``recv`` per readiness
event, writes tried directly and queued only when the kernel buffer is full.
Roles (sender, receiver, ...) get whole WebSocket messages and decide what to
write back; they batch replies into one WebSocket message per read.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Callable
from typing import Protocol

from bench.proto import Session
from bench.wsclient import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    ServerFrameParser,
    encode_control,
)

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR | select.EPOLLHUP

RECV_SIZE = 1 << 18
perf_counter_ns = time.perf_counter_ns


class ConnectionLost(Exception):
    """The relay closed a connection or broke the protocol during a run."""


class Role(Protocol):
    def on_messages(self, conn: Conn, messages: list[bytes], now_ns: int) -> None: ...


class BufferedWriter:
    """Writes to a non-blocking socket, holding what the kernel refuses until
    :class:`Engine` sees EPOLLOUT; shared by every protocol's connection."""

    __slots__ = ("sock", "fd", "out", "engine", "name")

    sock: socket.socket
    fd: int
    out: bytes
    engine: Engine
    name: str

    def write(self, data: bytes) -> None:
        """Send now; whatever the kernel does not take waits for EPOLLOUT."""
        if self.out:
            self.out += data
            return
        try:
            n = self.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            raise ConnectionLost(f"{self.name}: send failed: {exc}") from exc
        if n < len(data):
            self.out = data[n:]
            self.engine.ep.modify(self.fd, EPOLLIN | EPOLLOUT)

    def flush(self) -> None:
        if not self.out:
            return
        try:
            n = self.sock.send(self.out)
        except BlockingIOError:
            return
        except OSError as exc:
            raise ConnectionLost(f"{self.name}: send failed: {exc}") from exc
        self.out = self.out[n:]
        if not self.out:
            self.engine.ep.modify(self.fd, EPOLLIN)


class Conn(BufferedWriter):
    """One non-blocking client connection driven by :class:`Engine`."""

    __slots__ = ("parser", "session", "role", "closed")

    def __init__(self, engine: Engine, session: Session, role: Role) -> None:
        self.engine = engine
        self.session = session
        self.sock = session.sock
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.parser: ServerFrameParser = session.parser
        self.role = role
        self.out = b""
        self.name = session.user
        self.closed = False

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
            now_ns = perf_counter_ns()  # arrival time of everything in this read
        except BlockingIOError:
            return
        except OSError as exc:
            raise ConnectionLost(f"{self.name}: recv failed: {exc}") from exc
        if not data:
            raise ConnectionLost(f"{self.name}: relay closed the connection")
        messages: list[bytes] = []
        for op, payload in self.parser.feed(data):
            if op == OP_BINARY:
                messages.append(payload)
            elif op == OP_PING:
                self.write(encode_control(OP_PONG, payload))
            elif op == OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                raise ConnectionLost(f"{self.name}: relay sent close {code} {payload[2:]!r}")
            elif op == OP_PONG:
                pass
            else:
                raise ConnectionLost(f"{self.name}: unexpected opcode {op}")
        if messages:
            self.role.on_messages(self, messages, now_ns)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.setblocking(False)
            self.sock.send(encode_control(OP_CLOSE, (1000).to_bytes(2, "big")))
        except OSError:
            pass
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class Engine:
    """Runs :class:`Conn` objects until a deadline, calling ``tick`` between polls."""

    def __init__(self) -> None:
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}

    def add(self, session: Session, role: Role) -> Conn:
        conn = Conn(self, session, role)
        self.conns[conn.fd] = conn
        self.ep.register(conn.fd, EPOLLIN)
        return conn

    def run(
        self,
        deadline: float,
        tick: Callable[[float], float | None],
        max_wait: float = 0.05,
        until: Callable[[], bool] | None = None,
    ) -> bool:
        """Poll until ``time.monotonic() >= deadline`` (returns False) or until
        ``until()`` is true (checked before each poll; returns True). ``tick(now)``
        runs before each poll and returns how long the loop may sleep (``None`` =
        ``max_wait``)."""
        conns = self.conns
        poll = self.ep.poll
        monotonic = time.monotonic
        while True:
            if until is not None and until():
                return True
            now = monotonic()
            if now >= deadline:
                return False
            wait = tick(now)
            if wait is None or wait > max_wait:
                wait = max_wait
            wait = min(wait, deadline - now)
            for fd, ev in poll(wait if wait > 0 else 0):
                conn = conns[fd]
                if ev & EPOLLOUT:
                    conn.flush()
                if ev & (EPOLLIN | EPOLLERR):
                    conn.on_readable()

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()
        self.ep.close()
