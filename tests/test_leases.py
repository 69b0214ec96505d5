"""Lease renewal on its own thread and connection, and what a node does when a lease is lost."""

from __future__ import annotations

import sqlite3
import threading
import time

import psutil
import pytest

from makeway import JobState
from makeway.node.leases import LeaseRenewer
from tests.apps import basic
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(60)


def _claimed(app, count: int) -> list[str]:
    handles = [basic.long_sleep.submit(60) for _ in range(count)]
    now = time.time()
    for handle in handles:
        assert app.store.claim(handle.id, "node-a", 1, now + 5.0, now) is not None
    return [handle.id for handle in handles]


def test_renewer_extends_and_reports_lost(app):
    kept, taken = _claimed(app, 2)
    # Another node took `taken` over: attempt 1 is stale now.
    app.store.requeue(taken, 1, "lease_expired", "node-b", time.time())
    app.store.claim(taken, "node-b", 2, time.time() + 600.0, time.time())
    woken = threading.Event()
    renewer = LeaseRenewer(app.store.url, lease_s=30.0, interval_s=0.05,
                           held=lambda: [(kept, 1, time.monotonic()), (taken, 1, time.monotonic())],
                           on_lost=woken.set)
    renewer.start()
    try:
        assert woken.wait(10.0)
        assert renewer.take_lost()[0] == (taken, 1)
        wait_until(lambda: app.store.get(kept).lease_expires_at > time.time() + 25.0, message="lease renewed")
    finally:
        renewer.stop()
    # The stale attempt's renewal did not touch the new owner's lease.
    assert app.store.get(taken).lease_expires_at > time.time() + 500.0
    assert app.store.get(taken).attempt == 2


def test_renewer_survives_locked_store(app):
    (job_id,) = _claimed(app, 1)
    renewer = LeaseRenewer(app.store.url, lease_s=30.0, interval_s=0.05, held=lambda: [(job_id, 1, time.monotonic())])
    blocker = sqlite3.connect(app.store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    renewer.start()
    try:
        time.sleep(0.5)
        assert renewer.renewals == 0
        blocker.execute("ROLLBACK")
        wait_until(lambda: renewer.renewals > 0, message="renewal after the lock was released")
        assert app.store.get(job_id).lease_expires_at > time.time() + 25.0
    finally:
        blocker.close()
        renewer.stop()


def test_node_kills_worker_of_lost_lease(app, start_node):
    start_node("[node]\nlease_s = 2.0\nheartbeat_s = 0.2\n")
    job = basic.long_sleep.submit(60)
    wait_until(lambda: app.store.get(job.id).state is JobState.RUNNING, message="job running")
    pid = app.store.get(job.id).worker_pid
    # Another node takes the job over, as after a network partition.
    app.store.requeue(job.id, 1, "lease_expired", "node-b", time.time())
    app.store.claim(job.id, "node-b", 2, time.time() + 600.0, time.time())

    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
               timeout_s=20.0, message="worker of the stale attempt killed")
    record = app.store.get(job.id)
    assert (record.state, record.attempt, record.node_id) == (JobState.RUNNING, 2, "node-b")


def test_renewer_finds_expiring_leases(app):
    (job_id,) = _claimed(app, 1)
    renewer = LeaseRenewer(app.store.url, lease_s=10.0, interval_s=1.0, held=lambda: [])
    try:
        claimed_at = 100.0
        held = [(job_id, 1, claimed_at)]
        assert renewer.margin_s == 1.0
        assert renewer.expiring(held, now=claimed_at + 8.9) == []
        assert renewer.expiring(held, now=claimed_at + 9.0) == [(job_id, 1)]
        renewer.renew(held)
        assert renewer.expiring(held, now=time.monotonic() + 8.0) == []
        assert renewer.expiring(held, now=time.monotonic() + 9.5) == [(job_id, 1)]
        # A lease no longer held is forgotten.
        renewer.expiring([], now=time.monotonic())
        assert renewer._valid_until == {}
    finally:
        renewer.stop()


def test_locked_store_stops_job_before_expiry(app, start_node):
    start_node("[node]\nlease_s = 2.0\nheartbeat_s = 0.5\n")
    job = basic.long_sleep.submit(4)
    wait_until(lambda: app.store.get(job.id).state is JobState.RUNNING, message="job running")
    pid = app.store.get(job.id).worker_pid
    blocker = sqlite3.connect(app.store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        # No renewal can be written now. The node must stop the job before its
        # lease runs out, that is while this test still holds the lock and so
        # before any other node could have claimed it.
        wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                   timeout_s=4.0, message="worker of the unrenewed lease stopped")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    assert job.result(timeout=30) == 4
    record = app.store.get(job.id)
    assert record.attempt == 2
    assert "lease_expired" in [event.reason for event in app.store.events(job.id)]
    assert "worker_lost" not in [event.reason for event in app.store.events(job.id)]
