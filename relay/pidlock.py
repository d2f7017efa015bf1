"""An exclusive, advisory lock on a file that names the process holding it.

Used by the relay (one relay per data directory) and the client (one client
per state directory). Stdlib only, no I/O beyond the lock file itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO

__all__ = ["LockHeld", "hold_pid_lock"]


class LockHeld(Exception):
    """Another process holds the lock; ``owner`` is its pid as it wrote it ("?" if unknown)."""

    def __init__(self, owner: str) -> None:
        super().__init__(owner)
        self.owner = owner


def hold_pid_lock(path: Path) -> IO[str]:
    """Take an exclusive ``flock`` on ``path`` (created 0600 if missing) and
    write this process's pid into it; keep the returned handle open for as
    long as the lock is to be held (closing it, or exiting, releases it).
    Raises :class:`LockHeld` when another process has it."""
    handle = open(path, "a+")  # noqa: SIM115 - held by the caller until close()
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "?"
        handle.close()
        raise LockHeld(owner) from None
    with contextlib.suppress(OSError):
        os.fchmod(handle.fileno(), 0o600)
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
