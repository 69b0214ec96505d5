"""Retry backoff with jitter.

Retry number n (1 for the first retry) waits at least its minimum delay,
``min(backoff_max_s, backoff_s * 2**(n - 1))``, plus a uniform random
spread of up to ``min(backoff_max_s, jitter_s * 2**(n - 1))``.

The spread is added, never subtracted, so no retry fires before its minimum
delay. Its width is set in seconds rather than as a fraction of the delay,
because jobs that fail together (a dependency went down) all fail within a
moment of each other. A spread proportional to a 1 s first delay would put
every first retry into the same second, so they would arrive as one wave at
a dependency that is just recovering. With the default spread of 30 s, 500
jobs failing together retry at about 17 per second.
"""

from __future__ import annotations

import random

# 2**60 seconds is far past any cap; the exponent stops there so that a job
# with a huge failure count cannot overflow the float.
_MAX_EXPONENT = 60


def minimum_retry_delay_s(failures: int, backoff_s: float, backoff_max_s: float) -> float:
    """Return the least delay before retry number `failures`: it doubles per failure, up to `backoff_max_s`."""
    exponent = min(max(0, failures - 1), _MAX_EXPONENT)
    return min(backoff_max_s, backoff_s * 2.0 ** exponent)


def retry_spread_s(failures: int, jitter_s: float, backoff_max_s: float) -> float:
    """Return the width of the random spread added to retry number `failures`."""
    exponent = min(max(0, failures - 1), _MAX_EXPONENT)
    return min(backoff_max_s, jitter_s * 2.0 ** exponent)


def retry_delay_s(failures: int, backoff_s: float, backoff_max_s: float, jitter_s: float,
                  rng: random.Random | None = None) -> float:
    """Return the delay before retry number `failures`: its minimum delay plus a random part of its spread."""
    rng = rng or random
    return (minimum_retry_delay_s(failures, backoff_s, backoff_max_s)
            + retry_spread_s(failures, jitter_s, backoff_max_s) * rng.random())
