"""The inbox writer in use: compiled ``_inbox`` or its pure twin ``_inbox_py``.

Chosen like :mod:`relay.fastpath` (:func:`relay.fastpath.load_twin`):
``"cython"``, ``"pure"``, or ``None`` for compiled unless ``RELAY_PURE=1``
(falling back to pure when the extension is not built). :class:`InboxWriter`
is the interface both twins implement.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Protocol

from relay.fastpath import load_twin


class InboxWriter(Protocol):
    def __init__(self, txn: Any, inbox_db: Any, meta_db: Any) -> None: ...
    def append(self, prefix: bytes, type_: int, count: int, created: int, tail: bytes) -> int: ...
    def append_many(self, prefix: bytes, type_: int, count: int, created: int, tails: list[bytes]) -> int: ...
    def delete_up_to(self, prefix: bytes, seq: int) -> int: ...
    def forget(self, prefix: bytes, count: int) -> None: ...
    def flush(self) -> None: ...


def load(name: str | None = None) -> ModuleType:
    """The twin named ``name`` ("cython" or "pure"); ``None``: the default."""
    return load_twin("relay.store._inbox", "relay.store._inbox_py", name)
