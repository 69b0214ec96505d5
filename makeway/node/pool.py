"""Worker handles: one live worker process as the supervisor tracks it."""

from __future__ import annotations

import logging
import multiprocessing
import sys
import time
from dataclasses import dataclass

from makeway.node.flags import WorkerFlags, new_flag_array
from makeway.node.process import CONTINUE, STOP, is_stopped, signal_group
from makeway.node.worker import worker_main

logger = logging.getLogger(__name__)
_spawn = multiprocessing.get_context("spawn")


@dataclass
class Assignment:
    """The job a worker runs, at one attempt."""

    job_id: str
    attempt: int
    name: str
    tier: str
    priority: int
    started_at: float


class WorkerHandle:
    """A worker process of one pool, and the supervisor's record of it.

    Only the supervisor's thread reads or writes these fields.
    """

    def __init__(self, worker_id: int, pool: str, app_spec: str, nice: int, ionice: str, cpu_policy: str,
                 log_level: int):
        self.worker_id = worker_id
        self.pool = pool
        self.flag_array = new_flag_array()
        self.flags = WorkerFlags(self.flag_array)
        self.conn, child_conn = _spawn.Pipe(duplex=True)
        self.process = _spawn.Process(
            target=worker_main,
            args=(app_spec, child_conn, self.flag_array, nice, ionice, cpu_policy, log_level, list(sys.path)),
            name=f"makeway-{pool}-worker-{worker_id}",
            daemon=True,
        )
        self.process.start()
        child_conn.close()
        self.pid: int = self.process.pid
        self.ready = False
        self.assignment: Assignment | None = None
        # Suspension has three steps: SIGSTOP sent (stop_requested), the stop
        # confirmed outside a critical section (suspended), or put off because
        # the job was inside one (deferred, the worker reports the section's end).
        self.stop_requested = False
        # When the last SIGSTOP was sent: wall clock for events, monotonic for
        # the confirmation back-off.
        self.stop_sent_at = 0.0
        self.stop_sent_monotonic = 0.0
        self.suspended = False
        self.deferred = False
        self.dead = False

    def __repr__(self) -> str:
        job = self.assignment.job_id if self.assignment else None
        return f"WorkerHandle(pool={self.pool}, pid={self.pid}, job={job})"

    @property
    def idle(self) -> bool:
        return self.ready and not self.dead and self.assignment is None

    @property
    def held_stopped(self) -> bool:
        """True while the supervisor wants this worker stopped (sent, confirmed or deferred)."""
        return self.stop_requested or self.suspended or self.deferred

    def run(self, assignment: Assignment, payload: bytes, serializer: str, metadata: dict) -> None:
        self.flags.reset()
        self.assignment = assignment
        self.conn.send(("run", assignment.job_id, assignment.attempt, assignment.name, payload, serializer,
                        assignment.tier, metadata))

    def request_stop(self) -> None:
        self.stop_sent_at = time.time()
        self.stop_sent_monotonic = time.monotonic()
        if signal_group(self.pid, STOP):
            self.stop_requested = True

    def confirm_stop(self) -> str | None:
        """Check a requested stop: "suspended", "deferred", or None while it has not taken effect."""
        if not self.stop_requested or not is_stopped(self.pid):
            return None
        self.stop_requested = False
        # The worker is stopped now, so its critical flag cannot change under us.
        if self.flags.in_critical:
            self.flags.set_suspend_pending(True)
            signal_group(self.pid, CONTINUE)
            self.deferred = True
            return "deferred"
        self.suspended = True
        self.deferred = False
        return "suspended"

    def resume(self) -> bool:
        """Undo any stop; return True if the worker had been suspended."""
        was_suspended = self.suspended
        self.flags.set_suspend_pending(False)
        if self.stop_requested or self.suspended:
            signal_group(self.pid, CONTINUE)
        self.stop_requested = self.suspended = self.deferred = False
        return was_suspended

    def kill(self) -> None:
        signal_group(self.pid, CONTINUE)
        signal_group(self.pid, 9)
        self.process.kill()

    def terminate(self) -> None:
        signal_group(self.pid, CONTINUE)
        signal_group(self.pid, 15)

    def stop_when_idle(self) -> None:
        try:
            self.conn.send(("stop",))
        except (BrokenPipeError, OSError):
            pass

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        self.process.join(max(0.0, deadline - time.monotonic()))
        if self.process.is_alive():
            self.kill()
            self.process.join(1.0)
