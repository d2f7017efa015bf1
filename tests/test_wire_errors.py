"""Store results to wire errors (relay.server.wire_errors): codes and texts pinned."""

from __future__ import annotations

import pytest

from relay.errors import (
    CLOSE_POLICY,
    CONFLICT,
    INTERNAL,
    UNAVAILABLE,
    FrameError,
    StoreError,
    StoreFullError,
)
from relay.server.wire_errors import raise_for_result, wire_error


def test_a_frame_error_is_answered_as_is_with_ref_and_close_when_given() -> None:
    error = FrameError(CONFLICT, "user taken")
    assert wire_error(error) is error and error.ref is None and error.close is None
    assert wire_error(error, ref=b"m", close=CLOSE_POLICY) is error
    assert (error.code, error.reason, error.ref, error.close) == (CONFLICT, "user taken", b"m", CLOSE_POLICY)


def test_store_full_is_503_and_any_other_failure_500() -> None:
    full = wire_error(StoreFullError("store full: map"), ref=b"m")
    assert (full.code, full.reason, full.ref, full.close) == (UNAVAILABLE, "store full", b"m", None)
    other = wire_error(StoreError("store error: boom"))
    assert (other.code, other.reason) == (INTERNAL, "store error: store error: boom")
    assert wire_error(StoreError("boom"), detail=False).reason == "store error"
    assert wire_error(RuntimeError("bug")).code == INTERNAL
    named = wire_error(StoreFullError("disk error: x"), close=CLOSE_POLICY, reason="disk error: x")
    assert (named.code, named.reason, named.close) == (UNAVAILABLE, "disk error: x", CLOSE_POLICY)


def test_raise_for_result_raises_only_for_exceptions() -> None:
    raise_for_result(3)
    raise_for_result(None)
    with pytest.raises(FrameError) as info:
        raise_for_result(StoreFullError("full"))
    assert info.value.code == UNAVAILABLE
