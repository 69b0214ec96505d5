"""Long jobs on real nodes: yield points, checkpoints, requeue, time slicing, pause and accounting."""

from __future__ import annotations

import time

import pytest

from makeway import JobContext, JobState
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(180)

# One background slot, fast polling, and bulk jobs that rotate every 50 ms.
ROTATING = """
[node]
slots = 1
poll_interval_s = 0.05

[tiers.bulk]
quantum_s = 0.05
preemption = ["yield", "requeue"]
yield_grace_s = 0.5
requeue_grace_s = 0.2

[jobs]
kill_grace_s = 2.0
"""


def reasons(app, job_id):
    return [event.reason for event in app.store.events(job_id)]


def uninterrupted_walk(total):
    from tests.apps.basic import walk

    return walk.fn(total, ctx=JobContext.local("walk"))


def test_walk_survives_yields_and_requeues_with_exact_result(app, start_node, tmp_path):
    from tests.apps.basic import walk

    start_node(ROTATING)
    total = 1_000_000
    # Two walks share one slot and rotate. Each of two slow items makes a yield
    # request time out, so the job is requeued by SIGTERM mid-item.
    first = walk.submit(total, slow_items=[300_000, 700_000], marker_dir=str(tmp_path), item_us=3)
    second = walk.submit(total, item_us=3)

    expected = uninterrupted_walk(total)
    assert first.result(timeout=150) == expected
    assert second.result(timeout=150) == expected

    events = reasons(app, first.id) + reasons(app, second.id)
    assert events.count("yielded") >= 20
    assert reasons(app, first.id).count("requeued") == 2
    record = app.store.get(first.id)
    assert record.failures == 0
    assert record.attempt == 1 + reasons(app, first.id).count("yielded") + 2
    assert record.checkpoints >= record.attempt


def test_job_without_yield_points_is_requeued_by_fallback(app, start_node):
    from tests.apps.basic import essential_spin, never_yields

    start_node(ROTATING + "\n[tiers.essential]\nmax_wait_s = 0.5\n")
    bulk = never_yields.submit(60)
    wait_until(lambda: bulk.status() is JobState.RUNNING, message="bulk job running")
    essential = essential_spin.submit(0.1)

    essential.result(timeout=30)

    events = app.store.events(bulk.id)
    requeue = next(event for event in events if event.reason == "requeued")
    claimed = next(event for event in app.store.events(essential.id) if event.reason == "claimed")
    submitted = app.store.get(essential.id).submitted_at
    # max_wait 0.5 s, then yield grace 0.5 s, requeue grace 0.2 s: well under 5 s.
    assert requeue.at - submitted < 5.0
    assert claimed.at >= requeue.at
    assert app.store.get(bulk.id).failures == 0
    assert bulk.status() in (JobState.QUEUED, JobState.RUNNING)
    bulk.cancel()


def test_short_essential_job_finishes_within_max_wait_behind_long_bulk(app, start_node):
    from tests.apps.basic import essential_spin, walk

    start_node("""
[node]
slots = 1
poll_interval_s = 0.1

[tiers.essential]
max_wait_s = 2.0
""")
    bulk = walk.submit(30_000_000, item_us=1)
    wait_until(lambda: bulk.status() is JobState.RUNNING, message="bulk job running")
    essential = essential_spin.submit(0.1)

    essential.result(timeout=30)

    record = app.store.get(essential.id)
    assert record.finished_at - record.submitted_at < 2.0 + 1.5
    assert not bulk.status().is_final
    # The default modes park the bulk job in its worker: no work is lost.
    assert "preempted" in reasons(app, bulk.id)
    assert app.store.get(bulk.id).attempt == 1
    assert bulk.cancel(wait=20) is JobState.CANCELLED


