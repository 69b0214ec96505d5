"""Unit tests of the SQLite store against real database files in tmp_path."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from makeway.errors import MakewayError, StoreError
from makeway.store import JobState, NewJob, Outcome, open_store
from makeway.store.base import SuspensionChange, Usage
from makeway.store.sqlite import MIGRATIONS, RESTART_CHECKPOINT_PAGES, _Checkpointer

NODE = "node-a"
NAME = "tests.jobs:work"


def new_job(job_id, *, name=NAME, tier="bulk", tier_rank=30, priority=0, not_before=0.0,
            idempotency_key=None, max_retries=3, payload=b'{"args":[],"kwargs":{}}', deadline=None, timeout_s=None):
    return NewJob(
        id=job_id,
        name=name,
        tier=tier,
        tier_rank=tier_rank,
        priority=priority,
        payload=payload,
        serializer="json",
        max_retries=max_retries,
        not_before=not_before,
        metadata={"origin": "test"},
        idempotency_key=idempotency_key,
        deadline=deadline,
        timeout_s=timeout_s,
    )


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "store.db"


@pytest.fixture
def store(db_path):
    opened = open_store("sqlite:///" + str(db_path))
    yield opened
    opened.close()


def claim(store, job_id, *, now=1000.0, lease_expires_at=None):
    lease = now + 30.0 if lease_expires_at is None else lease_expires_at
    return store.claim(job_id, NODE, 4242, lease, now)


def candidate_ids(store, tiers=("bulk",), names=(NAME,), now=None, limit=10):
    moment = time.time() + 1.0 if now is None else now
    return [candidate.id for candidate in store.candidates(list(tiers), list(names), moment, limit)]


# -- schema ---------------------------------------------------------------


def test_schema_version_is_latest(store):
    assert store.schema_version() == len(MIGRATIONS)


def test_schema_version_table_has_one_row(store, db_path):
    with sqlite3.connect(db_path) as raw:
        rows = raw.execute("SELECT version FROM schema_version").fetchall()
    assert rows == [(len(MIGRATIONS),)]


def test_reopen_keeps_version_and_jobs(store, db_path):
    store.submit([new_job("a")])
    store.close()

    reopened = open_store("sqlite:///" + str(db_path))
    try:
        assert reopened.schema_version() == len(MIGRATIONS)
        assert reopened.get("a") is not None
        assert reopened.events("a")[0].reason == "submitted"
        with sqlite3.connect(db_path) as raw:
            version_rows = raw.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0]
        assert version_rows == 1
    finally:
        reopened.close()


def test_reopen_twice_is_idempotent(store, db_path):
    store.close()
    for _ in range(2):
        open_store("sqlite:///" + str(db_path)).close()

    reopened = open_store("sqlite:///" + str(db_path))
    try:
        assert reopened.schema_version() == len(MIGRATIONS)
        assert reopened.submit([new_job("after-reopen")]) == ["after-reopen"]
    finally:
        reopened.close()


def test_version_one_store_migrates_keeping_jobs(db_path):
    # A store written by the first schema, as a released makeway left it.
    with sqlite3.connect(db_path) as raw:
        raw.executescript(MIGRATIONS[0])
        raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        raw.execute("INSERT INTO schema_version VALUES (1)")
        raw.execute(
            "INSERT INTO jobs (id, name, tier, tier_rank, priority, state, payload, serializer, max_retries, "
            "not_before, submitted_at, updated_at, idempotency_key) VALUES ('old', ?, 'bulk', 30, 0, 'queued', "
            "x'7b7d', 'json', 3, 1500.0, 1000.0, 1000.0, 'order-1')",
            (NAME,),
        )

    migrated = open_store("sqlite:///" + str(db_path))
    try:
        record = migrated.get("old")
        assert migrated.schema_version() == len(MIGRATIONS)
        assert record.state is JobState.QUEUED
        # A delayed job starts waiting once it is due.
        assert record.queued_at == 1500.0
        assert (record.checkpoint, record.checkpoints, record.paused, record.cpu_s) == (None, 0, False, 0.0)
        assert candidate_ids(migrated, now=2000.0) == ["old"]
        # Its key now belongs to its job name.
        assert record.idempotency_key == "order-1"
        assert migrated.submit([new_job("again", idempotency_key="order-1", payload=b"{}")]) == ["old"]
    finally:
        migrated.close()


def test_open_newer_schema_raises(store, db_path):
    store.close()
    with sqlite3.connect(db_path) as raw:
        raw.execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS) + 1,))

    with pytest.raises(StoreError, match="newer than this makeway"):
        open_store("sqlite:///" + str(db_path))


# -- submit and get -------------------------------------------------------


def test_submit_get_round_trip(store):
    before = time.time()
    ids = store.submit([new_job("a", priority=7, not_before=123.5, max_retries=2)])
    after = time.time()
    record = store.get("a")

    assert ids == ["a"]
    assert record.name == NAME
    assert record.tier == "bulk"
    assert record.tier_rank == 30
    assert record.priority == 7
    assert record.state is JobState.QUEUED
    assert record.payload == b'{"args":[],"kwargs":{}}'
    assert record.serializer == "json"
    assert record.attempt == 0
    assert record.failures == 0
    assert record.max_retries == 2
    assert record.not_before == 123.5
    assert before <= record.submitted_at <= after
    assert record.started_at is None
    assert record.lease_expires_at is None
    assert record.metadata == {"origin": "test"}
    assert record.idempotency_key is None


def test_get_unknown_returns_none(store):
    assert store.get("missing") is None


def test_submit_batch_returns_ids_in_order(store):
    assert store.submit([new_job("a"), new_job("b"), new_job("c")]) == ["a", "b", "c"]


def test_submit_batch_is_one_transaction(store):
    store.submit([new_job("first", priority=1)])

    with pytest.raises((sqlite3.IntegrityError, MakewayError)):
        store.submit([new_job("b"), new_job("first", priority=99), new_job("c")])

    assert store.get("b") is None
    assert store.get("c") is None
    assert store.get("first").priority == 1
    assert len(store.events("first")) == 1
    assert store.events("b") == []


def test_store_usable_after_failed_batch(store):
    store.submit([new_job("first")])
    with pytest.raises((sqlite3.IntegrityError, MakewayError)):
        store.submit([new_job("first")])

    assert store.submit([new_job("second")]) == ["second"]
    assert store.get("second") is not None


def test_idempotency_key_returns_first_id(store):
    first = store.submit([new_job("a", idempotency_key="order-17")])
    second = store.submit([new_job("b", idempotency_key="order-17")])

    assert first == ["a"]
    assert second == ["a"]
    assert store.get("b") is None


def test_idempotency_key_scoped_per_job_name(store):
    first = store.submit([new_job("a", idempotency_key="k")])
    other_name = store.submit([new_job("b", name="tests.jobs:other", idempotency_key="k")])

    assert first == ["a"]
    assert other_name == ["b"]
    assert store.get("b").idempotency_key == "k"


def test_idempotency_key_free_after_ttl(store):
    store.submit([new_job("a", idempotency_key="k", max_retries=0)])
    claim(store, "a", now=time.time() - 100)
    store.complete("a", 1, b"1", NODE, time.time() - 50)

    kept = store.submit([new_job("b", idempotency_key="k")], idempotency_ttl_s=60)
    renewed = store.submit([new_job("c", idempotency_key="k")], idempotency_ttl_s=10)

    assert kept == ["a"]
    assert renewed == ["c"]
    assert store.get("a").idempotency_key is None


def test_idempotency_key_inside_one_batch(store):
    ids = store.submit([new_job("a", idempotency_key="k"), new_job("b", idempotency_key="k")])

    assert ids == ["a", "a"]
    assert store.get("b") is None


# -- candidates -----------------------------------------------------------


def test_candidates_order(store):
    store.submit([new_job("bulk-low", priority=0)])
    store.submit([new_job("bulk-high", priority=5)])
    store.submit([new_job("essential", tier="essential", tier_rank=10, priority=-5)])
    store.submit([new_job("bulk-low-later", priority=0)])

    ids = candidate_ids(store, tiers=("bulk", "essential"))

    assert ids == ["essential", "bulk-high", "bulk-low", "bulk-low-later"]


def test_candidates_only_queued(store):
    store.submit([new_job("queued"), new_job("running"), new_job("cancelled")])
    claim(store, "running")
    store.request_cancel("cancelled", 1000.0, "test")

    assert candidate_ids(store) == ["queued"]


def test_candidates_only_listed_tiers(store):
    store.submit([new_job("bulk"), new_job("essential", tier="essential", tier_rank=10)])

    assert candidate_ids(store, tiers=("bulk",)) == ["bulk"]


def test_candidates_only_registered_names(store):
    store.submit([new_job("known"), new_job("unknown", name="other:fn")])

    assert candidate_ids(store, names=(NAME,)) == ["known"]


def test_candidates_exclude_future_not_before(store):
    store.submit([new_job("due", not_before=999.0), new_job("later", not_before=1001.0)])

    assert candidate_ids(store, now=1000.0) == ["due"]


def test_candidates_empty_inputs(store):
    store.submit([new_job("a")])

    assert candidate_ids(store, tiers=()) == []
    assert candidate_ids(store, names=()) == []
    assert candidate_ids(store, limit=0) == []


def test_candidates_include_oldest_job(store):
    store.submit([new_job("old-low", priority=-100)])
    for index in range(5):
        store.submit([new_job(f"new-high-{index}", priority=50)])

    ids = candidate_ids(store, limit=2)

    assert ids[:2] == ["new-high-0", "new-high-1"]
    assert "old-low" in ids


# -- claim ----------------------------------------------------------------


def test_claim_raises_attempt(store):
    store.submit([new_job("a")])

    first = claim(store, "a", now=1000.0)
    store.requeue("a", first.attempt, "yielded", NODE, 1001.0)
    second = claim(store, "a", now=1002.0)

    assert first.attempt == 1
    assert second.attempt == 2
    assert store.get("a").attempt == 2


def test_claim_sets_running(store):
    store.submit([new_job("a")])

    result = claim(store, "a", now=1000.0, lease_expires_at=1030.0)
    record = store.get("a")

    assert result.id == "a"
    assert result.started_at == 1000.0
    assert record.state is JobState.RUNNING
    assert record.node_id == NODE
    assert record.worker_pid == 4242
    assert record.lease_expires_at == 1030.0
    assert record.started_at == 1000.0


def test_claim_twice_returns_none(store):
    store.submit([new_job("a")])
    claim(store, "a")

    assert claim(store, "a") is None
    assert store.get("a").attempt == 1
    assert [event.reason for event in store.events("a")] == ["submitted", "claimed"]


def test_claim_unknown_returns_none(store):
    assert claim(store, "missing") is None


# -- attempt fencing ------------------------------------------------------


@pytest.fixture
def stale(store):
    """Claim job "a" twice and return ("a", 1), its stale attempt."""
    store.submit([new_job("a")])
    claim(store, "a", now=1000.0)
    store.requeue("a", 1, "worker_lost", NODE, 1001.0)
    claim(store, "a", now=1002.0, lease_expires_at=1032.0)
    return "a", 1


def test_complete_stale_attempt_ignored(store, stale):
    job_id, attempt = stale

    assert store.complete(job_id, attempt, b'"late"', NODE, 1003.0) is False
    assert store.get(job_id).state is JobState.RUNNING
    assert store.get(job_id).result is None


def test_complete_current_attempt(store, stale):
    job_id, _ = stale

    assert store.complete(job_id, 2, b'"done"', NODE, 1003.0) is True
    assert store.get(job_id).state is JobState.SUCCEEDED
    assert store.get(job_id).result == b'"done"'
    assert store.get(job_id).finished_at == 1003.0
    assert store.get(job_id).lease_expires_at is None


def test_fail_stale_attempt_ignored(store, stale):
    job_id, attempt = stale

    outcome = store.fail(job_id, attempt, "boom", None, "raised", 2000.0, NODE, 1003.0)

    assert outcome.applied is False
    assert outcome.state is JobState.RUNNING
    assert store.get(job_id).failures == 0
    assert store.get(job_id).error is None


def test_requeue_stale_attempt_ignored(store, stale):
    job_id, attempt = stale

    assert store.requeue(job_id, attempt, "yielded", NODE, 1003.0) is False
    assert store.get(job_id).state is JobState.RUNNING


def test_set_suspended_stale_attempt_ignored(store, stale):
    job_id, attempt = stale

    assert store.set_suspended([(job_id, attempt)], True, "preempted", NODE, 1003.0) == 0
    assert store.get(job_id).state is JobState.RUNNING


def test_record_suspensions_applies_changes_in_order(store, stale):
    job_id, _ = stale
    store.submit([new_job("b")])
    claim(store, "b", now=1002.5)

    moved = store.record_suspensions([
        SuspensionChange([(job_id, 2), ("b", 1)], True, "preempted", 1003.0, "for interactive job x"),
        SuspensionChange([(job_id, 2)], False, "resumed", 1004.0),
        SuspensionChange([(job_id, 1)], True, "preempted", 1005.0),
    ], NODE)

    assert moved == 3
    assert store.get(job_id).state is JobState.RUNNING
    assert store.get("b").state is JobState.SUSPENDED
    events = [(event.reason, event.at, event.attempt) for event in store.events(job_id)][-2:]
    assert events == [("preempted", 1003.0, 2), ("resumed", 1004.0, 2)]


def test_set_suspended_and_resume(store, stale):
    job_id, _ = stale

    suspended = store.set_suspended([(job_id, 2)], True, "preempted", NODE, 1003.0)
    state_while_suspended = store.get(job_id).state
    resumed = store.set_suspended([(job_id, 2)], False, "resumed", NODE, 1004.0)

    assert suspended == 1
    assert state_while_suspended is JobState.SUSPENDED
    assert resumed == 1
    assert store.get(job_id).state is JobState.RUNNING


def test_renew_leases_stale_attempt_lost(store, stale):
    job_id, attempt = stale

    lost = store.renew_leases([(job_id, attempt)], 5000.0)

    assert lost == [(job_id, attempt)]
    assert store.get(job_id).lease_expires_at == 1032.0


def test_renew_leases_current_attempt(store, stale):
    job_id, _ = stale

    lost = store.renew_leases([(job_id, 2)], 5000.0)

    assert lost == []
    assert store.get(job_id).lease_expires_at == 5000.0


def test_renew_leases_empty(store):
    assert store.renew_leases([], 5000.0) == []


# -- fail and retries -----------------------------------------------------


def test_fail_retries_then_fails(store):
    store.submit([new_job("a", max_retries=2)])
    outcomes = []
    for attempt in (1, 2, 3):
        claim(store, "a", now=1000.0 + attempt)
        outcomes.append(store.fail("a", attempt, f"boom {attempt}", "tb", "raised", 2000.0 + attempt, NODE, 1000.5 + attempt))

    assert [outcome.state for outcome in outcomes] == [JobState.QUEUED, JobState.QUEUED, JobState.FAILED]
    assert all(outcome.applied for outcome in outcomes)
    assert store.get("a").state is JobState.FAILED
    assert store.get("a").failures == 3
    assert store.get("a").error == "boom 3"
    assert store.get("a").traceback == "tb"


def test_fail_retry_sets_not_before(store):
    store.submit([new_job("a", max_retries=1)])
    claim(store, "a")

    outcome = store.fail("a", 1, "boom", None, "raised", 2500.0, NODE, 1001.0)
    record = store.get("a")

    assert outcome.state is JobState.QUEUED
    assert record.state is JobState.QUEUED
    assert record.not_before == 2500.0
    assert record.failures == 1
    assert record.node_id is None
    assert record.lease_expires_at is None


def test_fail_without_retry_at_fails_at_once(store):
    store.submit([new_job("a", max_retries=5)])
    claim(store, "a")

    outcome = store.fail("a", 1, "cannot decode", None, "invalid_payload", None, NODE, 1001.0)

    assert outcome.state is JobState.FAILED
    assert outcome.applied is True
    assert store.get("a").state is JobState.FAILED
    assert store.get("a").failures == 1


def test_fail_zero_retries_fails_at_once(store):
    store.submit([new_job("a", max_retries=0)])
    claim(store, "a")

    outcome = store.fail("a", 1, "boom", None, "raised", 2000.0, NODE, 1001.0)

    assert outcome.state is JobState.FAILED


# -- requeue_expired ------------------------------------------------------


def test_requeue_expired_only_expired(store):
    store.submit([new_job("expired"), new_job("live"), new_job("suspended-expired")])
    claim(store, "expired", lease_expires_at=1100.0)
    claim(store, "live", lease_expires_at=1300.0)
    claim(store, "suspended-expired", lease_expires_at=1100.0)
    store.set_suspended([("suspended-expired", 1)], True, "preempted", NODE, 1050.0)

    requeued = store.requeue_expired(1200.0, "node-b")

    assert sorted(requeued) == ["expired", "suspended-expired"]
    assert store.get("expired").state is JobState.QUEUED
    assert store.get("suspended-expired").state is JobState.QUEUED
    assert store.get("live").state is JobState.RUNNING
    assert store.get("expired").lease_expires_at is None


def test_requeue_expired_records_event(store):
    store.submit([new_job("a")])
    claim(store, "a", lease_expires_at=1100.0)

    store.requeue_expired(1200.0, "node-b")
    event = store.events("a")[-1]

    assert event.reason == "lease_expired"
    assert event.from_state == "running"
    assert event.to_state == "queued"
    assert event.node_id == "node-b"
    assert event.attempt == 1
    assert event.at == 1200.0


def test_requeue_expired_then_claim_fences_old(store):
    store.submit([new_job("a")])
    claim(store, "a", lease_expires_at=1100.0)
    store.requeue_expired(1200.0, "node-b")
    claim(store, "a", now=1201.0)

    assert store.complete("a", 1, b'"old"', NODE, 1202.0) is False
    assert store.complete("a", 2, b'"new"', NODE, 1202.0) is True
    assert store.get("a").result == b'"new"'


# -- cancellation ---------------------------------------------------------


def test_cancel_queued_job(store):
    store.submit([new_job("a")])

    outcome = store.request_cancel("a", 1000.0, "cancelled_by_user")

    assert outcome.state is JobState.CANCELLED
    assert outcome.applied
    assert store.get("a").state is JobState.CANCELLED
    assert store.get("a").finished_at == 1000.0
    assert candidate_ids(store) == []


def test_cancel_running_job_records_request_only(store):
    store.submit([new_job("a")])
    claim(store, "a")

    outcome = store.request_cancel("a", 1001.0, "cancelled_by_user")

    assert outcome.state is JobState.RUNNING
    assert outcome.applied
    record = store.get("a")
    assert record.state is JobState.RUNNING
    assert record.cancel_requested_at == 1001.0
    assert store.events("a")[-1].reason == "cancel_requested"
    assert store.cancel_requests(NODE) == [("a", 1, "cancelled_by_user")]
    assert store.cancel_requests("other-node") == []


def test_cancel_ended_job_not_applied(store):
    store.submit([new_job("a")])
    claim(store, "a")
    store.complete("a", 1, b"1", NODE, 1001.0)

    outcome = store.request_cancel("a", 1002.0, "cancelled_by_user")

    assert outcome == Outcome(JobState.SUCCEEDED, applied=False)
    assert store.get("a").result == b"1"


def test_finish_cancelled_fenced_by_attempt(store):
    store.submit([new_job("a")])
    claim(store, "a")
    store.requeue("a", 1, "yielded", NODE, 1001.0)
    claim(store, "a", now=1002.0)

    assert store.finish_cancelled("a", 1, "cancelled_by_user", None, NODE, 1003.0) is False
    assert store.finish_cancelled("a", 2, "cancelled_by_user", None, NODE, 1003.0) is True
    assert store.get("a").state is JobState.CANCELLED
    assert store.events("a")[-1].reason == "cancelled_by_user"


def test_cancel_overdue_cancels_queued_jobs_past_deadline(store):
    store.submit([new_job("late", deadline=1000.0), new_job("on-time", deadline=5000.0), new_job("none")])

    assert store.cancel_overdue(2000.0) == ["late"]
    assert store.get("late").state is JobState.CANCELLED
    assert store.events("late")[-1].reason == "deadline_exceeded"
    assert sorted(candidate_ids(store)) == ["none", "on-time"]


# -- checkpoints and progress ----------------------------------------------


def test_checkpoint_from_stale_attempt_rejected(store):
    store.submit([new_job("a")])
    claim(store, "a")
    assert store.save_checkpoint("a", 1, '{"cursor": 10}', 1001.0) is True
    store.requeue("a", 1, "yielded", NODE, 1002.0)
    claim(store, "a", now=1003.0)

    assert store.save_checkpoint("a", 1, '{"cursor": 999}', 1004.0) is False
    record = store.get("a")
    assert record.checkpoint == '{"cursor": 10}'
    assert record.checkpoint_attempt == 1
    assert record.checkpoints == 1
    assert store.save_checkpoint("a", 2, '{"cursor": 20}', 1005.0, progress=(20.0, 100.0, "halfway")) is True
    record = store.get("a")
    assert (record.checkpoint, record.checkpoint_attempt, record.checkpoints) == ('{"cursor": 20}', 2, 2)
    assert (record.progress_done, record.progress_total, record.progress_message) == (20.0, 100.0, "halfway")


def test_claim_returns_last_checkpoint(store):
    store.submit([new_job("a")])
    claim(store, "a")
    store.save_checkpoint("a", 1, '{"cursor": 7}', 1001.0)
    store.requeue("a", 1, "yielded", NODE, 1002.0)

    second = store.claim("a", NODE, 1, 2e9, 1003.0)

    assert second.attempt == 2
    assert second.checkpoint == '{"cursor": 7}'


def test_progress_fenced_by_attempt(store):
    store.submit([new_job("a")])
    claim(store, "a")

    assert store.set_progress("a", 1, 5, 10, "half", 1001.0) is True
    assert store.set_progress("a", 2, 9, 10, "stale", 1002.0) is False
    assert store.get("a").progress_message == "half"


def test_requeue_keeps_failures_and_moves_queue_time(store):
    store.submit([new_job("a", max_retries=1)])
    claim(store, "a", now=1001.0)

    assert store.requeue("a", 1, "yielded", NODE, 1010.0, usage=Usage(run_s=9.0, cpu_s=8.0, wasted_cpu_s=0.5))
    record = store.get("a")
    assert record.state is JobState.QUEUED
    assert record.failures == 0
    assert record.queued_at == 1010.0
    assert (record.run_s, record.cpu_s, record.wasted_cpu_s) == (9.0, 8.0, 0.5)


def test_pause_tier_and_job(store):
    store.submit([new_job("a"), new_job("b")])

    assert store.set_paused(tier="bulk", paused=True, now=1000.0) is True
    assert store.set_paused(tier="bulk", paused=True, now=1000.0) is False
    assert store.set_paused(job_id="a", paused=True, now=1000.0) is True
    assert store.paused() == ({"bulk"}, {"a"})
    assert candidate_ids(store) == ["b"]
    assert store.claim("a", NODE, 1, 2e9, 1001.0) is None

    store.set_paused(job_id="a", paused=False, now=1002.0)
    store.set_paused(tier="bulk", paused=False, now=1002.0)
    assert store.paused() == (set(), set())
    assert sorted(candidate_ids(store)) == ["a", "b"]


# -- events ---------------------------------------------------------------


def test_events_for_every_transition(store):
    base = time.time()
    store.submit([new_job("a", max_retries=1)])
    claim(store, "a", now=base + 1)
    store.set_suspended([("a", 1)], True, "preempted", NODE, base + 2)
    store.set_suspended([("a", 1)], False, "resumed", NODE, base + 3)
    store.requeue("a", 1, "yielded", NODE, base + 4)
    claim(store, "a", now=base + 5)
    store.fail("a", 2, "boom", None, "raised", base + 6, NODE, base + 6)
    claim(store, "a", now=base + 7)
    store.complete("a", 3, b"1", NODE, base + 8)

    events = store.events("a")

    assert [(event.from_state, event.to_state, event.reason) for event in events] == [
        (None, "queued", "submitted"),
        ("queued", "running", "claimed"),
        ("running", "suspended", "preempted"),
        ("suspended", "running", "resumed"),
        ("running", "queued", "yielded"),
        ("queued", "running", "claimed"),
        ("running", "queued", "raised"),
        ("queued", "running", "claimed"),
        ("running", "succeeded", "completed"),
    ]
    assert [event.attempt for event in events] == [0, 1, 1, 1, 1, 2, 2, 3, 3]
    assert [event.node_id for event in events] == [None] + [NODE] * 8
    assert [event.at for event in events[1:]] == [base + offset for offset in range(1, 9)]
    assert events[0].at <= events[1].at
    assert all(event.job_id == "a" for event in events)


def test_events_cancel_and_fail(store):
    store.submit([new_job("cancelled"), new_job("failed", max_retries=0)])
    store.request_cancel("cancelled", 1000.0, "cancelled_by_user")
    claim(store, "failed", now=1001.0)
    store.fail("failed", 1, "boom", None, "raised", None, NODE, 1002.0)

    cancel_event = store.events("cancelled")[-1]
    fail_event = store.events("failed")[-1]

    assert (cancel_event.from_state, cancel_event.to_state) == ("queued", "cancelled")
    assert cancel_event.reason == "cancelled_by_user"
    assert cancel_event.at == 1000.0
    assert (fail_event.from_state, fail_event.to_state) == ("running", "failed")
    assert fail_event.attempt == 1
    assert fail_event.at == 1002.0


def test_complete_suspended_event_from_state(store):
    store.submit([new_job("a")])
    claim(store, "a", now=1000.0)
    store.set_suspended([("a", 1)], True, "preempted", NODE, 1001.0)

    assert store.complete("a", 1, b"1", NODE, 1002.0) is True
    assert store.events("a")[-1].from_state == "suspended"


def test_events_all_jobs_latest_last(store):
    store.submit([new_job("a")])
    store.submit([new_job("b")])

    events = store.events(limit=1)

    assert [event.job_id for event in events] == ["b"]


# -- concurrency ----------------------------------------------------------


def test_two_connections_submit_concurrently(db_path):
    stores = [open_store("sqlite:///" + str(db_path)) for _ in range(2)]
    errors = []

    def submit_jobs(store, prefix):
        try:
            for index in range(200):
                store.submit([new_job(f"{prefix}-{index}")])
        except Exception as exc:  # collected so that the main thread can assert on it
            errors.append(exc)

    threads = [threading.Thread(target=submit_jobs, args=(store, f"t{number}")) for number, store in enumerate(stores)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

        assert errors == []
        assert all(not thread.is_alive() for thread in threads)
        assert stores[0].counts() == {("bulk", "queued"): 400}
        assert len(stores[1].jobs()) == 400
    finally:
        for store in stores:
            store.close()


def test_error_text_capped(store):
    store.submit([new_job("a", max_retries=0)])
    claim(store, "a")

    store.fail("a", 1, "x" * 100_000, "y" * 100_000, "job_error", None, NODE, 1001.0)

    record = store.get("a")
    assert len(record.error) < 3000
    assert "more characters not stored" in record.error
    assert len(record.traceback) < 21000
    assert store.attempt_errors("a")[0].error == record.error


def test_retry_only_failed_or_cancelled(store):
    store.submit([new_job("failed", max_retries=0), new_job("queued")])
    claim(store, "failed")
    store.fail("failed", 1, "boom", None, "job_error", None, NODE, 1001.0)

    assert store.retry("queued", 1002.0) == Outcome(JobState.QUEUED, applied=False)
    assert store.retry("failed", 1002.0) == Outcome(JobState.QUEUED, applied=True)
    record = store.get("failed")
    assert (record.state, record.failures, record.finished_at) == (JobState.QUEUED, 0, None)
    assert store.events("failed")[-1].reason == "retried_by_user"


def test_purge_deletes_only_jobs_ended_before(store):
    store.submit([new_job("old", max_retries=0), new_job("recent", max_retries=0), new_job("queued")])
    claim(store, "old")
    store.fail("old", 1, "boom", None, "job_error", None, NODE, 1000.0)
    claim(store, "recent")
    store.complete("recent", 1, b"1", NODE, 5000.0)

    assert store.purge_finished(before=2000.0) == 1

    assert store.get("old") is None
    assert store.events("old") == []
    assert store.attempt_errors("old") == []
    assert store.get("recent").state is JobState.SUCCEEDED
    assert store.get("queued").state is JobState.QUEUED


def test_node_refuses_damaged_store(store, db_path):
    store.submit([new_job(f"job-{index}", payload=b"x" * 3000) for index in range(200)])
    store.close()
    data = bytearray(db_path.read_bytes())
    # Overwrite pages in the middle of the file, past the header and schema.
    middle = len(data) // 2
    data[middle:middle + 20000] = b"\xff" * 20000
    db_path.write_bytes(bytes(data))

    with pytest.raises(StoreError, match=str(db_path)):
        open_store("sqlite:///" + str(db_path), for_node=True)


def test_locked_store_error_names_file_after_timeout(store, db_path):
    from makeway.store.sqlite import SQLiteStore

    impatient = SQLiteStore(db_path, busy_timeout_s=0.2)
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match="stayed locked") as raised:
            impatient.submit([new_job("blocked")])
        assert time.monotonic() - started >= 0.2
        assert str(db_path) in str(raised.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        impatient.close()
    assert store.get("blocked") is None


def test_write_waits_for_other_writer(store, db_path):
    import threading

    holder = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("UPDATE jobs SET priority = priority")
    releaser = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
    releaser.start()
    try:
        started = time.monotonic()
        store.submit([new_job("waited")])
        waited_s = time.monotonic() - started
    finally:
        releaser.join()
        holder.close()

    assert store.get("waited").state is JobState.QUEUED
    # It waited for the other writer rather than failing, and well within its busy timeout.
    assert 0.25 <= waited_s < 10


def test_wal_restart_never_waits_for_readers(store, db_path):
    # RESTART holds the writer lock while it waits, so waiting for a reader
    # would keep every submission waiting too.
    writer = sqlite3.connect(db_path, isolation_level=None)
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    writer.execute("CREATE TABLE scratch (data BLOB)")
    page_size = writer.execute("PRAGMA page_size").fetchone()[0]
    writer.execute("BEGIN")
    for _ in range(RESTART_CHECKPOINT_PAGES // 256 + 2):
        writer.execute("INSERT INTO scratch VALUES (zeroblob(?))", (256 * page_size,))
    writer.execute("COMMIT")
    reader = sqlite3.connect(db_path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM scratch").fetchone()
    writer.execute("INSERT INTO scratch VALUES (zeroblob(1))")  # the reader's snapshot is now old
    checkpointer = _Checkpointer(db_path, interval_s=3600)
    try:
        attempt = threading.Thread(target=checkpointer.checkpoint)
        attempt.start()
        attempt.join(timeout=10)
        assert not attempt.is_alive(), "the checkpoint waited for a reader of an older snapshot"
        reader.execute("COMMIT")

        checkpointer.checkpoint()
        writer.execute("INSERT INTO scratch VALUES (zeroblob(1))")
        _, wal_pages, _ = writer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert wal_pages < 10  # the next writer started the WAL over
    finally:
        checkpointer.stop()
        reader.close()
        writer.close()
