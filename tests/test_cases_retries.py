"""Retries of jobs that failed together: spread out, never early, and within a bounded number of attempts."""

from __future__ import annotations

import heapq
import random
import time
from collections import Counter

import pytest

from makeway import JobState
from makeway.policy import Settings
from makeway.scheduler.retry import minimum_retry_delay_s, retry_delay_s
from tests.apps import basic

pytestmark = pytest.mark.timeout(120)


def _max_in_window(times: list[float], width_s: float) -> int:
    """Return the maximum count of `times` in any half-open window [t, t + width_s)."""
    ordered = sorted(times)
    largest, low = 0, 0
    for high, at in enumerate(ordered):
        while ordered[low] <= at - width_s:
            low += 1
        largest = max(largest, high - low + 1)
    return largest


class FlakyDependency:
    """Fails every call before `down_until_s`; after it, serves `capacity` calls per whole second and fails the rest."""

    def __init__(self, down_until_s: float, capacity: int):
        self.down_until_s = down_until_s
        self.capacity = capacity
        self.served: Counter[int] = Counter()

    def call(self, at: float) -> bool:
        if at < self.down_until_s:
            return False
        second = int(at)
        if self.served[second] >= self.capacity:
            return False
        self.served[second] += 1
        return True


def simulate(jobs: int, attempts: int, dependency: FlakyDependency, rng: random.Random) -> dict:
    """Run `jobs` jobs that each call the dependency once per attempt, on a fake clock, with the default retry
    settings; every first attempt happens at t=0 and a failed job is retried after `retry_delay_s`."""
    settings = Settings().jobs
    calls = [(0.0, job, 1) for job in range(jobs)]
    heapq.heapify(calls)
    call_times, retries, early, succeeded, failed = [], [], [], set(), set()
    while calls:
        at, job, attempt = heapq.heappop(calls)
        call_times.append(at)
        if dependency.call(at):
            succeeded.add(job)
            continue
        failed.add(job)
        if attempt == attempts:
            continue
        delay = retry_delay_s(attempt, settings.retry_backoff_s, settings.retry_backoff_max_s,
                              settings.retry_jitter_s, rng)
        if delay < minimum_retry_delay_s(attempt, settings.retry_backoff_s, settings.retry_backoff_max_s):
            early.append((job, attempt, delay))
        retries.append(at + delay)
        heapq.heappush(calls, (at + delay, job, attempt + 1))
    return {"calls": call_times, "retries": retries, "early": early, "succeeded": succeeded,
            "ever_failed": failed}


@pytest.mark.parametrize("seed", range(5))
def test_synchronized_failures_stay_below_capacity(seed):
    # 500 jobs fail together while a dependency is down for 10 s; it then
    # serves 20 calls per second. Six attempts each, default retry settings.
    capacity = 20
    dependency = FlakyDependency(down_until_s=10.0, capacity=capacity)
    outcome = simulate(jobs=500, attempts=6, dependency=dependency, rng=random.Random(seed))

    assert len(outcome["ever_failed"]) == 500
    assert _max_in_window(outcome["retries"], 1.0) <= 0.20 * len(outcome["ever_failed"])
    after_recovery = [at for at in outcome["calls"] if at >= dependency.down_until_s]
    assert _max_in_window(after_recovery, 1.0) <= 2 * capacity
    assert len(outcome["succeeded"]) == 500
    assert len(outcome["calls"]) <= 3 * 500
    assert outcome["early"] == []


def test_retry_delays_respect_minimum_and_spread():
    settings = Settings().jobs
    rng = random.Random(11)
    for failures in range(1, 12):
        minimum = minimum_retry_delay_s(failures, settings.retry_backoff_s, settings.retry_backoff_max_s)
        delays = [retry_delay_s(failures, settings.retry_backoff_s, settings.retry_backoff_max_s,
                                settings.retry_jitter_s, rng) for _ in range(2000)]
        assert min(delays) >= minimum, f"failures={failures}"
        # Uniform over the spread: the lowest and highest tenths both occur.
        spread = max(delays) - minimum
        assert spread > 0.9 * min(settings.retry_backoff_max_s, settings.retry_jitter_s * 2 ** (failures - 1))
        assert sum(d < minimum + spread / 10 for d in delays) > 100


def test_node_spreads_synchronized_retries(app, start_node):
    backoff_s, jitter_s = 0.3, 3.0
    start_node(f"[jobs]\nretry_backoff_s = {backoff_s}\nretry_jitter_s = {jitter_s}\n")
    down_until = time.time() + 2.0
    handles = [basic.call_dependency.submit(down_until) for _ in range(60)]

    assert [handle.result(timeout=60) for handle in handles] == ["served"] * 60
    first_retries = []
    for handle in handles:
        events = app.store.events(handle.id)
        failures = [event for event in events if event.reason == "job_error"]
        claims = {event.attempt: event.at for event in events if event.reason == "claimed"}
        assert app.store.get(handle.id).state is JobState.SUCCEEDED
        for number, failure in enumerate(failures, start=1):
            # The next attempt starts no earlier than the minimum delay of this retry.
            waited = claims[failure.attempt + 1] - failure.at
            assert waited >= minimum_retry_delay_s(number, backoff_s, 300.0) - 1e-6, (handle.id, number, waited)
        if failures:
            first_retries.append(claims[failures[0].attempt + 1])
    # Every job started before the dependency came back, so nearly all failed.
    assert len(first_retries) >= 50
    # Spread over the 3 s jitter rather than in one wave: no 0.2 s window
    # contains half of them, and a uniform spread puts about a fifteenth in each.
    assert _max_in_window(first_retries, 0.2) <= len(first_retries) // 2
    assert max(first_retries) - min(first_retries) > 1.0
