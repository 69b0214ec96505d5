"""Cancellation, time limits, process trees, checkpoints and final states, as users of job queues met them.

Bounds are generous for a loaded 2-core machine; the benchmarks measure the
figures. Grace periods are the defaults unless a test sets them:
cancellation flag, then SIGTERM 0.5 s later, then SIGKILL 3 s after that.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sqlite3
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from makeway import JobCancelled, JobFailed, JobState
from makeway.node.process import group_members
from tests.apps import basic
from tests.conftest import wait_until, worker_pids

pytestmark = pytest.mark.timeout(240)

CANCEL_GRACE_S = 0.5
KILL_GRACE_S = 3.0


def reasons(app, job_id):
    return [event.reason for event in app.store.events(job_id)]


def line_times(path: Path) -> list[float]:
    if not path.exists():
        return []
    return [float(line.split()[1]) for line in path.read_text().splitlines()]


@pytest.fixture
def silent_server():
    """A loopback server that accepts connections and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server.getsockname()[1]
    server.close()


# -- cancel reports the truth and stops the job ------------------------------


def _cancel_while_running(app, handle, follower, wait_s=2.0):
    wait_until(lambda: handle.status() is JobState.RUNNING, message="job running")
    time.sleep(wait_s)
    requested_at = time.time()
    state = handle.cancel()
    # Cancelling a running job takes time, so the call returns the state it is still in.
    assert state in (JobState.RUNNING, JobState.SUSPENDED)
    with pytest.raises(JobCancelled):
        handle.result(timeout=30)
    record = app.store.get(handle.id)
    follower.result(timeout=30)
    follower_start = next(e.at for e in app.store.events(follower.id) if e.reason == "claimed")
    return requested_at, record, follower_start


@pytest.mark.parametrize("kind", ["sleep_loop", "cooperative", "async_sleep_loop", "busy_loop", "long_sleep"])
def test_cancel_stops_running_job_within_a_second(app, start_node, tmp_path, kind):
    start_node("[node]\nbackground_workers = 1\n")
    side_effects = tmp_path / "lines.txt"
    if kind == "sleep_loop":
        handle = basic.append_lines.submit(str(side_effects), 60, 0.5)
    elif kind == "cooperative":
        handle = basic.append_lines_cooperative.submit(str(side_effects), 60, 0.5)
    elif kind == "async_sleep_loop":
        handle = basic.async_append_lines.submit(str(side_effects), 60, 0.5)
    elif kind == "busy_loop":
        handle = basic.busy_loop.submit(60)
    else:
        handle = basic.long_sleep.submit(60)
    follower = basic.long_sleep.submit(0)

    requested_at, record, follower_start = _cancel_while_running(app, handle, follower)

    assert record.state is JobState.CANCELLED
    assert record.cancel_reason == "cancelled_by_user"
    # The cancellation flag, or SIGTERM after CANCEL_GRACE_S, stops it; a second is the goal.
    assert record.finished_at - requested_at < 1.0 + 1.0
    assert all(at <= record.finished_at for at in line_times(side_effects))
    lines_at_stop = len(line_times(side_effects))
    time.sleep(1.2)
    assert len(line_times(side_effects)) == lines_at_stop
    # The slot went to the next job at once.
    assert follower_start - record.finished_at < 1.0
    assert record.attempt == 1
    assert "cancel_requested" in reasons(app, handle.id)


def test_cancel_blocked_socket_read_within_grace(app, start_node, silent_server):
    start_node("[node]\nbackground_workers = 1\n")
    handle = basic.silent_read.submit(silent_server)
    follower = basic.long_sleep.submit(0)

    requested_at, record, follower_start = _cancel_while_running(app, handle, follower)

    assert record.state is JobState.CANCELLED
    assert record.finished_at - requested_at < CANCEL_GRACE_S + KILL_GRACE_S + 1.0
    assert follower_start - record.finished_at < 1.0


