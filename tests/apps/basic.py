"""Job functions the node tests run in real worker processes."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from makeway import App

app = App()


@app.job(tier="interactive")
def add(a, b):
    return a + b


@app.job(tier="interactive")
def interactive_sleep(seconds):
    time.sleep(seconds)
    return os.getpid()


@app.job(tier="interactive")
async def async_add(a, b):
    await asyncio.sleep(0.01)
    return a + b


@app.job(tier="bulk")
def spin(seconds):
    """Burn CPU for `seconds` of CPU time; return the worker pid."""
    _burn_cpu(seconds)
    return os.getpid()


@app.job(tier="bulk")
def record_start(path, label, seconds=0.0):
    with open(path, "a") as out:
        out.write(f"{label} {time.time()}\n")
    time.sleep(seconds)
    return label


@app.job(tier="bulk", max_retries=0)
def explode(message):
    raise RuntimeError(message)


@app.job(tier="bulk", max_retries=2)
def kill_self_first_attempt(marker):
    """Die by SIGKILL on the first attempt, succeed afterwards."""
    marker = Path(marker)
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), 9)
    return "survived"


@app.job(tier="bulk")
def wait_for_file(path, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)
    return os.getpid()


@app.job(tier="interactive")
def interactive_compute(milliseconds):
    """Burn `milliseconds` of CPU time, as a short interactive request would."""
    _burn_cpu(milliseconds / 1000)
    return milliseconds


@app.job(tier="essential")
def essential_spin(seconds):
    _burn_cpu(seconds)
    return os.getpid()


def _burn_cpu(seconds):
    """Busy-loop until this process has used `seconds` of CPU time; suspended time does not count."""
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass


def _max_gap_while_busy(seconds):
    """Busy-loop for `seconds` of wall time; return the longest gap between two clock reads."""
    end = time.monotonic() + seconds
    last = time.monotonic()
    max_gap = 0.0
    while last < end:
        now = time.monotonic()
        max_gap = max(max_gap, now - last)
        last = now
    return max_gap


@app.job(tier="bulk")
def critical_probe(rounds, section_s, ctx):
    """Alternate critical and plain stretches; return the longest stall seen in each kind."""
    inside = outside = 0.0
    for _ in range(rounds):
        with ctx.critical():
            inside = max(inside, _max_gap_while_busy(section_s))
        outside = max(outside, _max_gap_while_busy(section_s))
    return {"inside": inside, "outside": outside}


@app.job(tier="interactive")
def context_fields(ctx):
    return {"job_id": ctx.job_id, "attempt": ctx.attempt, "tier": ctx.tier, "metadata": ctx.metadata}


# -- long jobs with yield points, and jobs that ignore them ------------------


@app.job(tier="bulk")
def walk(total, slow_items=(), marker_dir=None, item_us=0, ctx=None):
    """Sum a range with ctx.iterate. Items in `slow_items` sleep 3 s once (per
    marker file), long enough that a yield request times out mid-item."""
    state = {"sum": 0, "squares": 0, "count": 0}
    slow = set(slow_items)
    for item in ctx.iterate(range(total), state=state, checkpoint_every=50_000, seconds=1.0):
        if item in slow and marker_dir is not None:
            marker = Path(marker_dir) / f"slow-{item}"
            if not marker.exists():
                marker.write_text(str(ctx.attempt))
                time.sleep(3)
        if item_us:
            _burn_wall(item_us / 1e6)
        state["sum"] += item
        state["squares"] += item * item
        state["count"] += 1
    return state


def _burn_wall(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@app.job(tier="bulk")
def never_yields(seconds):
    """Burn CPU without ever looking at a yield point."""
    _burn_cpu(seconds)
    return os.getpid()


@app.job(tier="bulk", max_retries=0)
def append_lines(path, count, pause_s):
    """Append a timestamped line every `pause_s` seconds, `count` times; no yield points."""
    for index in range(count):
        time.sleep(pause_s)
        with open(path, "a") as out:
            out.write(f"{index} {time.time()}\n")
    return count


@app.job(tier="bulk", max_retries=0)
def append_lines_cooperative(path, count, pause_s, ctx):
    """Like append_lines, but stops at the first check after cancellation."""
    for index in range(count):
        time.sleep(pause_s)
        ctx.raise_if_cancelled()
        with open(path, "a") as out:
            out.write(f"{index} {time.time()}\n")
    return count


@app.job(tier="bulk", max_retries=0)
async def async_append_lines(path, count, pause_s):
    """append_lines as a coroutine: the stop must reach a job inside an event loop too."""
    for index in range(count):
        await asyncio.sleep(pause_s)
        with open(path, "a") as out:
            out.write(f"{index} {time.time()}\n")
    return count


@app.job(tier="bulk", max_retries=0)
def busy_loop(seconds):
    """A pure Python loop with no sleeps and no yield points."""
    end = time.monotonic() + seconds
    count = 0
    while time.monotonic() < end:
        count += 1
    return count


@app.job(tier="bulk", max_retries=0)
def long_sleep(seconds):
    time.sleep(seconds)
    return seconds


@app.job(tier="bulk", max_retries=0)
def silent_read(port):
    """Read from a server that accepts the connection and never sends a byte."""
    import socket

    with socket.create_connection(("127.0.0.1", port)) as connection:
        return connection.recv(1)


@app.job(tier="bulk", max_retries=0)
def hold_gil(count):
    """One C call that holds the GIL and runs no signal handler until it returns."""
    return sum(range(count))


@app.job(tier="bulk", max_retries=0)
def ignore_stop(seconds):
    """Catch every stop request and carry on."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            time.sleep(0.05)
        except BaseException:
            pass
    return "finished"


