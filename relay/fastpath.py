"""The live hot-path implementation: compiled ``_fastpath`` or its pure twin.

``RELAY_PURE=1`` in the environment forces the pure twin. ``IMPLEMENTATION``
says which one was picked ("cython" or "pure"); ``relay serve`` logs it at
start-up. Code that needs a specific one (tests, bench) imports
:func:`load` with a name instead.
"""

from __future__ import annotations

import os
from types import ModuleType


def load(name: str | None = None) -> ModuleType:
    """Return the fast path module ``name`` ("cython" or "pure"); ``None`` means
    the default: compiled unless ``RELAY_PURE=1``, falling back to pure only
    when the extension is not built (which ``relay serve`` reports)."""
    if name == "pure" or (name is None and os.environ.get("RELAY_PURE") == "1"):
        from relay import _fastpath_py

        return _fastpath_py
    if name not in (None, "cython"):
        raise ValueError(f"unknown fast path {name!r}: expected 'cython' or 'pure'")
    try:
        from relay import _fastpath
    except ImportError:
        if name == "cython":
            raise
        from relay import _fastpath_py

        return _fastpath_py
    return _fastpath


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
