"""Worker handles: one live worker process as the supervisor tracks it."""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field

import psutil

from makeway.node.flags import WorkerFlags, new_flag_array
from makeway.node.process import CONTINUE, STOP, cpu_seconds, is_stopped, signal_group
from makeway.node.worker import worker_main
from makeway.store.base import Usage

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
    timeout_s: float | None = None
    deadline: float | None = None
    # Time spent suspended, so that the run-time limit and the accounting
    # count only the time the job could run.
    suspended_s: float = 0.0
    suspended_since: float | None = None
    # CPU seconds of the worker when the attempt started, at its last
    # checkpoint, and at the last reading.
    cpu_start: float = 0.0
    cpu_at_checkpoint: float = 0.0
    cpu_last: float = 0.0
    checkpoints: int = 0
    # Whether the attempt started from an earlier attempt's checkpoint.
    resumed: bool = False
    # When the job last got a slot (monotonic): its start, or its unparking.
    slice_started_at: float = 0.0
    # Wall-clock submission time, for the end-to-end latency metric.
    submitted_at: float = 0.0

    def __post_init__(self) -> None:
        self.slice_started_at = self.slice_started_at or self.started_at

    def run_s(self, now: float) -> float:
        """Seconds this attempt has been able to run (not suspended) by monotonic `now`."""
        suspended = self.suspended_s + (now - self.suspended_since if self.suspended_since is not None else 0.0)
        return max(0.0, now - self.started_at - suspended)

    def usage(self, completed: bool = False) -> Usage:
        """Return what the attempt used, from the last CPU reading.

        An attempt that did not complete wasted the CPU time since its last checkpoint.
        """
        wasted = 0.0 if completed else max(0.0, self.cpu_last - self.cpu_at_checkpoint)
        return Usage(run_s=self.run_s(time.monotonic()), cpu_s=max(0.0, self.cpu_last - self.cpu_start),
                     wasted_cpu_s=wasted)


@dataclass
class Reclaim:
    """The supervisor ending a worker's current attempt, step by step.

    `mode` is "cancel" (the job ends for good: cancelled or timed out),
    "yield" (the job is asked to give up its slot at its next yield point)
    or "requeue" (asked to yield, then terminated). `stage` counts the steps
    taken: 0 flag set, 1 SIGTERM sent, 2 SIGKILL sent. `next_at` is when the
    next step is due (monotonic), and `fallbacks` lists the modes to try next.
    """

    mode: str
    reason: str
    next_at: float | None
    fallbacks: list[str] = field(default_factory=list)
    stage: int = 0
    detail: str | None = None


class WorkerHandle:
    """A worker process of one pool, and the supervisor's record of it.

    Only the supervisor's thread reads or writes these fields.
    """

    def __init__(self, worker_id: int, pool: str, app_spec: str, nice: int | None, ionice: str, cpu_policy: str,
                 log_level: int, store_url: str | None = None):
        self.worker_id = worker_id
        self.pool = pool
        self.flag_array = new_flag_array()
        self.flags = WorkerFlags(self.flag_array)
        self.conn, child_conn = _spawn.Pipe(duplex=True)
        self.process = _spawn.Process(
            target=worker_main,
            # The worker adds these entries after importing makeway; the working
            # directory comes first, as with `python -m`, for the app module.
            args=(app_spec, child_conn, self.flag_array, nice, ionice, cpu_policy, log_level,
                  [os.getcwd(), *sys.path], store_url),
            name=f"makeway-{pool}-worker-{worker_id}",
            daemon=True,
        )
        self.process.start()
        child_conn.close()
        self.pid: int = self.process.pid
        self.ps = psutil.Process(self.pid)
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
        self.reclaim: Reclaim | None = None
        # The OpenTelemetry spans of the current attempt (AttemptSpans), or None.
        self.spans = None
        # Why the worker is held stopped outside the interactive preemption
        # plan: "paused", or "time_slice" while the job waits for a free slot.
        # None while it is not parked. parked_at is wall-clock time.
        self.parked_reason: str | None = None
        self.parked_at = 0.0
        # Why the job was parked first; parked_reason changes when a pause ends.
        self.park_origin: str | None = None

    def __repr__(self) -> str:
        job = self.assignment.job_id if self.assignment else None
        return f"WorkerHandle(pool={self.pool}, pid={self.pid}, job={job})"

    @property
    def idle(self) -> bool:
        return self.ready and not self.dead and self.assignment is None

    @property
    def parked(self) -> bool:
        return self.parked_reason is not None

    @property
    def cancelling(self) -> bool:
        """True while the supervisor stops the job for good (cancellation, time limit, deadline)."""
        return self.reclaim is not None and self.reclaim.mode == "cancel"

    @property
    def held_stopped(self) -> bool:
        """True while the supervisor wants this worker stopped (sent, confirmed or deferred)."""
        return self.stop_requested or self.suspended or self.deferred

    def run(self, assignment: Assignment, payload: bytes, serializer: str, metadata: dict,
            checkpoint: str | None = None) -> None:
        self.flags.reset()
        self.assignment = assignment
        self.reclaim = None
        self.parked_reason = self.park_origin = None
        self.conn.send(("run", assignment.job_id, assignment.attempt, assignment.name, payload, serializer,
                        assignment.tier, metadata, checkpoint))

    def read_cpu(self) -> float | None:
        """Read the worker's CPU seconds into its assignment's `cpu_last`; None if it is gone."""
        value = cpu_seconds(self.ps)
        if value is not None and self.assignment is not None:
            self.assignment.cpu_last = value
        return value

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
        if self.assignment is not None:
            self.assignment.suspended_since = self.stop_sent_monotonic
        return "suspended"

    def resume(self) -> bool:
        """Undo any stop; return True if the worker had been suspended."""
        was_suspended = self.suspended
        job = self.assignment
        if job is not None and job.suspended_since is not None:
            job.suspended_s += time.monotonic() - job.suspended_since
            job.suspended_since = None
        if self.parked and job is not None:
            job.slice_started_at = time.monotonic()
        self.parked_reason = None
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