@app.job(tier="bulk", max_retries=0)
def shell_tree(marker, pid_file):
    """Start a shell with two grandchildren: a CPU burner, and a sleep that writes `marker` when it ends."""
    import subprocess

    shell = subprocess.Popen(["sh", "-c", f"(while :; do :; done) & (sleep 4; touch {marker}) & wait"])
    Path(pid_file).write_text(str(shell.pid))
    shell.wait()
    return "tree ended"


@app.job(tier="bulk", max_retries=50)
def record_items(db_path, total, batch, item_s, ctx):
    """Record (id, attempt) for ids 1..total in batches, checkpointing after each batch."""
    import sqlite3

    with sqlite3.connect(db_path, timeout=30, isolation_level=None) as db:
        db.execute("CREATE TABLE IF NOT EXISTS processed (id INTEGER, attempt INTEGER)")
        for chunk in ctx.iterate(range(1, total + 1), batch=batch, checkpoint_every=batch, seconds=None):
            for item in chunk:
                time.sleep(item_s)
                db.execute("INSERT INTO processed VALUES (?, ?)", (item, ctx.attempt))
    return total


@app.job(tier="bulk", max_retries=5)
def burn_with_checkpoints(seconds, checkpoint_every_s, ctx):
    """Burn CPU, checkpointing the CPU time done; resume from it."""
    done = (ctx.resume_state or {}).get("done", 0.0)
    while done < seconds:
        step = min(checkpoint_every_s, seconds - done)
        _burn_cpu(step)
        done += step
        ctx.checkpoint({"done": done})
    return done


@app.job(tier="bulk")
def report_progress(steps, ctx):
    for step in range(steps):
        ctx.progress(step + 1, steps, f"step {step + 1}")
        time.sleep(0.01)
    ctx.checkpoint({"steps": steps})
    return steps


@app.job(tier="bulk", timeout=1.0, max_retries=0)
def sleep_past_timeout(seconds):
    time.sleep(seconds)
    return seconds


@app.job(tier="bulk", max_retries=0)
def start_own_session(pid_file, seconds):
    """Start a child in a session of its own, then wait."""
    import subprocess

    child = subprocess.Popen(["sleep", str(seconds)], start_new_session=True)
    Path(pid_file).write_text(str(child.pid))
    time.sleep(seconds)
    return child.pid


@app.job(tier="bulk", max_retries=1)
def fail_until_marker(marker):
    """Fail with the attempt's own message until `marker` exists."""
    if not Path(marker).exists():
        raise ValueError(f"no marker yet at {time.time()}")
    return "fixed"


@app.job(tier="bulk", max_retries=50)
def ledger(total, item_s, ctx):
    """Write one ledger row per item through ctx.transaction(), each with its checkpoint."""
    start = (ctx.resume_state or {}).get("next", 0)
    with ctx.transaction() as db:
        db.execute("CREATE TABLE IF NOT EXISTS ledger (item INTEGER, attempt INTEGER)")
    for item in range(start, total):
        time.sleep(item_s)
        with ctx.transaction(checkpoint={"next": item + 1}) as db:
            db.execute("INSERT INTO ledger VALUES (?, ?)", (item, ctx.attempt))
    return total


@app.job(tier="bulk", max_retries=0)
def long_transaction(seconds, ctx):
    """Hold a transaction open longer than allowed."""
    with ctx.transaction(checkpoint={"never": True}) as db:
        db.execute("CREATE TABLE IF NOT EXISTS slow (value INTEGER)")
        db.execute("INSERT INTO slow VALUES (1)")
        time.sleep(seconds)
    return "committed"


@app.job(tier="bulk", max_retries=5)
def call_dependency(down_until):
    """Stand for a call to a dependency that fails every call until the wall-clock time `down_until`."""
    if time.time() < down_until:
        raise ConnectionError("dependency unavailable")
    return "served"


