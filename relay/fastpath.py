"""The live hot-path implementation: compiled ``_fastpath`` or its pure twin.

``RELAY_PURE=1`` in the environment forces the pure twin. ``IMPLEMENTATION``
says which one was picked ("cython" or "pure"); ``relay serve`` logs it at
start-up. Code that needs a specific one (tests, bench) imports
:func:`load` with a name instead.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def load_twin(compiled: str, pure: str, name: str | None = None) -> ModuleType:
    """The module of a compiled/pure pair named ``name`` ("cython" or "pure");
    ``None`` means the default: compiled unless ``RELAY_PURE=1``, falling back
    to pure only when the extension is not built (which ``relay serve``
    reports). ``compiled`` and ``pure`` are the two modules' dotted names."""
    if name == "pure" or (name is None and os.environ.get("RELAY_PURE") == "1"):
        return importlib.import_module(pure)
    if name not in (None, "cython"):
        raise ValueError(f"unknown fast path {name!r}: expected 'cython' or 'pure'")
    try:
        return importlib.import_module(compiled)
    except ImportError:
        if name == "cython":
            raise
        return importlib.import_module(pure)


def load(name: str | None = None) -> ModuleType:
    """Return the fast path module ``name`` (see :func:`load_twin`)."""
    return load_twin("relay._fastpath", "relay._fastpath_py", name)


_live = load()
IMPLEMENTATION: str = _live.IMPLEMENTATION
FrameParser = _live.FrameParser
WebSocketError = _live.WebSocketError
encode_frame = _live.encode_frame
apply_mask = _live.apply_mask
pack_entry = _live.pack_entry
msg_tail = _live.msg_tail
receipt_tail = _live.receipt_tail
msg_sender = _live.msg_sender
decode_sends_and_acks = _live.decode_sends_and_acks