def test_cancel_of_job_that_ignores_it_escalates_to_kill(app, start_node):
    node = start_node("[node]\nbackground_workers = 1\n")
    handle = basic.ignore_stop.submit(120)
    wait_until(lambda: handle.status() is JobState.RUNNING, message="job running")
    pool_before = len(worker_pids(node))
    requested_at = time.time()

    handle.cancel()
    with pytest.raises(JobCancelled):
        handle.result(timeout=30)

    record = app.store.get(handle.id)
    assert CANCEL_GRACE_S + KILL_GRACE_S - 0.5 < record.finished_at - requested_at < CANCEL_GRACE_S + KILL_GRACE_S + 1.5
    assert "ended by signal" in record.error
    # The killed worker was replaced: the pool keeps its size.
    wait_until(lambda: len(worker_pids(node)) == pool_before, message="replacement worker")
    assert basic.long_sleep.submit(0).result(timeout=30) == 0


def test_cancel_queued_job_never_starts(app, start_node):
    start_node("[node]\nbackground_workers = 1\n")
    blocker = basic.long_sleep.submit(60)
    wait_until(lambda: blocker.status() is JobState.RUNNING, message="blocker running")
    queued = basic.long_sleep.submit(0)

    assert queued.cancel() is JobState.CANCELLED
    blocker.cancel(wait=10)
    time.sleep(0.5)

    record = app.store.get(queued.id)
    assert record.state is JobState.CANCELLED
    assert record.attempt == 0
    assert "claimed" not in reasons(app, queued.id)


def test_cli_cancel_reports_cancelling_then_cancelled(app, start_node, store_url):
    from typer.testing import CliRunner

    from makeway.cli import cli

    start_node()
    handle = basic.long_sleep.submit(60)
    wait_until(lambda: handle.status() is JobState.RUNNING, message="job running")

    result = CliRunner().invoke(cli, ["cancel", handle.id, "--store", store_url, "--wait", "10"])

    assert result.exit_code == 0, result.output
    assert f"{handle.id}: cancelled" in result.output
    assert handle.status() is JobState.CANCELLED
    again = CliRunner().invoke(cli, ["cancel", handle.id, "--store", store_url])
    assert "already cancelled" in again.output


# -- time limits on jobs that do not cooperate ---------------------------------


def test_time_limit_stops_every_kind_and_keeps_slots(app, start_node, silent_server):
    node = start_node("[node]\nslots = 2\n")
    pool_size = len(worker_pids(node))
    limit_s = 2.0
    limited = []
    for _ in range(2):
        limited += [
            basic.busy_loop.options(timeout=limit_s).submit(3600),
            basic.long_sleep.options(timeout=limit_s).submit(3600),
            basic.silent_read.options(timeout=limit_s).submit(silent_server),
            basic.hold_gil.options(timeout=limit_s).submit(3 * 10**9),
            basic.ignore_stop.options(timeout=limit_s).submit(3600),
        ]
    short = [basic.long_sleep.submit(0) for _ in range(20)]

    for handle in short:
        assert handle.result(timeout=180) == 0
    for handle in limited:
        with pytest.raises(JobFailed, match="timed out"):
            handle.result(timeout=60)

    for handle in limited:
        record = app.store.get(handle.id)
        assert record.state is JobState.FAILED
        assert reasons(app, handle.id)[-1] == "timed_out"
        # The limit, then the flag's grace, then SIGTERM's grace before SIGKILL.
        assert record.finished_at - record.started_at < limit_s + CANCEL_GRACE_S + KILL_GRACE_S + 1.5
        assert record.run_s >= limit_s - 0.1
    wait_until(lambda: len(worker_pids(node)) == pool_size, message="pool back to its size")


def test_time_limit_counts_only_running_time(app, start_node):
    start_node("[node]\nslots = 1\n")
    handle = basic.spin.options(timeout=2.5).submit(1.5)
    wait_until(lambda: handle.status() is JobState.RUNNING, message="spin running")
    # Interactive work suspends the bulk job for 2 s; that time does not count.
    basic.interactive_sleep.submit(2.0).result(timeout=30)

    assert handle.result(timeout=30) > 0
    record = app.store.get(handle.id)
    assert record.finished_at - record.started_at > 2.5
    assert "preempted" in reasons(app, handle.id)


