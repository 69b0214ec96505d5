"""Durability faults that users of job queues have met, as structural tests with generous bounds."""

from __future__ import annotations

import time

import psutil
import pytest

from makeway import JobFailed, JobState
from tests.apps import basic
from tests.conftest import kill_node, wait_until, worker_pids

pytestmark = pytest.mark.timeout(180)

SHORT_LEASE = "[node]\nslots = 3\nlease_s = 3.0\nheartbeat_s = 1.0\npoll_interval_s = 0.2\n"


def test_killed_node_jobs_recovered_without_phantom_slots(app, start_node):
    # The lease outlasts the new node's start, so the short jobs run before
    # the dead attempts expire. With a shorter lease the recovered long jobs
    # would take the slots first, which is right but tests nothing.
    lease_s = 8.0
    config = f"[node]\nslots = 3\nlease_s = {lease_s}\nheartbeat_s = 2.0\npoll_interval_s = 0.2\n"
    node = start_node(config)
    long_jobs = [basic.long_sleep.submit(30) for _ in range(3)]
    wait_until(lambda: all(h.status() is JobState.RUNNING for h in long_jobs), message="long jobs running")

    # SIGKILL every process of the node, then start a new one at once.
    kill_node(node)
    killed_at = time.time()
    start_node(config)
    short = [basic.long_sleep.submit(0) for _ in range(3)]

    for handle in short:
        assert handle.result(timeout=30) == 0
    for handle in short:
        record = app.store.get(handle.id)
        # The dead attempts hold no slots: the short jobs start at once.
        assert record.started_at - record.submitted_at < 1.0
    for handle in long_jobs:
        wait_until(lambda: app.store.get(handle.id).attempt >= 2, timeout_s=lease_s + 10.0, message="job requeued")
        events = app.store.events(handle.id)
        lost = next(event for event in events if event.reason == "lease_expired")
        assert lost.attempt == 1
        assert lost.at - killed_at < lease_s + 10.0
        handle.cancel()


def test_random_worker_kills_keep_pool_and_finish_jobs(app, start_node):
    import os
    import random
    import signal

    node = start_node("[node]\nslots = 4\npoll_interval_s = 0.2\n\n[jobs]\nretry_backoff_s = 0.05\nretry_jitter_s = 0.05\n")
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


def test_stopped_writer_never_holds_lock(app, start_node, tmp_path):
    import sqlite3

    shared, lock = tmp_path / "shared.db", tmp_path / "shared.lock"
    with sqlite3.connect(shared) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE shared (who TEXT, n INTEGER)")
    start_node("[node]\nslots = 2\n")
    iterations = 100
    background = basic.shared_writer.submit(str(shared), str(lock), iterations, 0.05)
    wait_until(lambda: background.status() is JobState.RUNNING, message="background writer running")

    waits, interactive = [], []
    for n in range(16):
        time.sleep(0.5)
        interactive.append(basic.shared_interactive_write.submit(str(shared), str(lock), n))
        # A lock error fails the job; the result is its time spent on locks.
        waits.append(interactive[-1].result(timeout=30))
    assert background.result(timeout=120) == iterations

    with sqlite3.connect(shared) as db:
        rows = db.execute("SELECT who, n FROM shared").fetchall()
    assert sorted(n for who, n in rows if who == "background") == list(range(iterations))
    assert sorted(n for who, n in rows if who == "interactive") == list(range(16))
    # An interactive job waits at most for one section of the writer, never
    # for a stopped one: well under its 1 s busy timeout.
    assert max(waits) < 0.9, waits
    # Every interactive job ran while the writer was still at work.
    assert app.store.get(background.id).finished_at > app.store.get(interactive[-1].id).finished_at


def test_node_reopens_recreated_store(app, start_node, tmp_path, store_url):
    from tests.conftest import node_log

    start_node("[node]\npoll_interval_s = 0.5\n")
    assert basic.add.submit(1, 1).result(timeout=10) == 2
    # Reset the store as a user would: delete the database with its WAL and
    # shared-memory files. The next submission creates a new file.
    app.close()
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"jobs.db{suffix}").unlink(missing_ok=True)
    app.use_store(store_url)

    handles = []
    for pause_s in (0.5, 0.5, 1.0, 3.0):
        time.sleep(pause_s)
        handles.append(basic.add.submit(len(handles), 1))
    assert [handle.result(timeout=10) for handle in handles] == [1, 2, 3, 4]

    for handle in handles:
        record = app.store.get(handle.id)
        # The 0.5 s poll bounds the wait, even for the job that found the node
        # still on the old file. The bound leaves room for a loaded machine.
        assert record.started_at - record.submitted_at < 1.5
    last = next(e for e in app.store.events(handles[-1].id) if e.reason == "claimed")
    assert "woken_by=notify" in last.detail
    assert "was replaced by a new file; reopening it" in node_log(tmp_path)