def test_yielded_job_resumes_from_checkpoint(app, start_node):
    from tests.apps.basic import burn_with_checkpoints

    start_node(ROTATING)
    first = burn_with_checkpoints.submit(1.5, 0.1)
    second = burn_with_checkpoints.submit(1.5, 0.1)

    assert first.result(timeout=60) == pytest.approx(1.5)
    assert second.result(timeout=60) == pytest.approx(1.5)
    record = app.store.get(first.id)
    assert "yielded" in reasons(app, first.id)
    # Each attempt resumed where the previous stopped: the CPU time of all
    # attempts is close to the work, not to the work times the attempts.
    assert record.cpu_s < 1.5 + 0.5 * record.attempt
    assert record.cpu_s >= 1.4
    assert record.wasted_cpu_s < 0.5


def test_requeue_records_wasted_cpu_since_last_checkpoint(app, start_node):
    from tests.apps.basic import burn_with_checkpoints, essential_spin

    start_node("""
[node]
slots = 1
poll_interval_s = 0.05

[tiers.bulk]
preemption = ["requeue"]
requeue_grace_s = 0.0

[tiers.essential]
max_wait_s = 0.2
""")
    bulk = burn_with_checkpoints.submit(4.0, 1.0)
    wait_until(lambda: app.store.get(bulk.id).checkpoints >= 1, message="first checkpoint")
    time.sleep(0.5)
    essential_spin.submit(0.05).result(timeout=30)

    assert bulk.result(timeout=60) == pytest.approx(4.0)
    record = app.store.get(bulk.id)
    assert reasons(app, bulk.id).count("requeued") == 1
    assert 0.2 < record.wasted_cpu_s < 1.2
    assert record.failures == 0


def test_pause_tier_yields_running_job_and_claims_nothing_new(app, start_node, store_url):
    from typer.testing import CliRunner

    from makeway.cli import cli
    from tests.apps.basic import add, walk

    start_node(ROTATING)
    runner = CliRunner()
    running = walk.submit(50_000_000, item_us=1)
    wait_until(lambda: running.status() is JobState.RUNNING, message="walk running")

    result = runner.invoke(cli, ["pause", "bulk", "--store", store_url])
    assert result.exit_code == 0, result.output
    assert "tier bulk: paused" in result.output
    wait_until(lambda: running.status() is JobState.QUEUED, message="walk yielded")
    waiting = walk.submit(10)
    # Interactive work goes on while bulk is paused.
    assert add.submit(2, 3).result(timeout=20) == 5
    time.sleep(0.5)
    assert running.status() is JobState.QUEUED
    assert waiting.status() is JobState.QUEUED
    assert "yielded" in reasons(app, running.id)

    result = runner.invoke(cli, ["resume", "bulk", "--store", store_url])
    assert result.exit_code == 0, result.output
    assert waiting.result(timeout=30)["count"] == 10
    running.cancel(wait=20)


def test_pause_job_by_suspension_holds_it_stopped(app, start_node, store_url):
    from typer.testing import CliRunner

    from makeway.cli import cli
    from tests.apps.basic import spin

    start_node("[node]\nslots = 1\npoll_interval_s = 0.05\n")
    job = spin.submit(2.0)
    wait_until(lambda: job.status() is JobState.RUNNING, message="spin running")

    runner = CliRunner()
    assert runner.invoke(cli, ["pause", job.id, "--store", store_url]).exit_code == 0
    wait_until(lambda: job.status() is JobState.SUSPENDED, message="job suspended by the pause")
    time.sleep(1.0)
    assert job.status() is JobState.SUSPENDED

    assert runner.invoke(cli, ["resume", job.id, "--store", store_url]).exit_code == 0
    assert job.result(timeout=30) > 0
    resumed = [e for e in app.store.events(job.id) if e.from_state == "suspended" and e.to_state == "running"]
    assert [event.reason for event in resumed] == ["unpaused"]


def test_pause_unknown_target_names_the_fix(app, store_url):
    from typer.testing import CliRunner

    from makeway.cli import cli

    app.store  # creates the store
    result = CliRunner().invoke(cli, ["pause", "no-such-thing", "--store", store_url])

    assert result.exit_code != 0
    assert "neither a tier" in str(result.exception) or "neither a tier" in result.output


