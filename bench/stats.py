"""Percentiles, latency histograms and rounding for the report."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

DEFAULT_QUANTILES = (0.5, 0.99)

# Histogram buckets: bucket k holds [10**(k/HIST_PER_DECADE), 10**((k+1)/HIST_PER_DECADE)) ms.
# 20 per decade is ±6 % wide, finer than run-to-run noise; 1 µs to 100 s
# bounds a histogram to 160 counts however the samples spread.
HIST_PER_DECADE = 20
HIST_MIN_K = -3 * HIST_PER_DECADE  # 1 µs: anything faster lands in this bucket
HIST_MAX_K = 5 * HIST_PER_DECADE - 1  # the bucket ending at 100 s takes anything slower


def _label(q: float) -> str:
    digits = f"{q * 100:.10g}".replace(".", "")
    return "p" + digits


def _bucket(ms: float) -> int:
    if ms <= 0:
        return HIST_MIN_K
    return min(HIST_MAX_K, max(HIST_MIN_K, math.floor(math.log10(ms) * HIST_PER_DECADE)))


def histogram_ns(ordered: Sequence[int]) -> dict[str, Any]:
    """Log-spaced bucket counts of sorted nanosecond samples, for a CDF plot
    (``python -m bench --plot``) without keeping the samples: ``counts[i]`` is
    the number of samples in bucket ``first + i``, which holds
    ``[10**((first+i)/per_decade), 10**((first+i+1)/per_decade))`` ms
    (the first and last buckets also take anything below 1 µs / above 100 s)."""
    if not ordered:
        return {"per_decade": HIST_PER_DECADE, "first": 0, "counts": []}
    first, last = _bucket(ordered[0] / 1e6), _bucket(ordered[-1] / 1e6)
    # Counting by bisection over the sorted samples: one search per bucket edge,
    # not one log10 per sample (pairs keeps half a million samples).
    counts = []
    lo = 0
    for k in range(first, last + 1):
        hi = len(ordered) if k == last else bisect_left(ordered, 10 ** ((k + 1) / HIST_PER_DECADE) * 1e6, lo)
        counts.append(hi - lo)
        lo = hi
    return {"per_decade": HIST_PER_DECADE, "first": first, "counts": counts}


def summarize_ns(
    samples: Sequence[int], quantiles: Sequence[float] = DEFAULT_QUANTILES, histogram: bool = False
) -> dict[str, Any]:
    """Nearest-rank percentiles of nanosecond samples, reported in milliseconds;
    ``histogram``: also ``hist``, see :func:`histogram_ns`."""
    n = len(samples)
    out: dict[str, Any] = {"n": n}
    if n == 0:
        for q in quantiles:
            out[_label(q)] = None
        out["max"] = None
        if histogram:
            out["hist"] = histogram_ns([])
        return out
    ordered = sorted(samples)
    for q in quantiles:
        rank = min(n - 1, max(0, int(q * n + 0.999999) - 1))
        out[_label(q)] = round(ordered[rank] / 1e6, 3)
    out["mean"] = round(sum(ordered) / n / 1e6, 3)
    out["max"] = round(ordered[-1] / 1e6, 3)
    if histogram:
        out["hist"] = histogram_ns(ordered)
    return out
