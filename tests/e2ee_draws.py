"""Fixed randomness for the e2ee known-answer vectors: the tests and the
scripts that made the vectors once draw keys and nonces the same way."""

from __future__ import annotations

from collections.abc import Callable


def fixed(values: list[bytes]) -> Callable[[int], bytes]:
    """A ``random`` that hands out ``values`` in order, checking their length."""

    def draw(n: int) -> bytes:
        value = values.pop(0)
        assert len(value) == n
        return value

    return draw
