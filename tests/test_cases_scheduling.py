"""Scheduling faults that job-queue users have met, as structural tests.

Millisecond figures from the original reports are measured in the
benchmarks; these tests check order, counts and states from the store's
timestamps, with bounds generous enough for a loaded 2-core machine.
"""

from __future__ import annotations

import time

from makeway import JobState
from tests.apps import basic
from tests.conftest import wait_until

FAST_SHUTDOWN = "[node]\nshutdown_grace_s = 0.5\n"


def records(app, handles):
    return [app.store.get(handle.id) for handle in handles]


def max_overlap(intervals):
    """Return the largest number of (start, end) intervals open at one instant."""
    points = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals], key=lambda p: (p[0], p[1]))
    open_now = peak = 0
    for _, change in points:
        open_now += change
        peak = max(peak, open_now)
    return peak


def run_c01_short_jobs(app, tmp_path):
    long_job = basic.spin.submit(60.0)
    wait_until(lambda: app.store.get(long_job.id).state is JobState.RUNNING, message="long job running")
    time.sleep(0.5)
    log = tmp_path / "starts.txt"
    short = [basic.record_start.submit(str(log), f"short-{index}", 0.05) for index in range(20)]
    for handle in short:
        handle.result(timeout=30)
    return long_job, short


def test_short_jobs_not_held_behind_long_job(app, start_node, tmp_path):
    start_node(FAST_SHUTDOWN + "slots = 4\nbackground_workers = 4\ninteractive_workers = 1\n")

    long_job, short = run_c01_short_jobs(app, tmp_path)

    short_records = records(app, short)
    assert app.store.get(long_job.id).state is JobState.RUNNING
    assert all(record.state is JobState.SUCCEEDED for record in short_records)
    # A claimed job starts at once, so at most the 3 free slots run short jobs together.
    assert max_overlap([(r.started_at, r.finished_at) for r in short_records]) <= 3
    assert max(r.finished_at for r in short_records) - min(r.submitted_at for r in short_records) < 15.0


def test_short_jobs_use_both_nodes_behind_long_job(app, start_node, tmp_path):
    config = FAST_SHUTDOWN + "slots = 4\nbackground_workers = 4\ninteractive_workers = 1\n"
    first = start_node(config)
    start_node(config)

    long_job, short = run_c01_short_jobs(app, tmp_path)

    long_node = app.store.get(long_job.id).node_id
    short_records = records(app, short)
    assert app.store.get(long_job.id).state is JobState.RUNNING
    on_long_node = [(r.started_at, r.finished_at) for r in short_records if r.node_id == long_node]
    on_other_node = [(r.started_at, r.finished_at) for r in short_records if r.node_id != long_node]
    assert max_overlap(on_long_node or [(0, 0)]) <= 3
    assert max_overlap(on_other_node or [(0, 0)]) <= 4
    assert len({r.node_id for r in short_records}) == 2
    assert first.pid > 0


def run_c03(app, tmp_path, low_count):
    log = tmp_path / "starts.txt"
    low = [basic.record_start.options(priority=0).submit(str(log), f"low-{i}", 0.3) for i in range(low_count)]
    wait_until(lambda: any(r.state is JobState.RUNNING for r in records(app, low)), message="a low job running")
    time.sleep(0.01)
    high = basic.record_start.options(priority=10).submit(str(log), "high", 0.1)
    high.result(timeout=30)
    for handle in low:
        handle.result(timeout=30)
    return records(app, low), app.store.get(high.id)


def test_high_priority_not_queued_behind_claimed_low(app, start_node, tmp_path):
    start_node(FAST_SHUTDOWN + "slots = 1\nbackground_workers = 1\ninteractive_workers = 1\n")

    low, high = run_c03(app, tmp_path, low_count=5)

    start_order = [record.id for record in sorted(low + [high], key=lambda r: r.started_at)]
    assert start_order.index(high.id) == 1
    overtook = [r for r in low if r.started_at > high.submitted_at and r.started_at < high.started_at]
    assert overtook == []


def test_high_priority_first_on_two_nodes(app, start_node, tmp_path):
    config = FAST_SHUTDOWN + "slots = 1\nbackground_workers = 1\ninteractive_workers = 1\n"
    start_node(config)
    start_node(config)

    low, high = run_c03(app, tmp_path, low_count=10)

    overtook = [r for r in low if high.submitted_at < r.started_at < high.started_at]
    assert overtook == []
    assert len({r.node_id for r in low}) == 2


def test_interactive_never_waits_for_bulk_to_finish(app, start_node):
    start_node(FAST_SHUTDOWN)
    bulk = [basic.spin.submit(6.0) for _ in range(4)]
    wait_until(lambda: sum(r.state is JobState.RUNNING for r in records(app, bulk)) == 2, message="2 bulk jobs running")
    time.sleep(1.0)

    interactive = []
    for _ in range(15):
        interactive.append(basic.interactive_compute.submit(20))
        time.sleep(0.2)
    for handle in interactive:
        assert handle.result(timeout=30) == 20
    for handle in bulk:
        handle.result(timeout=120)

    interactive_records = records(app, interactive)
    bulk_records = records(app, bulk)
    first_bulk_finish = min(r.finished_at for r in bulk_records)
    assert max(r.started_at for r in interactive_records) < first_bulk_finish
    assert max(r.started_at - r.submitted_at for r in interactive_records) < 1.0
    assert all(r.state is JobState.SUCCEEDED for r in bulk_records)
    assert all(r.attempt == 1 for r in bulk_records)


def test_low_tier_starts_within_max_wait(app, start_node):
    start_node(FAST_SHUTDOWN + "[tiers.bulk]\nmax_wait_s = 3.0\n")
    essential = [basic.essential_spin.submit(0.2) for _ in range(6)]
    wait_until(lambda: sum(r.state is JobState.RUNNING for r in records(app, essential)) == 2, message="essential running")
    low = [basic.spin.submit(0.3) for _ in range(3)]

    deadline = time.monotonic() + 20
    while not all(r.state is JobState.SUCCEEDED for r in records(app, low)) and time.monotonic() < deadline:
        queued = sum(r.state is JobState.QUEUED for r in records(app, essential))
        essential += [basic.essential_spin.submit(0.2) for _ in range(max(0, 6 - queued))]
        time.sleep(0.05)

    low_records = records(app, low)
    essential_records = records(app, essential)
    assert all(r.state is JobState.SUCCEEDED for r in low_records)
    for record in low_records:
        assert record.started_at - record.submitted_at < 3.0 + 2.0
        # Higher-tier work was still waiting when the low job started, so it
        # was max_wait that let it in, not an empty queue.
        waiting = [e for e in essential_records if e.submitted_at < record.started_at < (e.started_at or float("inf"))]
        assert waiting, record