def test_progress_shown_by_status(app, start_node, store_url):
    from typer.testing import CliRunner

    from makeway.cli import cli
    from tests.apps.basic import report_progress

    start_node()
    job = report_progress.submit(20)
    assert job.result(timeout=30) == 20

    record = app.store.get(job.id)
    assert (record.progress_done, record.progress_total, record.progress_message) == (20.0, 20.0, "step 20")
    result = CliRunner().invoke(cli, ["status", job.id, "--store", store_url])
    assert result.exit_code == 0, result.output
    assert "20/20 (100 %) step 20" in result.output
    assert "completed" in result.output
    details = CliRunner().invoke(cli, ["status", job.id, "--store", store_url, "--json"])
    assert '"last_reason": "completed"' in details.output
    assert '"result": "20"' in details.output


def test_stale_checkpoint_after_lost_lease_is_rejected(app, start_node):
    from tests.apps.basic import burn_with_checkpoints

    start_node()
    job = burn_with_checkpoints.submit(30.0, 0.2)
    wait_until(lambda: app.store.get(job.id).checkpoints >= 1, message="first checkpoint")
    record = app.store.get(job.id)
    # Another node takes the job over, as after a partition: this attempt is stale now.
    app.store.requeue(job.id, record.attempt, "lease_expired", "other-node", time.time())
    app.store.set_paused(job_id=job.id, paused=True, now=time.time())
    checkpoints = app.store.get(job.id).checkpoints

    time.sleep(1.0)

    after = app.store.get(job.id)
    assert after.checkpoints == checkpoints
    assert after.state is JobState.QUEUED
    assert after.attempt == record.attempt


PARKING = """
[node]
slots = 1
poll_interval_s = 0.05

[tiers.bulk]
quantum_s = 0.3
"""


def test_jobs_without_checkpoints_rotate_by_parking(app, start_node):
    from tests.apps.basic import spin

    start_node(PARKING)
    first = spin.submit(1.5)
    second = spin.submit(1.5)

    first.result(timeout=60)
    second.result(timeout=60)

    records = [app.store.get(first.id), app.store.get(second.id)]
    # Both took turns on the one slot, and neither lost work.
    assert [record.attempt for record in records] == [1, 1]
    second_claimed = next(e.at for e in app.store.events(second.id) if e.reason == "claimed")
    assert second_claimed < records[0].finished_at
    assert "preempted" in reasons(app, first.id)
    assert "time_slice" in reasons(app, first.id)
    assert records[0].failures == 0
    assert records[1].failures == 0


def test_jobs_without_checkpoints_never_restart_each_other(app, start_node):
    from tests.apps.basic import spin

    start_node("""
[node]
slots = 1
poll_interval_s = 0.05
max_parked_jobs = 0

[tiers.bulk]
quantum_s = 0.3
""")
    first = spin.submit(1.0)
    wait_until(lambda: first.status() is JobState.RUNNING, message="first running")
    second = spin.submit(1.0)

    first.result(timeout=60)
    second.result(timeout=60)

    first_record, second_record = app.store.get(first.id), app.store.get(second.id)
    # No parking room and no checkpoint: the second job waits for the first.
    assert first_record.attempt == 1
    assert second_record.attempt == 1
    second_claimed = next(e.at for e in app.store.events(second.id) if e.reason == "claimed")
    assert second_claimed >= first_record.finished_at
    assert "yield_requested" not in reasons(app, first.id)


def test_transaction_writes_each_row_once_despite_kills(app, start_node):
    import os
    import signal
    import sqlite3

    from tests.apps.basic import ledger

    start_node("[node]\nslots = 1\n\n[jobs]\nretry_backoff_s = 0.05\nretry_jitter_s = 0.05\n")
    total = 300
    handle = ledger.submit(total, 0.01)
    for _ in range(5):
        wait_until(lambda: app.store.get(handle.id).checkpoints >= 1 and handle.status() is JobState.RUNNING
                   or handle.status().is_final, message="ledger running")
        if handle.status().is_final:
            break
        time.sleep(0.3)
        pid = app.store.get(handle.id).worker_pid
        if pid:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)

    assert handle.result(timeout=120) == total
    with sqlite3.connect(app.store.path) as db:
        rows = db.execute("SELECT item FROM ledger").fetchall()
    assert sorted(item for (item,) in rows) == list(range(total))
    assert "worker_lost" in reasons(app, handle.id)


