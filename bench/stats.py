"""Percentiles and rounding for the report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DEFAULT_QUANTILES = (0.5, 0.99)


def _label(q: float) -> str:
    digits = f"{q * 100:.10g}".replace(".", "")
    return "p" + digits


def summarize_ns(samples: Sequence[int], quantiles: Sequence[float] = DEFAULT_QUANTILES) -> dict[str, Any]:
    """Nearest-rank percentiles of nanosecond samples, reported in milliseconds."""
    n = len(samples)
    out: dict[str, Any] = {"n": n}
    if n == 0:
        for q in quantiles:
            out[_label(q)] = None
        out["max"] = None
        return out
    ordered = sorted(samples)
    for q in quantiles:
        rank = min(n - 1, max(0, int(q * n + 0.999999) - 1))
        out[_label(q)] = round(ordered[rank] / 1e6, 3)
    out["mean"] = round(sum(ordered) / n / 1e6, 3)
    out["max"] = round(ordered[-1] / 1e6, 3)
    return out
