"""Store results to wire errors: the one place where a failed write gets its code.

A write op's result is its value or the exception it ended with (see
``Store.apply_batch``); the two kinds of failure stay apart, as
:mod:`relay.errors` draws them:

* :class:`~relay.errors.FrameError` — the peer's fault (no such user, a
  conflict, a limit): it already carries its code and is answered as is;
* :class:`~relay.errors.StoreError` — ours or the disk's:
  :class:`~relay.errors.StoreFullError` (map or disk full) is 503, so the
  client retries later and nothing acknowledged is lost; anything else 500.

:func:`wire_error` builds the :class:`FrameError` to answer;
:func:`raise_for_result` raises it, for code that answers by raising (REQ
ops, whose FrameError becomes ``RES ok=false``). Every server module that
answers a store failure goes through these two.
"""

from __future__ import annotations

from relay.errors import INTERNAL, UNAVAILABLE, FrameError, StoreFullError


def wire_error(
    failure: object,
    ref: object = None,
    close: int | None = None,
    reason: str | None = None,
    detail: bool = True,
) -> FrameError:
    """The FrameError to answer for a write op's result ``failure``, which is
    not the op's value (usually an exception).

    A FrameError is returned itself, with ``ref`` and ``close`` set when
    given. A store failure becomes 503 (full) or 500 (anything else) with
    ``ref`` and ``close``; its reason is ``reason`` when given, else "store
    full", or for a 500 "store error" followed by the failure when
    ``detail`` (SEND's ERROR leaves that to the log).
    """
    if isinstance(failure, FrameError):
        if ref is not None:
            failure.ref = ref
        if close is not None:
            failure.close = close
        return failure
    if isinstance(failure, StoreFullError):
        return FrameError(UNAVAILABLE, "store full" if reason is None else reason, ref=ref, close=close)
    if reason is None:
        reason = f"store error: {failure}" if detail else "store error"
    return FrameError(INTERNAL, reason, ref=ref, close=close)


def raise_for_result(result: object) -> None:
    """Raise :func:`wire_error` of a write op's ``result`` when it is an
    exception; return when it is a value."""
    if isinstance(result, BaseException):
        raise wire_error(result)
