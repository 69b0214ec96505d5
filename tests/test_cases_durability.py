"""Durability faults that users of job queues have met, as structural tests with generous bounds."""

from __future__ import annotations

import time

import psutil
import pytest

from makeway import JobState
from tests.apps import basic
from tests.conftest import wait_until, worker_pids

pytestmark = pytest.mark.timeout(180)

SHORT_LEASE = "[node]\nslots = 3\nlease_s = 3.0\nheartbeat_s = 1.0\npoll_interval_s = 0.2\n"


def test_killed_node_jobs_recovered_without_phantom_slots(app, start_node):
    node = start_node(SHORT_LEASE)
    long_jobs = [basic.long_sleep.submit(30) for _ in range(3)]
    wait_until(lambda: all(h.status() is JobState.RUNNING for h in long_jobs), message="long jobs running")
    processes = [psutil.Process(node.pid)] + [psutil.Process(pid) for pid in worker_pids(node)]

    # SIGKILL every process of the node, then start a new one at once.
    for process in processes:
        process.kill()
    psutil.wait_procs(processes, timeout=10)
    killed_at = time.time()
    start_node(SHORT_LEASE)
    short = [basic.long_sleep.submit(0) for _ in range(3)]

    for handle in short:
        assert handle.result(timeout=30) == 0
    for handle in short:
        record = app.store.get(handle.id)
        # The dead attempts hold no slots: the short jobs start at once.
        assert record.started_at - record.submitted_at < 1.0
    for handle in long_jobs:
        wait_until(lambda: app.store.get(handle.id).attempt >= 2, timeout_s=3.0 + 10.0, message="job requeued")
        events = app.store.events(handle.id)
        lost = next(event for event in events if event.reason == "lease_expired")
        assert lost.attempt == 1
        assert lost.at - killed_at < 3.0 + 10.0
        handle.cancel()


def test_random_worker_kills_keep_pool_and_finish_jobs(app, start_node):
    import os
    import random
    import signal

    node = start_node("[node]\nslots = 4\npoll_interval_s = 0.2\n\n[jobs]\nretry_backoff_s = 0.05\n")
    pool_size = len(worker_pids(node))
    rng = random.Random(23)
    handles = []
    next_kill = time.monotonic() + 2.0
    end = time.monotonic() + 10.0
    kills = 0
    while time.monotonic() < end:
        handles.append(basic.long_sleep.options(max_retries=3).submit(0.1))
        time.sleep(0.05)
        if time.monotonic() >= next_kill:
            os.kill(rng.choice(worker_pids(node)), signal.SIGKILL)
            kills += 1
            next_kill += 2.0

    for handle in handles:
        assert handle.result(timeout=60) == 0.1
    assert kills >= 4
    # Every killed worker was replaced: the node is back to its size.
    wait_until(lambda: len(worker_pids(node)) == pool_size, message="pool back to its size")
    lost = [e for h in handles for e in app.store.events(h.id) if e.reason == "worker_lost"]
    assert all(app.store.get(e.job_id).state is JobState.SUCCEEDED for e in lost)