@app.job(tier="bulk", max_retries=5)
def finish_in_transaction(marker, linger_s, ctx):
    """Commit a ledger row with the job's result, then linger past a marker file so a test can kill the worker."""
    with ctx.transaction(result={"rows": 1}) as db:
        db.execute("CREATE TABLE IF NOT EXISTS final_ledger (job_id TEXT, attempt INTEGER)")
        db.execute("INSERT INTO final_ledger VALUES (?, ?)", (ctx.job_id, ctx.attempt))
    Path(marker).write_text("committed")
    time.sleep(linger_s)
    return {"rows": "not stored again"}


@app.job(tier="bulk", max_retries=0)
def record_run(ledger_path, seconds, ctx):
    """Sleep, then insert (job id, attempt, pid) into a ledger outside the store, and record when it ran."""
    import sqlite3

    started = time.time()
    time.sleep(seconds)
    with sqlite3.connect(ledger_path, timeout=30) as db:
        db.execute("CREATE TABLE IF NOT EXISTS runs (job_id TEXT, attempt INTEGER, pid INTEGER, started REAL, "
                   "ended REAL)")
        db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?)", (ctx.job_id, ctx.attempt, os.getpid(), started,
                                                                time.time()))
    return ctx.attempt


@app.job(tier="bulk", max_retries=0)
def sleep_then_commit(seconds, ctx):
    """Sleep, then insert the job id into a table of the store with the job's result, in one transaction."""
    time.sleep(seconds)
    with ctx.transaction(result=ctx.job_id) as db:
        db.execute("CREATE TABLE IF NOT EXISTS effects (job_id TEXT, attempt INTEGER)")
        db.execute("INSERT INTO effects VALUES (?, ?)", (ctx.job_id, ctx.attempt))
    return ctx.job_id


@app.job(tier="bulk", max_retries=0)
async def async_sleep(seconds):
    await asyncio.sleep(seconds)
    return seconds


@app.job(tier="bulk", max_retries=0)
def gil_for(seconds):
    """Call C code that holds the GIL for about 0.1 s at a time, for `seconds`."""
    end = time.monotonic() + seconds
    calls = 0
    while time.monotonic() < end:
        sum(range(3_000_000))
        calls += 1
    return seconds


@app.job(tier="bulk", max_retries=0)
def blocking_read(seconds):
    """Block in one recv() on a socket that no process writes to, for `seconds`."""
    import socket

    left, right = socket.socketpair()
    with left, right:
        left.settimeout(seconds)
        try:
            left.recv(1)
        except TimeoutError:
            pass
    return seconds


def _locked_write(db_path, lock_path, row, hold_s):
    """Write `row` to a shared SQLite file holding its transaction `hold_s`, then hold a file lock `hold_s`."""
    import fcntl
    import sqlite3

    db = sqlite3.connect(db_path, timeout=1.0, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO shared (who, n) VALUES (?, ?)", row)
        time.sleep(hold_s)
        db.execute("COMMIT")
    finally:
        db.close()
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        time.sleep(hold_s)
        fcntl.flock(lock, fcntl.LOCK_UN)


@app.job(tier="bulk", max_retries=0)
def shared_writer(db_path, lock_path, iterations, hold_s, ctx):
    """Background writer: every lock it takes is inside a critical section, so it is never stopped holding one."""
    for n in range(iterations):
        with ctx.critical():
            _locked_write(db_path, lock_path, ("background", n), hold_s)
    return iterations


@app.job(tier="interactive", max_retries=0)
def shared_interactive_write(db_path, lock_path, n):
    """Interactive writer on the same file and lock; its busy timeout is 1 s."""
    started = time.monotonic()
    _locked_write(db_path, lock_path, ("interactive", n), 0.0)
    return time.monotonic() - started


@app.job(tier="bulk", max_retries=5)
def exhaust_memory(cgroup_dir, marker):
    """Join a memory cgroup, then allocate until the kernel's OOM killer ends this process."""
    Path(cgroup_dir, "cgroup.procs").write_text(str(os.getpid()))
    Path(marker).write_text(str(time.time()))
    hoard = []
    while True:
        # Touch every page, so the memory is charged and not just reserved.
        hoard.append(bytearray(b"x" * (8 << 20)))


@app.job(tier="bulk", max_retries=0)
def count_in_worker(items):
    """Count `items` in a Prometheus counter of the worker process, which the node's /metrics merges."""
    from prometheus_client import Counter

    global _WORKER_ITEMS
    if "_WORKER_ITEMS" not in globals():
        _WORKER_ITEMS = Counter("test_worker_items", "Items counted inside a worker")
    _WORKER_ITEMS.inc(items)
    return items


@app.job(tier="bulk", max_retries=0)
def slow_progress(steps, step_s, ctx):
    """Report progress every step for `steps` steps of `step_s` seconds."""
    for step in range(steps):
        ctx.progress(step, steps, f"step {step}")
        time.sleep(step_s)
    return steps
