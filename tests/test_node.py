"""A real node: worker processes, signals and the store, end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from makeway import JobFailed, JobState
from tests.apps import basic
from tests.conftest import REPO_ROOT, cpu_seconds, node_log, wait_until, worker_pids


def states_of(app, handles):
    return [app.store.get(handle.id).state for handle in handles]


def reasons_of(app, handle):
    return [event.reason for event in app.store.events(handle.id)]


def test_result_round_trip(app, start_node):
    start_node()

    assert basic.add.submit(2, 3).result(timeout=20) == 5
    assert basic.async_add.submit(4, 5).result(timeout=20) == 9


def test_submit_and_result_across_processes(app, store_url, start_node):
    start_node()
    script = (
        "from tests.apps.basic import app, add\n"
        f"app.use_store({store_url!r})\n"
        "print(add.submit(20, 22).id)\n"
    )
    output = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    job_id = output.stdout.strip()

    assert app.handle(job_id).result(timeout=20) == 42
    assert app.handle(job_id).status() is JobState.SUCCEEDED


def test_failed_job_carries_remote_traceback(app, start_node):
    start_node()

    with pytest.raises(JobFailed) as caught:
        basic.explode.submit("boom").result(timeout=20)

    assert "RuntimeError: boom" in str(caught.value)
    assert "in explode" in caught.value.remote_traceback


def test_result_timeout_leaves_job_running(app, tmp_path, start_node):
    start_node()
    gate = tmp_path / "gate"
    handle = basic.wait_for_file.submit(str(gate))

    with pytest.raises(TimeoutError):
        handle.result(timeout=0.2)
    gate.write_text("go")

    assert isinstance(handle.result(timeout=20), int)


def test_suspended_worker_uses_no_cpu(app, start_node):
    start_node()
    bulk = [basic.spin.submit(3.0) for _ in range(2)]
    wait_until(lambda: all(state is JobState.RUNNING for state in states_of(app, bulk)), message="bulk jobs running")
    pids = [app.store.get(handle.id).worker_pid for handle in bulk]

    interactive = basic.interactive_sleep.submit(2.0)
    wait_until(lambda: all(state is JobState.SUSPENDED for state in states_of(app, bulk)), message="bulk jobs suspended")
    before = [cpu_seconds(pid) for pid in pids]
    time.sleep(0.5)
    after = [cpu_seconds(pid) for pid in pids]

    assert [psutil.Process(pid).status() for pid in pids] == [psutil.STATUS_STOPPED] * 2
    assert all(end - start < 0.02 for start, end in zip(before, after)), (before, after)
    assert isinstance(interactive.result(timeout=20), int)
    assert [handle.result(timeout=30) for handle in bulk] == pids
    for handle in bulk:
        reasons = reasons_of(app, handle)
        assert "preempted" in reasons
        assert "resumed" in reasons
        assert app.store.get(handle.id).attempt == 1


def test_result_stored_before_suspension_records(app, start_node):
    """The suspensions an interactive job causes are stored after its result, so they never delay it."""
    start_node()
    bulk = [basic.spin.submit(5.0) for _ in range(2)]
    wait_until(lambda: all(state is JobState.RUNNING for state in states_of(app, bulk)), message="bulk jobs running")

    def resumed_after(job_id, at):
        return any(event.reason == "resumed" and event.at > at for event in app.store.query_events(job_id=job_id))

    for _ in range(3):
        # The job sleeps, so the bulk workers get a core to stop on at once.
        # Their suspensions are stored after its result (at most 50 ms later).
        interactive = basic.interactive_sleep.submit(0.015)
        interactive.result(timeout=20)
        events = app.store.query_events(job_id=interactive.id)
        submitted, done = events[0], events[-1]
        assert done.to_state == "succeeded"
        # Resumed after the hold, so the next job stops them again.
        wait_until(lambda: all(resumed_after(handle.id, done.at) for handle in bulk), message="bulk jobs resumed")
        for handle in bulk:
            stops = [event for event in app.store.query_events(job_id=handle.id)
                     if event.reason == "preempted" and submitted.at <= event.at <= done.at]
            assert len(stops) == 1
            # Sent while the job waited or ran, written after its result.
            assert stops[0].id > done.id
    for handle in bulk:
        assert app.store.get(handle.id).attempt == 1


def test_killed_worker_job_requeued(app, tmp_path, start_node):
    node = start_node()
    workers_before = len(worker_pids(node))
    marker = tmp_path / "first-attempt"

    handle = basic.kill_self_first_attempt.submit(str(marker))

    assert handle.result(timeout=30) == "survived"
    record = app.store.get(handle.id)
    assert record.attempt == 2
    assert "worker_lost" in reasons_of(app, handle)
    assert int(marker.read_text()) != record.worker_pid
    wait_until(lambda: len(worker_pids(node)) == workers_before, message="replacement worker")


def test_critical_section_never_suspended(app, start_node):
    start_node()
    probe = basic.critical_probe.submit(8, 0.25)
    wait_until(lambda: app.store.get(probe.id).state is JobState.RUNNING, message="probe running")

    # Interactive work that keeps arriving makes the supervisor try to
    # suspend the probe in and out of its critical sections.
    while app.store.get(probe.id).state in (JobState.RUNNING, JobState.SUSPENDED):
        basic.interactive_sleep.submit(0.3).result(timeout=20)
    gaps = probe.result(timeout=30)

    assert gaps["inside"] < 0.2, gaps
    assert gaps["outside"] >= 0.2, gaps


def test_min_share_keeps_bulk_progressing(app, start_node):
    start_node("[policy]\nmin_share_period_s = 1.0\n")
    bulk = basic.spin.submit(30.0)
    wait_until(lambda: app.store.get(bulk.id).state is JobState.RUNNING, message="bulk job running")
    pid = app.store.get(bulk.id).worker_pid

    interactive = basic.interactive_sleep.submit(4.0)
    wait_until(lambda: app.store.get(bulk.id).state is JobState.SUSPENDED, message="bulk job suspended")
    before = cpu_seconds(pid)
    time.sleep(3.0)
    used = cpu_seconds(pid) - before
    interactive.result(timeout=20)

    # The default min_share is 5 % of each second: about 0.15 s of CPU in 3 s.
    assert used >= 0.05, used
    assert used <= 1.0, used


def test_as_needed_suspends_only_what_interactive_needs(app, start_node):
    start_node("[policy]\nsuspend = 'as-needed'\n[node]\nslots = 2\n")
    bulk = [basic.spin.submit(3.0) for _ in range(2)]
    wait_until(lambda: all(state is JobState.RUNNING for state in states_of(app, bulk)), message="bulk jobs running")

    interactive = basic.interactive_sleep.submit(1.5)
    wait_until(lambda: JobState.SUSPENDED in states_of(app, bulk), message="one bulk job suspended")
    time.sleep(0.3)

    assert sorted(state.value for state in states_of(app, bulk)) == ["running", "suspended"]
    interactive.result(timeout=20)
    for handle in bulk:
        handle.result(timeout=30)


def test_node_stops_on_sigterm(app, start_node, tmp_path):
    node = start_node("[node]\nshutdown_grace_s = 0.5\n")
    pids = worker_pids(node)
    handle = basic.spin.submit(30.0)
    wait_until(lambda: app.store.get(handle.id).state is JobState.RUNNING, message="job running")

    exit_code = node.stop(timeout_s=20)

    assert exit_code == 0
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
    record = app.store.get(handle.id)
    assert record.state is JobState.QUEUED
    assert reasons_of(app, handle)[-1] == "shutdown"
    assert record.failures == 0
    assert "Node stopped" in node_log(tmp_path)


def test_node_logs_resolved_store(app, start_node, tmp_path, store_url):
    start_node()

    assert f"Using store {store_url}" in node_log(tmp_path)


def test_status_lists_suspended_worker(app, start_node, store_url):
    start_node()
    bulk = basic.spin.submit(3.0)
    wait_until(lambda: app.store.get(bulk.id).state is JobState.RUNNING, message="bulk job running")
    interactive = basic.interactive_sleep.submit(1.5)
    wait_until(lambda: app.store.get(bulk.id).state is JobState.SUSPENDED, message="bulk job suspended")

    output = subprocess.run([sys.executable, "-m", "makeway", "status", "--json", "--store", store_url],
                            capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    status = json.loads(output.stdout)

    suspended = [job for job in status["active"] if job["state"] == "suspended"]
    assert [job["id"] for job in suspended] == [bulk.id]
    assert {"tier": "bulk", "state": "suspended", "jobs": 1} in status["counts"]
    interactive.result(timeout=20)


def test_cli_submit_waits_for_result(app, start_node, store_url):
    start_node()
    output = subprocess.run(
        [sys.executable, "-m", "makeway", "submit", "tests.apps.basic:add", "40", "2", "--app", "tests.apps.basic:app",
         "--store", store_url, "--wait", "--timeout", "20"],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )

    assert output.returncode == 0, output.stderr
    job_id, result = output.stdout.split()
    assert result == "42"
    assert app.handle(job_id).status() is JobState.SUCCEEDED


def test_pickled_payload_rejected_by_node(app, start_node, tmp_path):
    import pickle
    import uuid

    from makeway.store import NewJob

    class Plant:
        def __reduce__(self):
            return (open, (str(tmp_path / "planted"), "w"))

    start_node()
    job_id = str(uuid.uuid4())
    app.store.submit([NewJob(id=job_id, name="tests.apps.basic:add", tier="interactive", tier_rank=0, priority=0,
                             payload=pickle.dumps(Plant()), serializer="pickle", max_retries=3, not_before=0.0)])
    app._wake_nodes()

    with pytest.raises(JobFailed) as caught:
        app.handle(job_id).result(timeout=20)

    assert "invalid payload" in str(caught.value)
    assert not (tmp_path / "planted").exists()
    assert app.store.get(job_id).attempt == 1


def test_suspended_job_keeps_its_lease(app, start_node):
    start_node("[node]\nlease_s = 1.0\nheartbeat_s = 0.25\n")
    bulk = basic.spin.submit(1.0)
    wait_until(lambda: app.store.get(bulk.id).state is JobState.RUNNING, message="bulk job running")

    interactive = basic.interactive_sleep.submit(3.0)
    wait_until(lambda: app.store.get(bulk.id).state is JobState.SUSPENDED, message="bulk job suspended")
    interactive.result(timeout=20)
    bulk.result(timeout=30)

    record = app.store.get(bulk.id)
    assert record.attempt == 1
    assert "lease_expired" not in reasons_of(app, bulk)
    assert "preempted" in reasons_of(app, bulk)


def test_context_carries_job_fields(app, start_node):
    start_node()

    handle = basic.context_fields.options(metadata={"request_id": "r-17"}).submit()
    fields = handle.result(timeout=20)

    assert fields["job_id"] == handle.id
    assert fields["attempt"] == 1
    assert fields["tier"] == "interactive"
    assert fields["metadata"] == {"request_id": "r-17"}


def test_concurrent_submitters_all_stored(app, store_url):
    script = (
        "import sys\n"
        "from tests.apps.basic import app, add\n"
        f"app.use_store({store_url!r})\n"
        "for i in range(100):\n"
        "    add.submit(int(sys.argv[1]), i)\n"
    )
    submitters = [subprocess.Popen([sys.executable, "-c", script, str(n)], cwd=REPO_ROOT, stderr=subprocess.PIPE)
                  for n in range(4)]
    errors = [process.communicate(timeout=120)[1].decode() for process in submitters]

    assert [process.returncode for process in submitters] == [0, 0, 0, 0], errors
    assert len(app.store.jobs()) == 400


def _thread_nice_values(pid: int) -> set[int]:
    return {os.getpriority(os.PRIO_PROCESS, thread.id) for thread in psutil.Process(pid).threads()}


needs_cap_sys_nice = pytest.mark.skipif(os.geteuid() != 0, reason="a negative nice value needs CAP_SYS_NICE (root)")


@needs_cap_sys_nice
def test_node_nice_reaches_interactive_workers(app, start_node, tmp_path):
    node = start_node("[policy]\nnode_nice = -3\nbackground_cpu_policy = 'idle'\n")
    bulk = basic.spin.submit(0.5)
    interactive = basic.interactive_sleep.submit(0.01)
    interactive_pid = interactive.result(timeout=20)
    bulk_pid = bulk.result(timeout=20)

    # Every supervisor thread, including those started after the change.
    assert _thread_nice_values(node.pid) == {-3}
    assert psutil.Process(interactive_pid).nice() == -3
    assert os.sched_getscheduler(interactive_pid) == os.SCHED_OTHER
    assert psutil.Process(bulk_pid).nice() == 19
    assert os.sched_getscheduler(bulk_pid) == os.SCHED_IDLE
    assert "nice=-3" in node_log(tmp_path)


@needs_cap_sys_nice
def test_background_nice_zero_applied(app, start_node):
    start_node("[policy]\nnode_nice = -3\nbackground_nice = 0\nbackground_cpu_policy = 'normal'\n")

    bulk_pid = basic.spin.submit(0.1).result(timeout=20)

    assert psutil.Process(bulk_pid).nice() == 0
    assert os.sched_getscheduler(bulk_pid) == os.SCHED_OTHER


def test_fifo_node_keeps_nice(app, start_node):
    own = os.getpriority(os.PRIO_PROCESS, 0)
    node = start_node("[policy]\nnode_nice = -3\n", "--scheduling", "fifo")

    bulk_pid = basic.spin.submit(0.1).result(timeout=20)

    assert _thread_nice_values(node.pid) == {own}
    assert psutil.Process(bulk_pid).nice() == own


def test_refused_node_nice_warns():
    # An unprivileged user (uid 65534) cannot lower its nice value.
    script = (
        "import logging, os, threading, time\n"
        "logging.basicConfig(level=logging.WARNING, format='%(message)s')\n"
        "import resource\n"
        "from makeway.node.priority import set_node_priority\n"
        "if os.geteuid() == 0:\n"
        "    os.setuid(65534)  # after the imports: nobody may not read this Python's files\n"
        "threading.Thread(target=time.sleep, args=(2,), daemon=True).start()\n"
        "before = os.getpriority(os.PRIO_PROCESS, 0)\n"
        "after = set_node_priority(before - 5)\n"
        "values = {os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir('/proc/self/task')}\n"
        "print(before, after, sorted(values))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    before, after, values = done.stdout.split(" ", 2)
    assert after == before
    assert values.strip() == f"[{before}]"
    assert "policy.node_nice" in done.stderr
    assert "CAP_SYS_NICE" in done.stderr
    assert "'inherit'" in done.stderr


def test_workers_die_with_killed_supervisor(app, start_node, tmp_path):
    config = "[node]\nslots = 1\nlease_s = 2.0\nheartbeat_s = 0.5\n\n[tiers.bulk]\nmin_share = 0.0\n"
    node = start_node(config)
    bulk = basic.spin.submit(1.0)
    wait_until(lambda: app.store.get(bulk.id).state is JobState.RUNNING, message="bulk running")
    # Hold the bulk worker suspended: a stopped orphan would otherwise stay forever.
    basic.interactive_sleep.submit(5)
    wait_until(lambda: app.store.get(bulk.id).state is JobState.SUSPENDED, message="bulk suspended")
    workers = [psutil.Process(pid) for pid in worker_pids(node)]

    node.process.kill()
    node.process.wait()

    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == []
    # Another supervisor recovers the job once its lease expires.
    start_node(config)
    assert bulk.result(timeout=60) > 0
    record = app.store.get(bulk.id)
    assert record.attempt == 2
    assert "lease_expired" in [event.reason for event in app.store.events(bulk.id)]


def test_failed_job_listed_and_retried(app, start_node, store_url, tmp_path):
    from typer.testing import CliRunner

    from makeway.cli import cli

    start_node("[jobs]\nretry_backoff_s = 0.05\nretry_jitter_s = 0.05\n")
    marker = tmp_path / "fixed"
    handle = basic.fail_until_marker.submit(str(marker))
    with pytest.raises(JobFailed):
        handle.result(timeout=30)

    errors = app.store.attempt_errors(handle.id)
    assert [error.attempt for error in errors] == [1, 2]
    assert all("ValueError: no marker yet" in error.error for error in errors)
    assert all("Traceback" in error.traceback for error in errors)
    runner = CliRunner()
    listed = runner.invoke(cli, ["status", "--failed", "--store", store_url, "--json"])
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.output)["failed"][0]["id"] == handle.id
    table = runner.invoke(cli, ["status", "--failed", "--store", store_url])
    # The id stays on one line even in a narrow, non-terminal output.
    assert handle.id in table.output
    detail = runner.invoke(cli, ["status", handle.id, "--store", store_url])
    assert "Traceback of attempt 1:" in detail.output
    assert "Traceback of attempt 2:" in detail.output
    assert "ValueError: no marker yet" in detail.output

    marker.write_text("ok")
    retried = runner.invoke(cli, ["retry", handle.id, "--store", store_url])
    assert retried.exit_code == 0, retried.output
    assert f"{handle.id}: queued again" in retried.output
    assert handle.result(timeout=30) == "fixed"
    record = app.store.get(handle.id)
    assert record.attempt == 3
    assert "retried_by_user" in [event.reason for event in app.store.events(handle.id)]
    again = runner.invoke(cli, ["retry", handle.id, "--store", store_url])
    assert "succeeded, left alone" in again.output
    succeeded = json.loads(runner.invoke(cli, ["status", handle.id, "--store", store_url, "--json"]).output)
    assert "error" not in succeeded
    assert "no marker yet" in succeeded["last_failed_attempt_error"]


def test_shutdown_yields_checkpointing_job_at_once(app, start_node):
    node = start_node("[node]\nshutdown_grace_s = 20\n")
    walker = basic.walk.submit(50_000_000, item_us=1)
    interactive = basic.interactive_sleep.submit(1.0)
    wait_until(lambda: app.store.get(walker.id).state is JobState.RUNNING
               and app.store.get(interactive.id).state is JobState.RUNNING, message="both running")
    started = time.monotonic()

    exit_code = node.stop(timeout_s=30)

    assert exit_code == 0
    # The walk yielded at its next item instead of using the 20 s grace.
    assert time.monotonic() - started < 10
    record = app.store.get(walker.id)
    assert record.state is JobState.QUEUED
    assert record.checkpoint is not None
    assert reasons_of(app, walker)[-1] == "yielded"
    # The interactive job was let finish.
    assert app.store.get(interactive.id).state is JobState.SUCCEEDED


def test_concurrent_idempotent_submits_make_one_job(app, store_url):
    script = (
        "import sys\n"
        "from tests.apps.basic import app, add\n"
        f"app.use_store({store_url!r})\n"
        "ids = {add.options(idempotency_key=f'order-{i}').submit(i, i).id for i in range(50)}\n"
        "print(len(ids))\n"
    )
    submitters = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE) for _ in range(4)]
    outputs = [process.communicate(timeout=120) for process in submitters]

    assert [process.returncode for process in submitters] == [0, 0, 0, 0], [err.decode() for _, err in outputs]
    # Every process got 50 ids back, and all four saw the same 50 jobs.
    assert [out.decode().strip() for out, _ in outputs] == ["50"] * 4
    assert len(app.store.jobs()) == 50


def test_node_rebinds_removed_wakeup_socket(app, start_node, tmp_path):
    import shutil

    from makeway.store.wakeup import wakeup_dir

    node = start_node("[node]\npoll_interval_s = 2.0\n")
    directory = wakeup_dir(node.db_path)
    shutil.rmtree(directory)

    wait_until(lambda: directory.is_dir() and any(directory.glob(f"node-{node.pid}-*.sock")), timeout_s=10,
               message="node socket bound again")
    handle = basic.add.submit(2, 3)

    assert handle.result(timeout=10) == 5
    claimed = next(e for e in app.store.events(handle.id) if e.reason == "claimed")
    # Woken by the datagram, well before the next 2 s poll.
    assert claimed.at - app.store.get(handle.id).submitted_at < 0.5
    assert "woken_by=notify" in claimed.detail
    assert "was removed; binding a new one" in node_log(tmp_path)


def test_second_sigterm_cuts_shutdown_grace(app, start_node):
    node = start_node("[node]\nshutdown_grace_s = 30\n")
    handle = basic.never_yields.submit(60)
    wait_until(lambda: app.store.get(handle.id).state is JobState.RUNNING, message="job running")
    started = time.monotonic()

    node.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    node.process.send_signal(signal.SIGTERM)
    exit_code = node.process.wait(timeout=20)

    assert exit_code == 0
    # Far less than the 30 s grace: the second signal stopped the wait.
    assert time.monotonic() - started < 10
    record = app.store.get(handle.id)
    assert record.state is JobState.QUEUED
    assert reasons_of(app, handle)[-1] == "shutdown"
    assert record.failures == 0
