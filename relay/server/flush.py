"""Output written by whoever produced it, once per batch of commit callbacks.

A commit's callbacks queue SENTs, MSGs and receipts on many connections.
Waking each connection's delivery pump to write them costs a task switch per
connection per batch, which at low load is most of a message's cost. Inside
an :class:`OutputBatch`, a connection with new output only registers itself;
when the batch ends, every registered connection writes what it has with one
non-blocking send, straight from the writer task. What a socket does not take
at once (or anything unusual: a close, a pump already writing) goes to the
pump as before, so this is only a shortcut, never the only way out.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Protocol

log = logging.getLogger(__name__)


class Flushable(Protocol):
    def flush(self) -> bool:
        """Write what is queued; False when the socket took only part of it (the
        pump sends the rest)."""
        ...


class OutputBatch:
    """A synchronous scope (no ``await`` inside) that defers connection writes to its end."""

    def __init__(self) -> None:
        self.pending: list[Flushable] | None = None
        self.flushes = 0
        self.short_writes = 0

    def defer(self, conn: Flushable) -> bool:
        """Register ``conn`` for the end of the open batch; False when none is open."""
        pending = self.pending
        if pending is None:
            return False
        pending.append(conn)
        return True

    def __enter__(self) -> OutputBatch:
        self.pending = []
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        pending = self.pending
        self.pending = None
        if not pending:
            return
        self.flushes += len(pending)
        for conn in pending:
            try:
                if not conn.flush():
                    self.short_writes += 1
            except Exception:  # one broken connection must not stop the others' output
                log.exception("flush failed")