def test_deadline_cancels_running_and_queued_jobs(app, start_node):
    start_node("[node]\nbackground_workers = 1\n")
    running = basic.long_sleep.options(deadline=time.time() + 1.5).submit(60)
    queued = basic.long_sleep.options(deadline=time.time() + 1.0).submit(0)

    with pytest.raises(JobCancelled):
        running.result(timeout=30)
    with pytest.raises(JobCancelled):
        queued.result(timeout=30)

    assert reasons(app, running.id)[-1] == "deadline_exceeded"
    assert reasons(app, queued.id)[-1] == "deadline_exceeded"
    assert app.store.get(queued.id).started_at is None


# -- stops reach the whole process tree -------------------------------------


def tree_cpu(tree: list[psutil.Process]) -> dict[int, float]:
    """CPU seconds of each process of `tree` that still exists."""
    usage = {}
    for process in tree:
        try:
            usage[process.pid] = sum(process.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return usage


def _descendants(worker_pid: int) -> list[str]:
    """The live processes of the worker's group other than the worker, described for a failure message."""
    left = []
    for pid in group_members(worker_pid):
        if pid == worker_pid:
            continue
        try:
            process = psutil.Process(pid)
            left.append(f"{pid} {process.status()} ppid={process.ppid()} {' '.join(process.cmdline())}")
        except psutil.NoSuchProcess:
            pass
    return left


@pytest.mark.parametrize("stop", ["cancel", "time_limit"])
def test_stop_reaches_grandchildren(app, start_node, tmp_path, stop):
    start_node()
    marker, pid_file = tmp_path / "sleeper-finished", tmp_path / "shell.pid"
    timeout = 2.0 if stop == "time_limit" else None
    handle = basic.shell_tree.options(timeout=timeout).submit(str(marker), str(pid_file))
    wait_until(lambda: pid_file.exists(), message="shell started")
    worker_pid = app.store.get(handle.id).worker_pid
    wait_until(lambda: len(group_members(worker_pid)) >= 4, message="shell and grandchildren running")
    if stop == "cancel":
        time.sleep(1.0)
        handle.cancel()

    with pytest.raises((JobCancelled, JobFailed)):
        handle.result(timeout=30)
    try:
        wait_until(lambda: not _descendants(worker_pid), timeout_s=CANCEL_GRACE_S + KILL_GRACE_S + 1.0)
    except AssertionError:
        pytest.fail(f"descendants left after the stop: {_descendants(worker_pid)}")
    # The sleeper would have written its file 4 s after it started.
    time.sleep(4.5)
    assert not marker.exists()


def test_stop_kills_child_in_own_session_with_warning(app, start_node, tmp_path):
    node_log = tmp_path / "node-0.log"
    start_node()
    pid_file = tmp_path / "child.pid"
    handle = basic.start_own_session.submit(str(pid_file), 60)
    wait_until(lambda: pid_file.exists() and pid_file.read_text(), message="child started")
    child = psutil.Process(int(pid_file.read_text()))
    assert os.getpgid(child.pid) != app.store.get(handle.id).worker_pid

    handle.cancel()
    with pytest.raises(JobCancelled):
        handle.result(timeout=30)

    wait_until(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, timeout_s=5,
               message="escaped child killed")
    assert "outside its process group" in node_log.read_text()


def test_suspend_stops_whole_tree_and_resume_continues_it(app, start_node, tmp_path):
    # No min_share bursts: the tree must stay stopped for the whole suspension.
    start_node("[node]\nslots = 1\n\n[tiers.bulk]\nmin_share = 0.0\n")
    marker, pid_file = tmp_path / "sleeper-finished", tmp_path / "shell.pid"
    handle = basic.shell_tree.submit(str(marker), str(pid_file))
    wait_until(lambda: pid_file.exists(), message="shell started")
    worker_pid = app.store.get(handle.id).worker_pid
    wait_until(lambda: len(group_members(worker_pid)) >= 4, message="shell and grandchildren running")
    tree = [psutil.Process(pid) for pid in group_members(worker_pid)]

    interactive = basic.interactive_sleep.submit(5.0)
    wait_until(lambda: handle.status() is JobState.SUSPENDED, message="tree suspended")
    before = tree_cpu(tree)
    time.sleep(3.0)
    during = tree_cpu(tree)
    interactive.result(timeout=30)
    wait_until(lambda: handle.status() is JobState.RUNNING, message="tree resumed")
    resumed = tree_cpu(tree)
    time.sleep(1.0)
    after = tree_cpu(tree)

    assert sum(during[pid] - before[pid] for pid in during) <= 0.01 * 3.0
    assert sum(after[pid] - resumed[pid] for pid in after if pid in resumed) > 0.3
    # The sleeper resumed too and wrote its file.
    wait_until(lambda: marker.exists(), timeout_s=10, message="sleeper finished after resume")
    handle.cancel(wait=10)


# -- checkpoints survive every interruption ------------------------------------


def test_batch_checkpoints_never_skip_items(app, start_node, tmp_path):
    config = """
[node]
slots = 1
poll_interval_s = 0.05
shutdown_grace_s = 5.0

[tiers.bulk]
preemption = ["requeue"]
requeue_grace_s = 0.02
"""
    node = start_node(config)
    results = tmp_path / "results.db"
    total, batch = 1000, 10
    handle = basic.record_items.submit(str(results), total, batch, 0.01)
    rng = random.Random(30)
    interruptions = Counter()

    attempt = 0
    for index in range(20):
        # Interrupt a new attempt each time, never the gap between two.
        if not wait_for_new_attempt(app, handle, attempt):
            break
        attempt = app.store.get(handle.id).attempt
        time.sleep(rng.uniform(0.1, 0.4))
        if handle.status().is_final:
            break
        mode = ("pause", "sigkill", "shutdown")[index % 3]
        if mode == "pause":
            app.store.set_paused(tier="bulk", paused=True, now=time.time())
            app._wake_nodes(control=True)
            wait_until(lambda: handle.status() is JobState.QUEUED or handle.status().is_final, message="job left its slot")
            app.store.set_paused(tier="bulk", paused=False, now=time.time())
            app._wake_nodes(control=True)
        elif mode == "sigkill":
            pid = app.store.get(handle.id).worker_pid
            if pid:
                os.kill(pid, signal.SIGKILL)
        else:
            node.stop(timeout_s=30)
            node = start_node(config)
        interruptions[mode] += 1

    assert handle.result(timeout=180) == total
    assert sum(interruptions.values()) == 20
    with sqlite3.connect(results) as db:
        rows = db.execute("SELECT id, attempt FROM processed").fetchall()
    counts = Counter(item for item, _ in rows)
    assert sorted(counts) == list(range(1, total + 1))
    duplicated_batches = {(item - 1) // batch for item, count in counts.items() if count > 1}
    assert len(duplicated_batches) <= 20
    assert sum(count - 1 for count in counts.values()) <= batch * 20
    record = app.store.get(handle.id)
    assert record.state is JobState.SUCCEEDED
    assert '"cursor":1000' in record.checkpoint
    assert '"finished":true' in record.checkpoint
    events = reasons(app, handle.id)
    assert events.count("worker_lost") == interruptions["sigkill"]
    assert events.count("yielded") + events.count("requeued") + events.count("shutdown") == (
        interruptions["pause"] + interruptions["shutdown"])


def wait_for_new_attempt(app, handle, previous_attempt: int) -> bool:
    """Wait until an attempt after `previous_attempt` runs; False if the job ended instead."""
    def running_again():
        record = app.store.get(handle.id)
        return record.state.is_final or (record.state is JobState.RUNNING and record.attempt > previous_attempt)

    wait_until(running_again, timeout_s=60, message="a new attempt running")
    return not handle.status().is_final


# -- deliberate stops are not failures -----------------------------------------


def test_final_states_tell_stops_from_failures(app, start_node, tmp_path):
    start_node("[node]\nslots = 2\npoll_interval_s = 0.05\n\n[jobs]\nmax_worker_losses = 0\n")
    j1 = basic.long_sleep.submit(60)
    j3 = basic.sleep_past_timeout.submit(30)
    wait_until(lambda: j1.status() is JobState.RUNNING and j3.status() is JobState.RUNNING, message="j1, j3 running")
    j2 = basic.long_sleep.submit(0)
    assert j2.cancel() is JobState.CANCELLED
    j1.cancel(wait=10)
    with pytest.raises(JobFailed, match="timed out"):
        j3.result(timeout=30)

    j4 = basic.long_sleep.options(max_retries=0).submit(60)
    wait_until(lambda: j4.status() is JobState.RUNNING, message="j4 running")
    os.kill(app.store.get(j4.id).worker_pid, signal.SIGKILL)
    j5 = basic.explode.submit("j5 broke")
    j6 = basic.burn_with_checkpoints.submit(1.0, 0.1)
    wait_until(lambda: app.store.get(j6.id).checkpoints >= 2, message="j6 checkpointed")
    app.store.set_paused(job_id=j6.id, paused=True, now=time.time())
    app._wake_nodes(control=True)
    wait_until(lambda: j6.status() in (JobState.QUEUED, JobState.SUSPENDED), message="j6 preempted")
    app.store.set_paused(job_id=j6.id, paused=False, now=time.time())
    app._wake_nodes(control=True)
    j7 = basic.spin.submit(1.0)
    wait_until(lambda: j7.status() is JobState.RUNNING, message="j7 running")
    basic.interactive_sleep.submit(0.5).result(timeout=30)

    for handle in (j4, j5):
        with pytest.raises(JobFailed):
            handle.result(timeout=30)
    assert j6.result(timeout=60) == pytest.approx(1.0)
    assert j7.result(timeout=60) > 0

    final = {name: app.store.get(handle.id) for name, handle in
             {"j1": j1, "j2": j2, "j3": j3, "j4": j4, "j5": j5, "j6": j6, "j7": j7}.items()}
    last_reason = {name: app.store.events(record.id)[-1].reason for name, record in final.items()}
    assert (final["j1"].state, last_reason["j1"]) == (JobState.CANCELLED, "cancelled_by_user")
    assert (final["j2"].state, last_reason["j2"]) == (JobState.CANCELLED, "cancelled_by_user")
    assert (final["j3"].state, last_reason["j3"]) == (JobState.FAILED, "timed_out")
    assert (final["j4"].state, last_reason["j4"]) == (JobState.FAILED, "worker_lost")
    assert (final["j5"].state, last_reason["j5"]) == (JobState.FAILED, "job_error")
    assert "j5 broke" in final["j5"].error
    assert final["j6"].state is JobState.SUCCEEDED
    assert final["j7"].state is JobState.SUCCEEDED
    # Who cancelled and when is on the record.
    assert final["j1"].cancel_requested_at is not None and final["j1"].cancel_reason == "cancelled_by_user"
    # Cancelled jobs are never retried; preemptions never count as failures.
    assert final["j1"].attempt == 1
    assert final["j2"].attempt == 0
    assert final["j6"].failures == 0
    assert final["j7"].failures == 0
    assert {"yielded", "preempted"} & set(reasons(app, j6.id))
    assert "preempted" in reasons(app, j7.id)
    assert "resumed" in reasons(app, j7.id)
    for record in final.values():
        for event in app.store.events(record.id):
            assert event.at > 0
            assert event.attempt >= 0
            if event.reason not in ("submitted", "cancelled_by_user", "cancel_requested", "paused", "unpaused"):
                assert event.node_id is not None, event
