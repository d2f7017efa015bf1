"""The inbox writer in use: compiled ``_inbox`` or its pure twin ``_inbox_py``.

Chosen like :mod:`relay.fastpath`: ``"cython"``, ``"pure"``, or ``None`` for
compiled unless ``RELAY_PURE=1`` (falling back to pure when the extension is
not built). :class:`InboxWriter` is the interface both twins implement.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any, Protocol


class InboxWriter(Protocol):
    def __init__(self, txn: Any, inbox_db: Any, meta_db: Any) -> None: ...
    def append(self, prefix: bytes, type_: int, count: int, created: int, tail: bytes) -> int: ...
    def append_many(self, prefix: bytes, type_: int, count: int, created: int, tails: list[bytes]) -> int: ...
    def delete_up_to(self, prefix: bytes, seq: int) -> int: ...
    def forget(self, prefix: bytes, count: int) -> None: ...
    def flush(self) -> None: ...


def load(name: str | None = None) -> ModuleType:
    """The twin named ``name`` ("cython" or "pure"); ``None``: the default."""
    if name == "pure" or (name is None and os.environ.get("RELAY_PURE") == "1"):
        from relay.store import _inbox_py

        return _inbox_py
    if name not in (None, "cython"):
        raise ValueError(f"unknown fast path {name!r}: expected 'cython' or 'pure'")
    try:
        from relay.store import _inbox  # type: ignore[attr-defined]
    except ImportError:
        if name == "cython":
            raise
        from relay.store import _inbox_py

        return _inbox_py
    return _inbox
