"""Retry backoff."""

from __future__ import annotations

import random


def retry_delay_s(failures: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Return the delay before retry number `failures` (1 for the first retry).

    The delay doubles per failure up to `max_s`, then a random factor in
    [0.5, 1.0) spreads retries of jobs that failed together, so they do not
    hit a recovering dependency in one wave. It never goes below half the
    doubled delay.
    """
    rng = rng or random
    exponent = max(0, failures - 1)
    delay_s = min(max_s, base_s * (2 ** min(exponent, 60)))
    return delay_s * (0.5 + 0.5 * rng.random())