def test_recovery_survives_its_own_kill(app, start_node, tmp_path, store_url):
    import os
    import random

    from makeway.node.launch import NodeProcess
    from tests.conftest import REPO_ROOT, TEST_APP

    node = start_node(SHORT_LEASE)
    long_jobs = [basic.long_sleep.submit(30) for _ in range(3)]
    wait_until(lambda: all(h.status() is JobState.RUNNING for h in long_jobs), message="long jobs running")
    kill_node(node)
    # Let the leases run out, so that every node start below runs recovery.
    time.sleep(3.5)

    config = tmp_path / "recovery.toml"
    config.write_text(SHORT_LEASE)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    rng = random.Random(5)
    for round_ in range(6):
        with open(tmp_path / f"killed-{round_}.log", "w") as log:
            starting = NodeProcess(TEST_APP, store_url, ["--config", str(config)], log=log, env=env, cwd=REPO_ROOT)
            time.sleep(rng.uniform(0.2, 1.5))
            victims = [psutil.Process(starting.pid)]
            victims += psutil.Process(starting.pid).children(recursive=True)
            for victim in victims:
                victim.kill()
            psutil.wait_procs(victims, timeout=10)
            starting.process.wait(10)

    final = start_node(SHORT_LEASE)

    def held_by_final_node(job_id):
        # The last killed round may have claimed the job just before it died;
        # its lease must expire before the final node takes the job over.
        record = app.store.get(job_id)
        workers = {child.pid for child in psutil.Process(final.pid).children()}
        return record.state is JobState.RUNNING and record.worker_pid in workers

    for handle in long_jobs:
        wait_until(lambda: held_by_final_node(handle.id), timeout_s=2 * 3.0 + 10.0, message="job running again")
        record = app.store.get(handle.id)
        assert record.attempt >= 2
        assert record.lease_expires_at > time.time()
        assert [e.attempt for e in app.store.events(handle.id) if e.reason == "lease_expired"][0] == 1
        handle.cancel()


MEMORY_CGROUPS = "/sys/fs/cgroup/memory"


@pytest.fixture
def memory_cgroups(tmp_path):
    """Make memory cgroups (v1) limited to 64 MiB; yield a function returning a new one's path."""
    import os
    from pathlib import Path

    root = Path(MEMORY_CGROUPS)
    if not (root / "cgroup.procs").exists() or not os.access(root, os.W_OK):
        pytest.skip(f"needs a writable cgroup v1 memory hierarchy at {MEMORY_CGROUPS} (run as root)")
    made = []

    def make() -> Path:
        path = root / f"makeway-test-{os.getpid()}-{len(made)}"
        path.mkdir()
        made.append(path)
        (path / "memory.limit_in_bytes").write_text(str(64 << 20))
        return path

    yield make
    for path in made:
        # A cgroup can be removed once its processes are gone.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def test_oom_killed_workers_replaced(app, start_node, tmp_path, memory_cgroups):
    node = start_node("[node]\nslots = 4\npoll_interval_s = 0.2\n\n[jobs]\nmax_worker_losses = 1\n")
    pool_size = len(worker_pids(node))
    hogs = []
    short = []
    end = time.monotonic() + 8.0
    while time.monotonic() < end:
        short.append(basic.long_sleep.submit(0.1))
        if len(hogs) < 4 and len(short) % 20 == 0:
            index = len(hogs)
            hogs.append((basic.exhaust_memory.submit(str(memory_cgroups()), str(tmp_path / f"hog-{index}")), index))
        time.sleep(0.05)

    assert all(handle.result(timeout=60) == 0.1 for handle in short)
    for handle, index in hogs:
        with pytest.raises(JobFailed, match="lost its worker 2 times"):
            handle.result(timeout=60)
        events = app.store.events(handle.id)
        lost = [event for event in events if event.reason == "worker_lost"]
        # Lost once and queued again, lost again and failed: max_worker_losses = 1.
        assert [event.to_state for event in lost] == ["queued", "failed"]
        # Found dead within a second of the allocation starting (the last
        # attempt's marker); filling 64 MiB takes milliseconds.
        started = float((tmp_path / f"hog-{index}").read_text())
        assert lost[-1].at - started < 1.5
    for handle in short:
        record = app.store.get(handle.id)
        assert record.started_at - record.submitted_at < 2.0
    wait_until(lambda: len(worker_pids(node)) == pool_size, timeout_s=5, message="pool back to full size")
