"""The data path's event loop inside trio: one epoll set, one task, one wake-up per turn.

trio wakes a task per ready socket and a task per finished commit: at paced
traffic (one message per wake-up) those switches, and the epoll
re-registration behind every ``wait_readable``, are most of a message's
cost. The :class:`Reactor` holds the sockets of live connections waiting for
input (level-triggered, registered once) and an eventfd the commit threads
signal, in an epoll set of its own; trio sees only that set's descriptor.
Each wake-up is one :meth:`turn`:

1. every ready socket's handler runs (read, parse, serve what needs no
   waiting; see :meth:`relay.server.connection.Connection.on_readable`);
2. every commit that finished runs its callbacks (the writers' completions,
   posted from their threads through :meth:`post`);
3. timers that are due run (a small task sleeps until the earliest one and
   then runs a turn itself);
4. work deferred with :meth:`soon` runs (the writers hand their next batch
   to the commit threads here, so a batch gathers everything of this turn);
5. the output batch closes: every connection with new output writes it with
   one ``send`` (:mod:`relay.server.flush`).

Everything here runs on trio's thread, synchronously, between trio's own
tasks; the reactor never blocks and never awaits inside a turn. trio stays
the supervisor: the reactor is a task in the server's nursery, cancelled
like any other, and a connection's reader task is asleep (not gone) while
the reactor serves its socket, so cancel scopes and timers keep working.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import os
import select
import sys
from collections import deque
from collections.abc import Callable
from types import ModuleType
from typing import Any

import trio

from relay.fastpath import load_twin
from relay.server.flush import OutputBatch

log = logging.getLogger(__name__)

# Ready descriptors taken per epoll_wait; more wait for the next turn.
MAX_EVENTS = 1024
_EVENTFD_ONE = (1).to_bytes(8, sys.byteorder)  # an eventfd counter is a native uint64


class Timer:
    """A call :meth:`Reactor.call_later` scheduled; :meth:`cancel` drops it."""

    __slots__ = ("deadline", "fn", "cancelled")

    def __init__(self, deadline: float, fn: Callable[[], None]) -> None:
        self.deadline = deadline
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Reactor:
    """See the module docstring."""

    def __init__(self, output_batch: OutputBatch | None = None, io: ModuleType | None = None) -> None:
        self.output_batch = output_batch if output_batch is not None else OutputBatch()
        # The system calls of a turn: relay.server._io or its pure twin.
        self.io = io if io is not None else load_io()
        self._epoll = select.epoll()
        self._handlers: dict[int, Callable[[], None]] = {}
        self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._eventfd, select.EPOLLIN)
        # Filled by other threads; deque append and popleft are atomic.
        self._posted: deque[tuple[Callable[[Any], None], Any]] = deque()
        # True from the eventfd write until the turn that reads it: posts in
        # between need no write of their own.
        self._signalled = False
        self._soon: list[Callable[[], None]] = []
        self._timers: list[tuple[float, int, Timer]] = []
        self._timer_ids = itertools.count()
        # The timer task's sleep; its deadline is the earliest timer's.
        self._timer_scope: trio.CancelScope | None = None
        self._in_turn = False
        self._closed = False
        self.turns = 0

    # --- registration (trio's thread) ----------------------------------------

    def watch(self, fd: int, on_readable: Callable[[], None]) -> None:
        """Call ``on_readable()`` in every turn while ``fd`` has input (level-triggered)."""
        self._handlers[fd] = on_readable
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except FileExistsError:
            self._epoll.modify(fd, select.EPOLLIN)

    def unwatch(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    def watching(self) -> int:
        return len(self._handlers)

    def soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` at the end of the current turn (or of the next one, outside a turn)."""
        self._soon.append(fn)
        if not self._in_turn and len(self._soon) == 1:
            self._signal()

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        """Run ``fn()`` in the first turn at least ``delay`` seconds from now."""
        timer = Timer(trio.current_time() + delay, fn)
        heapq.heappush(self._timers, (timer.deadline, next(self._timer_ids), timer))
        scope = self._timer_scope
        if scope is not None and timer.deadline < scope.deadline:
            scope.deadline = timer.deadline
        return timer

    # --- from any thread ------------------------------------------------------

    def post(self, fn: Callable[[Any], None], arg: Any) -> None:
        """Run ``fn(arg)`` in the next turn. Thread-safe: the commit threads call it."""
        self._posted.append((fn, arg))
        self._signal()

    def _signal(self) -> None:
        if not self._signalled and not self._closed:
            self._signalled = True
            # Holding the GIL (compiled twin): a commit thread goes on to
            # block on its queue, where it lets go of the GIL anyway.
            self.io.write_some(self._eventfd, _EVENTFD_ONE)

    # --- the loop (trio's thread) ---------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        epoll_fd = self._epoll.fileno()
        try:
            async with trio.open_nursery() as nursery:
                # Timers wait in a task of their own: a cancel scope around
                # every epoll wait would cost more than the timers save.
                nursery.start_soon(self._run_timers)
                task_status.started()
                while True:
                    await trio.lowlevel.wait_readable(epoll_fd)
                    self.turn()
        finally:
            self.close()

    async def _run_timers(self) -> None:
        timers = self._timers
        while True:
            while timers and timers[0][2].cancelled:
                heapq.heappop(timers)
            with trio.CancelScope(deadline=timers[0][0] if timers else math.inf) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            self.turn()

    def turn(self) -> None:
        """Serve everything ready now; see the module docstring."""
        self.turns += 1
        self._in_turn = True
        try:
            with self.output_batch:
                for fd, _events in self.io.ready(self._epoll, MAX_EVENTS):
                    if fd == self._eventfd:
                        self._take_signal()
                        continue
                    handler = self._handlers.get(fd)
                    if handler is not None:
                        _guarded(handler)
                self._run_posted()
                self._run_due_timers()
                while self._soon:
                    soon = self._soon
                    self._soon = []
                    for fn in soon:
                        _guarded(fn)
        finally:
            self._in_turn = False

    def _take_signal(self) -> None:
        # Read, then clear, then (later in the turn) drain the posts: a post
        # before the clear is drained, a post after it writes again.
        self.io.read_some(self._eventfd, 8)
        self._signalled = False

    def _run_posted(self) -> None:
        posted = self._posted
        while posted:
            fn, arg = posted.popleft()
            try:
                fn(arg)
            except Exception:  # one failing completion must not stop the others
                log.exception("reactor callback failed")

    def _run_due_timers(self) -> None:
        timers = self._timers
        if not timers:
            return
        now = trio.current_time()
        while timers and timers[0][0] <= now:
            timer = heapq.heappop(timers)[2]
            if not timer.cancelled:
                _guarded(timer.fn)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._handlers.clear()
        self._epoll.close()
        os.close(self._eventfd)


def load_io(name: str | None = None) -> ModuleType:
    """``relay.server._io`` (compiled) or its pure twin; ``name`` as for
    :func:`relay.fastpath.load_twin`."""
    return load_twin("relay.server._io", "relay.server._io_py", name)


def _guarded(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:  # a bug in one handler must not stop the data path
        log.exception("reactor handler failed")
