"""Loading one of a compiled/pure twin pair in tests."""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType

import pytest


def load_twin_or_fail(load: Callable[[str], ModuleType], name: str, compiled: str) -> ModuleType:
    """``load(name)``; when the compiled twin (module ``compiled``) is missing
    the test FAILS, unless ``RELAY_NO_EXT=1`` says the build was skipped on
    purpose (then it is skipped)."""
    if name == "pure":
        return load("pure")
    try:
        return load("cython")
    except ImportError as exc:
        if os.environ.get("RELAY_NO_EXT") == "1":
            pytest.skip(f"RELAY_NO_EXT=1: {compiled} is not built")
        pytest.fail(
            f"{compiled} is not built: run `python3 -m pip install -e .` "
            f"(or set RELAY_NO_EXT=1 to skip it on purpose): {exc}"
        )
