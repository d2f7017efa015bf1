"""Pure-Python twin of :mod:`relay.server._io`: the reactor's system calls.

The reactor and the connections it serves make a handful of non-blocking
system calls per turn: take the ready descriptors, read a socket, write a
socket. Python's own ``os.read``, ``os.write`` and ``epoll.poll`` release
the GIL around each, and every release lets a commit thread that waits for
the GIL in: two context switches on a one-core relay, at every call. The
compiled twin makes the same calls holding the GIL (none of them can block:
the descriptors are non-blocking and the poll does not wait), so the GIL
changes hands when the loop waits, once per turn. This module is the
readable reference; one test suite runs against both.
"""

from __future__ import annotations

import os
import select

IMPLEMENTATION = "pure"


def read_some(fd: int, size: int) -> bytes | None:
    """Up to ``size`` bytes from the non-blocking ``fd``: b"" at end of file,
    None when nothing is there. Other failures raise ``OSError`` (its
    subclass for the errno: ``ConnectionResetError``, ...)."""
    if size <= 0:
        raise ValueError("size must be positive")
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return None


def write_some(fd: int, data: bytes) -> int:
    """Write what the non-blocking ``fd`` takes of ``data`` now; how many bytes
    (0 when it takes nothing). Failures raise ``OSError``."""
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0


def ready(epoll: select.epoll, max_events: int) -> list[tuple[int, int]]:
    """The (fd, events) pairs of ``epoll`` ready now, without waiting."""
    if max_events <= 0:
        raise ValueError("max_events must be positive")
    return epoll.poll(0, max_events)
