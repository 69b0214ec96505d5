"""Latency statistics."""

from __future__ import annotations

import math
from typing import Sequence


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the nearest-rank percentile (`fraction` in [0, 1]) of `values`; NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def summarize_ms(latencies_s: Sequence[float]) -> dict[str, float]:
    """Return p50, p95, p99 and max in milliseconds."""
    return {
        "p50": percentile(latencies_s, 0.50) * 1000,
        "p95": percentile(latencies_s, 0.95) * 1000,
        "p99": percentile(latencies_s, 0.99) * 1000,
        "max": (max(latencies_s) * 1000) if latencies_s else math.nan,
    }
