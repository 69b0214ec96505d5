"""The chaos run: real jobs under random kills, suspensions and supervisor restarts.

`run_chaos` starts a node on a fresh SQLite store, submits jobs of every tier
and, while they run, at random moments SIGKILLs workers, stops and resumes
them with SIGSTOP and SIGCONT, and SIGKILLs the supervisor and starts a new
one. At the end it checks that every job reached a final state, that every
succeeded job returned the right result, that each ledger row written
through `ctx.transaction()` is present exactly once, and that no worker
process was left behind.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from makeway import App

app = App()

# Leases short enough that jobs of a killed supervisor come back within seconds.
NODE_CONFIG = """
[node]
lease_s = 3.0
heartbeat_s = 1.0
poll_interval_s = 0.2
shutdown_grace_s = 2.0

[jobs]
retry_backoff_s = 0.05
retry_backoff_max_s = 1.0
retry_jitter_s = 0.2
# The suite kills workers on purpose; no job is to blame for it.
max_worker_losses = 1000
"""
LEDGER_RETRIES = 1000


@app.job(tier="interactive", name="chaos.double", max_retries=LEDGER_RETRIES)
def double(value: int) -> int:
    return 2 * value


@app.job(tier="bulk", name="chaos.ledger", max_retries=LEDGER_RETRIES)
def ledger(key: str, steps: int, step_s: float, ctx) -> int:
    """Write one ledger row per step through ctx.transaction(), resuming after the last committed step."""
    start = (ctx.resume_state or {}).get("next", 0)
    for step in range(start, steps):
        time.sleep(step_s)
        with ctx.transaction(checkpoint={"next": step + 1}) as db:
            db.execute("INSERT INTO chaos_ledger (job_key, step) VALUES (?, ?)", (key, step))
    return steps


@dataclass
class ChaosReport:
    """Counts of a chaos run's faults and of its checks' findings."""

    jobs: int = 0
    ledger_jobs: int = 0
    ledger_rows: int = 0
    worker_kills: int = 0
    suspensions: int = 0
    supervisor_kills: int = 0
    final_states: dict[str, int] = field(default_factory=dict)
    wrong_results: list[str] = field(default_factory=list)
    missing_rows: int = 0
    duplicate_rows: int = 0
    not_final: list[str] = field(default_factory=list)
    leftover_workers: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.wrong_results or self.missing_rows or self.duplicate_rows or self.not_final
                    or self.leftover_workers or self.final_states.get("failed") or self.final_states.get("cancelled"))


def run_chaos(duration_s: float, jobs: int, workdir: Path | None = None, seed: int = 1,
              log=lambda message: None) -> ChaosReport:
    """Run the chaos scenario for about `duration_s` seconds of faults, then check the outcome."""
    from makeway.node.launch import NodeProcess, store_url_for

    rng = random.Random(seed)
    root = Path(workdir or tempfile.mkdtemp(prefix="makeway-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    db_path = root / "chaos.db"
    store_url = store_url_for(db_path)
    config = root / "chaos.toml"
    config.write_text(NODE_CONFIG)
    app.use_store(store_url)
    with sqlite3.connect(db_path) as db:
        db.execute("CREATE TABLE IF NOT EXISTS chaos_ledger (job_key TEXT, step INTEGER)")

    report = ChaosReport()
    node_logs = []

    def start_node() -> NodeProcess:
        log_file = open(root / f"node-{len(node_logs)}.log", "w")
        node_logs.append(log_file)
        node = NodeProcess("makeway.chaos:app", store_url, ["--config", str(config)], log=log_file)
        node.wait_ready()
        return node

    node = start_node()
    seen_workers: set[int] = set()
    expected: dict[str, int] = {}
    ledger_steps: dict[str, int] = {}
    tiers = ["bulk", "opportunistic", "essential"]
    requests = []
    for index in range(jobs):
        if index % 3 == 0:
            key = f"ledger-{index}"
            steps = rng.randint(1, 6)
            requests.append((ledger.options(tier=rng.choice(tiers)).prepare(key, steps, rng.uniform(0.0, 0.05)),
                             steps, key))
        else:
            requests.append((double.prepare(index), 2 * index, None))
    handles = app.submit_many(request for request, _, _ in requests)
    for handle, (_, value, key) in zip(handles, requests):
        expected[handle.id] = value
        if key is not None:
            ledger_steps[key] = value
    report.jobs, report.ledger_jobs = len(handles), len(ledger_steps)
    log(f"submitted {len(handles)} jobs ({len(ledger_steps)} ledger jobs)")

    end = time.monotonic() + duration_s
    while time.monotonic() < end:
        time.sleep(rng.uniform(0.05, 0.4))
        workers = _workers(node.pid)
        seen_workers.update(workers)
        action = rng.random()
        if action < 0.45 and workers:
            _signal(rng.choice(workers), signal.SIGKILL)
            report.worker_kills += 1
        elif action < 0.9 and workers:
            victim = rng.choice(workers)
            _signal(victim, signal.SIGSTOP)
            time.sleep(rng.uniform(0.01, 0.3))
            _signal(victim, signal.SIGCONT)
            report.suspensions += 1
        else:
            node.process.kill()
            node.process.wait()
            report.supervisor_kills += 1
            node = start_node()
    log(f"faults done: {report.worker_kills} worker kills, {report.suspensions} suspensions, "
        f"{report.supervisor_kills} supervisor kills")

    deadline = time.monotonic() + 300
    for handle in handles:
        try:
            value = handle.result(timeout=max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            report.not_final.append(handle.id)
            continue
        except Exception:
            continue
        if value != expected[handle.id]:
            report.wrong_results.append(handle.id)
    seen_workers.update(_workers(node.pid))
    node.stop()
    for log_file in node_logs:
        log_file.close()

    states: dict[str, int] = {}
    for record in app.store.jobs():
        states[record.state.value] = states.get(record.state.value, 0) + 1
    report.final_states = states
    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT job_key, step, COUNT(*) FROM chaos_ledger GROUP BY job_key, step").fetchall()
    counts = {(key, step): count for key, step, count in rows}
    report.ledger_rows = sum(counts.values())
    report.duplicate_rows = sum(count - 1 for count in counts.values() if count > 1)
    report.missing_rows = sum(1 for key, steps in ledger_steps.items() for step in range(steps)
                              if (key, step) not in counts)
    report.leftover_workers = _alive(seen_workers)
    app.close()
    return report


def _workers(node_pid: int) -> list[int]:
    try:
        children = psutil.Process(node_pid).children()
    except psutil.NoSuchProcess:
        return []
    return [child.pid for child in children if "resource_tracker" not in " ".join(_cmdline(child))]


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _alive(pids: set[int]) -> list[int]:
    """Return the pids that still run (zombies waiting for their parent do not count)."""
    deadline = time.monotonic() + 5
    alive = sorted(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if psutil.pid_exists(pid) and _status(pid) != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    return alive


def _status(pid: int) -> str:
    try:
        return psutil.Process(pid).status()
    except psutil.Error:
        return psutil.STATUS_DEAD