def test_transaction_past_cap_rolls_back(app, start_node):
    import sqlite3

    from makeway import JobFailed
    from tests.apps.basic import long_transaction

    start_node("[jobs]\ntransaction_max_s = 0.3\n")
    handle = long_transaction.submit(1.0)

    with pytest.raises(JobFailed, match="transaction_max_s"):
        handle.result(timeout=30)
    with sqlite3.connect(app.store.path) as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "slow" not in tables
    assert app.store.get(handle.id).checkpoint is None


def test_transaction_of_stale_attempt_writes_nothing(app):
    import sqlite3

    from makeway import JobContext
    from makeway.errors import StaleAttempt
    from tests.apps.basic import ledger

    handle = ledger.submit(10, 0.0)
    app.store.claim(handle.id, "node-a", 1, time.time() + 30, time.time())
    app.store.requeue(handle.id, 1, "lease_expired", "node-b", time.time())
    app.store.claim(handle.id, "node-b", 2, time.time() + 30, time.time())
    stale = JobContext(job_id=handle.id, name="ledger", tier="bulk", attempt=1, metadata={}, flags=None,
                       store_path=app.store.path)

    with pytest.raises(StaleAttempt):
        with stale.transaction(checkpoint={"next": 5}) as db:
            db.execute("CREATE TABLE written (value INTEGER)")

    with sqlite3.connect(app.store.path) as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "written" not in tables
    assert app.store.get(handle.id).checkpoint is None


def test_transaction_result_survives_worker_kill(app, start_node):
    import os
    import signal
    import sqlite3

    from tests.apps.basic import finish_in_transaction

    start_node("[jobs]\nretry_backoff_s = 0.05\nretry_jitter_s = 0.05\n")
    marker = app.store.path.parent / "committed"
    lingering = finish_in_transaction.submit(str(marker), 60)
    wait_until(marker.exists, message="final transaction committed")
    # The job succeeded with its commit; killing the worker before the
    # function returns must neither run it again nor change its result.
    assert lingering.status() is JobState.SUCCEEDED
    os.kill(app.store.get(lingering.id).worker_pid, signal.SIGKILL)
    marker.unlink()
    quick = finish_in_transaction.submit(str(marker), 0)

    assert quick.result(timeout=30) == {"rows": 1}
    assert lingering.result(timeout=5) == {"rows": 1}
    time.sleep(1.0)
    record = app.store.get(lingering.id)
    assert (record.state, record.attempt) == (JobState.SUCCEEDED, 1)
    completed = [event for event in app.store.events(lingering.id) if event.to_state == "succeeded"]
    assert [event.detail for event in completed] == ["result committed with the job's transaction"]
    assert "worker_lost" not in reasons(app, lingering.id)
    with sqlite3.connect(app.store.path) as db:
        rows = db.execute("SELECT job_id, attempt FROM final_ledger ORDER BY job_id").fetchall()
    assert sorted(rows) == sorted([(lingering.id, 1), (quick.id, 1)])


def test_transaction_result_and_checkpoint_are_exclusive(app):
    from makeway import JobContext
    from makeway.errors import UsageError
    from tests.apps.basic import ledger

    handle = ledger.submit(10, 0.0)
    app.store.claim(handle.id, "node-a", 1, time.time() + 30, time.time())
    ctx = JobContext(job_id=handle.id, name="ledger", tier="bulk", attempt=1, metadata={}, flags=None,
                     store_path=app.store.path, encode_result=lambda value: repr(value).encode())

    with pytest.raises(UsageError, match="not both"):
        with ctx.transaction(checkpoint={"next": 1}, result=1):
            pass
    with ctx.transaction(result=None):
        pass
    assert app.store.get(handle.id).state is JobState.SUCCEEDED
    with pytest.raises(UsageError, match="already recorded"):
        with ctx.transaction():
            pass
    with pytest.raises(UsageError, match="already recorded"):
        ctx.checkpoint({"next": 2})
