"""The supervisor: claims jobs, runs them in workers, and preempts lower tiers.

One thread does everything, in a loop that waits on every input at once
(wake-up datagrams, signals, worker pipes, worker process sentinels) and then
takes named steps:

    wake-ups and signals -> worker messages -> dead workers
        -> cancel requests and pauses -> dispatch and time slicing
        -> preemption -> stop confirmations -> time limits
        -> reclaim steps -> heartbeat

Decisions come from `makeway.scheduler`; this module and `reclaim.py` only
carry them out and write the store. Workers never write the store: results,
checkpoints and progress reach it through the supervisor.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Sequence

from makeway.app import App
from makeway.errors import RuntimeFault
from makeway.node.endpoint import NodeEndpoint
from makeway.node.leases import LeaseRenewer
from makeway.node.pool import Assignment, Reclaim, WorkerHandle
from makeway.node.priority import INHERIT, set_node_priority
from makeway.node.reclaim import ReclaimSteps
from makeway.node.worker import ERROR, INTERRUPTED, INVALID, OK, STALE, YIELDED
from makeway.observe.metrics import NodeMetrics
from makeway.observe.tracing import ATTEMPT_CONTEXT_KEY, start_attempt
from makeway.policy import BACKGROUND_POOL, INTERACTIVE_POOL, Settings
from makeway.scheduler.dispatch import rank_candidates, rank_fifo
from makeway.scheduler.preemption import PreemptionState, RunningJob, plan_suspensions
from makeway.scheduler.retry import retry_delay_s
from makeway.scheduler.slicing import TIME_SLICE
from makeway.store import JobState, open_store
from makeway.store.base import SuspensionChange, Usage
from makeway.store.wakeup import CONTROL_HINT, NODE, WAITER, Listener, notify

logger = logging.getLogger(__name__)

FIFO_POOL = "fifo"
WORKER_START_TIMEOUT_S = 60.0
# A worker that stops sends SIGCHLD, which wakes the loop, so a stop is seen
# as soon as it takes effect. In case a signal is missed, a pending stop is
# also re-checked after half the time waited so far, within these bounds.
STOP_CONFIRM_MIN_INTERVAL_S = 0.005
STOP_CONFIRM_MAX_INTERVAL_S = 0.05
# Suspension writes and background dispatch wait while an interactive job
# runs, so that its result is not queued behind them, but no longer than this.
DEFERRED_WORK_MAX_DELAY_S = 0.05
# How often a node deletes jobs past jobs.retention_s.
PURGE_INTERVAL_S = 60.0


@dataclass
class _PendingSuspension:
    """Stops that took effect and wait to be stored: (worker, its assignment, parked reason) each."""

    workers: list[tuple[WorkerHandle, Assignment, str | None]]
    sent_at: float
    detail: str
    recorded_at: float  # monotonic


def _on_child_signal(signum: int, frame) -> None:
    """Do nothing: the wake-up fd has already woken the loop, which checks its workers."""


class NodeStartError(RuntimeFault):
    """A worker could not start, usually because the app module failed to import."""


class Supervisor(ReclaimSteps):
    """Run a node until SIGINT or SIGTERM.

    `app_spec` ("package.module:app") is what workers import; `app` is the same
    App, already imported here for its settings and job names.
    """

    def __init__(self, app: App, app_spec: str, settings: Settings | None = None, log_level: int = logging.INFO):
        self.app = app
        self.app_spec = app_spec
        self.settings = settings or app.settings
        self.policy = self.settings.policy
        self.tiers = self.settings.tiers
        self.log_level = log_level
        self.node_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.store = open_store(app.store_url, for_node=True)
        self.store_path = app.store_path
        self.slots = self.settings.node.resolved_slots()
        self.metrics = NodeMetrics(enabled=self.settings.node.metrics)
        self.workers: list[WorkerHandle] = []
        self.preemption = PreemptionState()
        self._next_worker_id = 0
        self._stopping = False
        self._force_stop = False
        self._dispatch_due = True
        self._next_poll_at = 0.0
        self._next_heartbeat_at = 0.0
        self._next_purge_at = 0.0
        self._next_plan_check_at: float | None = None
        self._interactive_queued = 0
        self._controls_due = True
        self._next_controls_at = 0.0
        self._paused_tiers: set[str] = set()
        self._paused_jobs: set[str] = set()
        self._listener: Listener | None = None
        self._signal_reader, self._signal_writer = socket.socketpair()
        self._pending_suspensions: list[_PendingSuspension] = []
        self._background_due_since: float | None = None
        self._renewer: LeaseRenewer | None = None
        self.endpoint = NodeEndpoint(self)
        self._woken_by = "poll"
        self._store_missing_logged = False

    # -- life cycle -------------------------------------------------------

    def run(self) -> None:
        """Start workers, serve until a stop signal, then shut down cleanly."""
        self._install_signal_handlers()
        # Before any worker or thread of the loop starts, so they inherit it.
        nice = set_node_priority(self.policy.node_nice if self.policy.scheduling == "tiers" else INHERIT)
        try:
            self._start_workers()
            requeued = self.store.requeue_expired(time.time(), self.node_id)
            if requeued:
                logger.warning("Requeued %d job(s) whose lease expired while no node held them: %s", len(requeued), requeued)
            # The HTTP endpoint starts before the wake-up socket is bound,
            # since launchers take the socket as the sign that the node serves.
            self.endpoint.start()
            if self.store_path is not None:
                self._listener = Listener(self.store_path, NODE)
            self._renewer = self._start_renewer()
            logger.info(
                "Node ready node=%s slots=%d interactive_workers=%d background_workers=%d scheduling=%s suspend=%s "
                "nice=%d",
                self.node_id, self.slots, self._pool_size(INTERACTIVE_POOL), self._pool_size(BACKGROUND_POOL),
                self.policy.scheduling, self.policy.suspend, nice,
            )
            while not self._stopping:
                self._step(self._wait_for_input())
        finally:
            self._shutdown()

    def _install_signal_handlers(self) -> None:
        self._signal_writer.setblocking(False)
        signal.set_wakeup_fd(self._signal_writer.fileno())
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_stop_signal)
        # The wake-up fd is written for every handled signal: a worker that
        # stops (or ends) wakes the loop at once, without polling /proc.
        signal.signal(signal.SIGCHLD, _on_child_signal)

    def _held_leases(self) -> list[tuple[str, int, float]]:
        """Return (job id, attempt, claim time) of every job this node runs; called from the lease renewal thread."""
        held = []
        for worker in list(self.workers):
            job = worker.assignment
            if job is not None and not worker.dead:
                held.append((job.job_id, job.attempt, job.started_at))
        return held

    def _kill_expiring(self, pairs: list[tuple[str, int]]) -> None:
        """Kill the workers of jobs whose lease is about to end unrenewed; called from the lease renewal thread.

        Only signals are sent here; the loop clears the assignments when it
        takes the pairs from the renewer.
        """
        for worker in list(self.workers):
            job = worker.assignment
            if job is not None and (job.job_id, job.attempt) in pairs:
                worker.kill()

    def _wake(self) -> None:
        """Wake the loop from another thread."""
        try:
            self._signal_writer.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a full buffer already wakes the loop; a closed one means it stopped

    def _on_stop_signal(self, signum: int, frame) -> None:
        if self._stopping:
            self._force_stop = True
        self._stopping = True

    def _pool_size(self, pool: str) -> int:
        return sum(1 for worker in self.workers if worker.pool == pool)

    def _start_workers(self) -> None:
        node = self.settings.node
        if self.policy.scheduling == "fifo":
            layout = {FIFO_POOL: self.slots}
        else:
            layout = {INTERACTIVE_POOL: node.resolved_interactive_workers(), BACKGROUND_POOL: node.resolved_background_workers()}
        for pool, count in layout.items():
            for _ in range(count):
                self.workers.append(self._spawn_worker(pool))

        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while not all(worker.ready for worker in self.workers):
            if time.monotonic() > deadline:
                raise NodeStartError(f"workers did not report ready within {WORKER_START_TIMEOUT_S} s")
            for worker in self.workers:
                if not worker.ready and not worker.process.is_alive():
                    raise NodeStartError(
                        f"worker pid={worker.pid} exited with code {worker.process.exitcode} before it was ready; "
                        f"check that --app {self.app_spec} imports cleanly (its traceback is above)"
                    )
            self._read_messages(wait([w.conn for w in self.workers if not w.ready], timeout=0.1))

    def _spawn_worker(self, pool: str) -> WorkerHandle:
        background = pool == BACKGROUND_POOL
        worker = WorkerHandle(
            self._next_worker_id,
            pool,
            self.app_spec,
            # Other workers keep the supervisor's nice value (policy.node_nice).
            nice=self.policy.background_nice if background else None,
            ionice=self.policy.background_ionice if background else "none",
            cpu_policy=self.policy.background_cpu_policy if background else "normal",
            log_level=self.log_level,
            store_url=self.app.store_url,
        )
        self._next_worker_id += 1
        logger.debug("Started worker pid=%d pool=%s", worker.pid, pool)
        return worker

    def _shutdown(self) -> None:
        """Let running jobs finish within the grace period, then requeue the rest."""
        logger.info("Node stopping node=%s; waiting up to %.1f s for running jobs", self.node_id,
                    self.settings.node.shutdown_grace_s)
        self._flush_suspensions()
        for worker in self.workers:
            if worker.held_stopped and worker.resume() and worker.assignment:
                self._record_resumed([worker], "shutdown")
            if worker.assignment is not None and worker.reclaim is None and not worker.dead:
                # Jobs with yield points checkpoint and leave at once; the
                # rest get the grace period to finish.
                worker.reclaim = Reclaim(mode="yield", reason="shutdown", next_at=None)
                worker.flags.request_yield()

        deadline = time.monotonic() + self.settings.node.shutdown_grace_s
        while any(w.assignment for w in self.workers if not w.dead) and time.monotonic() < deadline and not self._force_stop:
            ready = wait(self._wait_objects(), timeout=0.05)
            self._drain_signals(ready)
            self._read_messages(ready)
            self._reap_dead_workers(replace=False)

        for worker in self.workers:
            if worker.assignment and not worker.dead:
                job = worker.assignment
                worker.read_cpu()
                worker.kill()
                usage = job.usage()
                self._end_trace(worker, "shutdown")
                if self.store.requeue(job.job_id, job.attempt, "shutdown", self.node_id, time.time(), usage=usage):
                    self.metrics.requeues.labels(job.tier, "shutdown").inc()
                    logger.warning("Requeued job=%s tier=%s attempt=%d: the node stopped before it finished",
                                   job.job_id, job.tier, job.attempt)
                worker.assignment = None
        for worker in self.workers:
            worker.stop_when_idle()
        for worker in self.workers:
            worker.join(2.0)
        if self._renewer is not None:
            self._renewer.stop()
        self.endpoint.stop()
        if self._listener is not None:
            self._listener.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        self.store.close()
        logger.info("Node stopped node=%s", self.node_id)

    # -- the loop ---------------------------------------------------------

    def _wait_objects(self) -> list:
        objects: list = [self._signal_reader]
        if self._listener is not None:
            objects.append(self._listener)
        for worker in self.workers:
            if not worker.dead:
                objects.extend((worker.conn, worker.process.sentinel))
        return objects

    def _wait_for_input(self) -> list:
        now = time.monotonic()
        deadlines = [self._next_poll_at, self._next_heartbeat_at]
        if self._next_plan_check_at is not None:
            deadlines.append(self._next_plan_check_at)
        for worker in self.workers:
            if worker.stop_requested:
                waited_s = now - worker.stop_sent_monotonic
                deadlines.append(now + min(STOP_CONFIRM_MAX_INTERVAL_S, max(STOP_CONFIRM_MIN_INTERVAL_S, waited_s / 2)))
            if worker.reclaim is not None and worker.reclaim.next_at is not None:
                deadlines.append(worker.reclaim.next_at)
            limit_at = self._limit_due_at(worker, now)
            if limit_at is not None:
                deadlines.append(limit_at)
        if self._pending_suspensions:
            deadlines.append(self._pending_suspensions[0].recorded_at + DEFERRED_WORK_MAX_DELAY_S)
        if self._background_due_since is not None:
            deadlines.append(self._background_due_since + DEFERRED_WORK_MAX_DELAY_S)
        timeout_s = max(0.0, min(deadlines) - now)
        return wait(self._wait_objects(), timeout=timeout_s)

    def _step(self, ready: Sequence) -> None:
        self._drain_signals(ready)
        if self._listener is not None and self._listener in ready:
            if CONTROL_HINT in self._listener.drain():
                self._controls_due = True
            self._dispatch_due = True
        self._read_messages(ready)
        self._stop_lost_leases()
        self._reap_dead_workers(replace=True)
        if self._stopping:
            return

        now = time.monotonic()
        if self._controls_due or now >= self._next_controls_at:
            self._check_controls()
        if now >= self._next_poll_at:
            self._check_listener()
            self._check_store_file()
        if self._dispatch_due or now >= self._next_poll_at:
            if self._listener is not None and self._listener in ready:
                self._woken_by = "notify"
            elif self._dispatch_due:
                self._woken_by = "node"  # a job ended, a worker came back, a control changed
            else:
                self._woken_by = "poll"
            self.metrics.dispatch_wakeups.labels(self._woken_by).inc()
            self._dispatch()
            self._next_poll_at = time.monotonic() + self.settings.node.poll_interval_s
        # Before the plan, so that a background job claimed here is stopped
        # in this step if interactive work still runs.
        self._do_deferred_work()
        self._preempt()
        self._confirm_stops()
        self._enforce_limits()
        self._advance_reclaims()
        if time.monotonic() >= self._next_heartbeat_at:
            self._heartbeat()
            self._next_heartbeat_at = time.monotonic() + self.settings.node.heartbeat_s

    def _check_listener(self) -> None:
        """Bind the wake-up socket again if its file was removed (a temp-directory cleaner, say).

        Without the file, clients cannot wake this node, and every job would
        wait for the next poll.
        """
        if self._listener is None or self._listener.path.exists():
            return
        logger.warning("Wake-up socket %s was removed; binding a new one", self._listener.path)
        self._listener.close()
        self._listener = Listener(self.store_path, NODE)
        self._dispatch_due = True

    def _check_store_file(self) -> None:
        """Reopen the store if its file was deleted and created again.

        This node's connection would otherwise keep reading the deleted file,
        and jobs submitted to the new one would never start. Attempts still
        running belong to the old file; their outcomes are dropped as stale.
        """
        replaced = getattr(self.store, "replaced", None)
        if replaced is None or not replaced():
            return
        if not self.store.path.exists():
            if not self._store_missing_logged:
                logger.error("Store file %s was removed; waiting for it to be created again", self.store.path)
                self._store_missing_logged = True
            return
        self._store_missing_logged = False
        logger.warning("Store file %s was replaced by a new file; reopening it", self.store.path)
        old = self.store
        self.store = open_store(self.app.store_url, for_node=True)
        old.close()
        if self._renewer is not None:
            self._renewer.stop()
            self._renewer = self._start_renewer()
        self._controls_due = True
        self._dispatch_due = True

    def _start_renewer(self) -> LeaseRenewer:
        renewer = LeaseRenewer(self.app.store_url, self.settings.node.lease_s, self.settings.node.heartbeat_s,
                               self._held_leases, on_lost=self._wake, on_expiring=self._kill_expiring)
        renewer.start()
        return renewer

    def _drain_signals(self, ready: Sequence) -> None:
        if self._signal_reader in ready:
            try:
                self._signal_reader.recv(4096)
            except BlockingIOError:
                pass

    # -- worker messages and deaths --------------------------------------

    def _read_messages(self, ready: Sequence) -> None:
        for worker in self.workers:
            if worker.dead or worker.conn not in ready:
                continue
            try:
                while worker.conn.poll():
                    self._handle_message(worker, worker.conn.recv())
            except (EOFError, OSError):
                self._mark_dead(worker)

    def _handle_message(self, worker: WorkerHandle, message: tuple) -> None:
        kind = message[0]
        if kind == "ready":
            worker.ready = True
            self._dispatch_due = True
        elif kind == "done":
            self._finish(worker, *message[1:])
        elif kind == "checkpoint":
            self._save_checkpoint(worker, *message[1:])
        elif kind == "checkpointed":
            self._note_checkpoint(worker, *message[1:])
        elif kind == "progress":
            job_id, attempt, done, total, text = message[1:]
            self.store.set_progress(job_id, attempt, done, total, text, time.time())
        elif kind == "critical_exit":
            # The job left the critical section that put off its suspension;
            # try again now if the plan still wants it stopped.
            if worker.deferred:
                worker.deferred = False
                worker.flags.set_suspend_pending(False)
                if worker.parked:
                    # Parking is outside the interactive plan, so stop it here.
                    worker.request_stop()
                self._next_plan_check_at = time.monotonic()

    def _finish(self, worker: WorkerHandle, job_id: str, attempt: int, kind: str, result, error, traceback) -> None:
        if worker.pool != INTERACTIVE_POOL:
            # The job's suspension must be stored before its outcome.
            self._flush_suspensions()
        job, reclaim = worker.assignment, worker.reclaim
        usage = self._usage(worker, completed=kind == OK) if job is not None else None
        self._release_worker(worker)
        if job is None or job.job_id != job_id:
            logger.error("Worker pid=%d reported job=%s it was not running; ignored", worker.pid, job_id)
            return

        if kind == STALE:
            logger.warning("Job=%s attempt=%d stopped: its checkpoint was rejected because the attempt is stale",
                           job_id, attempt)
            applied, outcome = False, "stale"
        elif kind == YIELDED or (reclaim is not None and reclaim.mode in ("yield", "requeue")
                                 and (kind == INTERRUPTED or (kind == ERROR and reclaim.stage > 0))):
            applied, outcome = self._requeue_reclaimed(job, reclaim, "yield" if kind == YIELDED else "requeue", usage)
        elif kind == INTERRUPTED or (kind == ERROR and reclaim is not None and reclaim.mode == "cancel"
                                     and reclaim.stage > 0):
            reason = reclaim.reason if reclaim is not None and reclaim.mode == "cancel" else "cancelled_by_job"
            applied, outcome = self._record_stopped(job, reason, error, usage)
        else:
            applied, outcome = self._record_outcome(job, attempt, kind, result, error, traceback, usage)
        if not applied and kind != STALE:
            logger.warning("Dropped the outcome of job=%s attempt=%d: the attempt is stale (its lease was lost)", job_id, attempt)
        self.metrics.jobs_finished.labels(job.tier, outcome if applied else "stale").inc()
        self._end_trace(worker, outcome if applied else "stale")
        if self.store_path is not None:
            notify(self.store_path, WAITER)

    def _usage(self, worker: WorkerHandle, completed: bool) -> Usage:
        """Read the worker's CPU time and return what its current attempt used."""
        job = worker.assignment
        worker.read_cpu()
        usage = job.usage(completed)
        self.metrics.run_time.labels(job.tier).observe(usage.run_s)
        self.metrics.cpu_seconds.labels(job.tier).inc(usage.cpu_s)
        self.metrics.wasted_cpu_seconds.labels(job.tier).inc(usage.wasted_cpu_s)
        return usage

    def _requeue_reclaimed(self, job: Assignment, reclaim: Reclaim | None, mode: str, usage: Usage | None) -> tuple[bool, str]:
        """Queue a job again that gave up its slot (yield) or was terminated for it (requeue)."""
        why = reclaim.reason if reclaim is not None else "job_request"
        reason = "yielded" if mode == "yield" else "requeued"
        applied = self.store.requeue(job.job_id, job.attempt, reason, self.node_id, time.time(), usage=usage,
                                     detail=f"{why}; checkpoints this attempt: {job.checkpoints}")
        if applied:
            self.metrics.preemptions.labels(mode, job.tier).inc()
            self.metrics.requeues.labels(job.tier, reason).inc()
            logger.info("Job %s job=%s tier=%s attempt=%d (%s); it resumes from its last checkpoint",
                        reason, job.job_id, job.tier, job.attempt, why)
        self._dispatch_due = True
        return applied, reason

    def _record_stopped(self, job: Assignment, reason: str, error: str | None, usage: Usage | None) -> tuple[bool, str]:
        """Record a job that the supervisor stopped for good: cancelled, or failed past its time limit."""
        now = time.time()
        self.metrics.cancellations.labels(job.tier, reason).inc()
        if reason == "timed_out":
            limit = f"ran longer than its timeout of {job.timeout_s} s (suspended time not counted)"
            outcome = self.store.fail(job.job_id, job.attempt, f"timed out: {limit}", None, "timed_out", None,
                                      self.node_id, now, usage=usage)
            logger.warning("Job timed out job=%s name=%s attempt=%d: %s", job.job_id, job.name, job.attempt, limit)
            return outcome.applied, "timed_out"
        applied = self.store.finish_cancelled(job.job_id, job.attempt, reason, error, self.node_id, now, usage=usage)
        logger.info("Job cancelled job=%s name=%s attempt=%d reason=%s", job.job_id, job.name, job.attempt, reason)
        return applied, "cancelled"

    def _save_checkpoint(self, worker: WorkerHandle, job_id: str, attempt: int, sequence: int, state: str,
                         progress) -> None:
        job = worker.assignment
        applied = False
        if job is not None and job.job_id == job_id and job.attempt == attempt:
            started = time.time()
            applied = self.store.save_checkpoint(job_id, attempt, state, started, progress)
            if applied:
                self._note_checkpoint(worker, job_id, attempt)
                if worker.spans is not None:
                    worker.spans.checkpoint(started, time.time())
        try:
            worker.conn.send(("checkpoint_ack", sequence, applied))
        except (BrokenPipeError, OSError):
            self._mark_dead(worker)

    def _note_checkpoint(self, worker: WorkerHandle, job_id: str, attempt: int) -> None:
        """Count a stored checkpoint; work done before it is no longer at risk."""
        job = worker.assignment
        if job is None or job.job_id != job_id or job.attempt != attempt:
            return
        job.checkpoints += 1
        if worker.read_cpu() is not None:
            job.cpu_at_checkpoint = job.cpu_last
        self.metrics.checkpoints.labels(job.tier).inc()

    def _end_trace(self, worker: WorkerHandle, outcome: str) -> None:
        if worker.spans is not None:
            worker.spans.end(time.time(), outcome)
            worker.spans = None

    def _release_worker(self, worker: WorkerHandle) -> None:
        """Mark a worker idle after its job ended, and let background work continue."""
        worker.assignment = None
        worker.reclaim = None
        # The result may have been sent just before a SIGSTOP went out; an idle
        # worker left stopped would hang the next job given to it.
        if worker.held_stopped:
            worker.resume()
        # The suspend hold starts at the next plan, after the outcome is stored
        # and the waiter notified, so the caller reads its result on free cores.
        # The kernel can run a resumed SCHED_IDLE worker ahead of that caller.
        self._dispatch_due = True

    def _record_outcome(self, job: Assignment, attempt: int, kind: str, result, error, traceback,
                        usage: Usage | None = None) -> tuple[bool, str]:
        """Write an attempt's outcome, fenced by `attempt`; return (applied, outcome)."""
        job_id = job.job_id
        now = time.time()
        if kind == OK:
            applied = self.store.complete(job_id, attempt, result, self.node_id, now, usage=usage)
            if applied and job.submitted_at:
                self.metrics.latency.labels(job.tier).observe(max(0.0, now - job.submitted_at))
            return applied, "succeeded"

        retry_at = None if kind == INVALID else now + self._retry_delay(job_id)
        reason = "invalid_payload" if kind == INVALID else "job_error"
        result_state = self.store.fail(job_id, attempt, error, traceback, reason, retry_at, self.node_id, now, usage=usage)
        if result_state.applied and result_state.state is JobState.FAILED:
            logger.error("Job failed job=%s name=%s attempt=%d: %s\n%s", job_id, job.name, attempt, error, traceback or "")
        elif result_state.applied:
            logger.info("Job will retry job=%s name=%s attempt=%d: %s", job_id, job.name, attempt, error)
        return result_state.applied, result_state.state.value

    def _retry_delay(self, job_id: str) -> float:
        record = self.store.get(job_id)
        failures = (record.failures if record else 0) + 1
        jobs = self.settings.jobs
        return retry_delay_s(failures, jobs.retry_backoff_s, jobs.retry_backoff_max_s, jobs.retry_jitter_s)

    def _mark_dead(self, worker: WorkerHandle) -> None:
        if not worker.dead:
            worker.dead = True
            worker.process.join(0.5)

    def _reap_dead_workers(self, replace: bool) -> None:
        for worker in list(self.workers):
            if not worker.dead and not worker.process.is_alive():
                self._read_remaining(worker)
                self._mark_dead(worker)
            if not worker.dead:
                continue
            self._flush_suspensions()
            self.workers.remove(worker)
            self.metrics.workers_lost.labels(worker.pool).inc()
            job = worker.assignment
            if job is not None and worker.reclaim is not None and worker.reclaim.stage > 0:
                self._finish_killed(worker, job, worker.reclaim)
            elif job is not None:
                self._requeue_lost(worker, job)
            else:
                logger.warning("Worker pid=%d pool=%s exited with code %s while idle", worker.pid, worker.pool,
                               worker.process.exitcode)
            if replace and not self._stopping:
                self.workers.append(self._spawn_worker(worker.pool))
            self._dispatch_due = True

    def _read_remaining(self, worker: WorkerHandle) -> None:
        """Take a result the worker sent just before it exited."""
        try:
            while worker.conn.poll():
                self._handle_message(worker, worker.conn.recv())
        except (EOFError, OSError):
            pass

    def _finish_killed(self, worker: WorkerHandle, job: Assignment, reclaim: Reclaim) -> None:
        """Record the end of a job whose worker died after the supervisor signalled it."""
        usage = job.usage()
        detail = f"worker pid={worker.pid} ended by signal (exit code {worker.process.exitcode})"
        if reclaim.mode == "cancel":
            self._record_stopped(job, reclaim.reason, detail, usage)
        else:
            self._requeue_reclaimed(job, reclaim, "requeue", usage)
        self._end_trace(worker, reclaim.mode)
        if self.store_path is not None:
            notify(self.store_path, WAITER)

    def _requeue_lost(self, worker: WorkerHandle, job: Assignment) -> None:
        now = time.time()
        error = f"worker pid={worker.pid} exited with code {worker.process.exitcode} while running the job"
        usage = job.usage()
        outcome = self.store.lose_worker(job.job_id, job.attempt, error, self.node_id, now,
                                         self.settings.jobs.max_worker_losses, usage=usage)
        self._end_trace(worker, "worker_lost")
        if outcome.applied and outcome.state is JobState.QUEUED:
            self.metrics.requeues.labels(job.tier, "worker_lost").inc()
        next_step = "queued again" if outcome.state is JobState.QUEUED else "failed: it lost too many workers"
        logger.warning("Lost worker pid=%d running job=%s tier=%s attempt=%d (exit code %s); the job is %s",
                       worker.pid, job.job_id, job.tier, job.attempt, worker.process.exitcode, next_step)
        if outcome.state is JobState.FAILED and self.store_path is not None:
            notify(self.store_path, WAITER)

    # -- dispatch ---------------------------------------------------------

    def _dispatch(self) -> None:
        """Claim queued jobs for idle workers, interactive pool first."""
        self._dispatch_due = False
        if self.policy.scheduling == "fifo":
            self._fill_pool(FIFO_POOL, self._tiers_of(FIFO_POOL))
            return
        self._interactive_queued = self._fill_pool(INTERACTIVE_POOL, self._tiers_of(INTERACTIVE_POOL))
        if self._interactive_running():
            if self._background_due_since is None:
                self._background_due_since = time.monotonic()
            return
        self._fill_background(self._tiers_of(BACKGROUND_POOL))
        self._background_due_since = None

    def _interactive_running(self) -> bool:
        return any(w.pool == INTERACTIVE_POOL and w.assignment is not None and not w.dead for w in self.workers)

    def _do_deferred_work(self) -> None:
        """Do what waited for the interactive pool to empty, or for DEFERRED_WORK_MAX_DELAY_S."""
        now = time.monotonic()
        interactive_running = self._interactive_running()
        # Suspensions of workers still stopped for interactive work are stored
        # with their resume, in one transaction.
        stopped_for_interactive = any(
            w.pool == BACKGROUND_POOL and w.held_stopped and not w.parked for w in self.workers
        )
        if self._pending_suspensions and (
            not (interactive_running or stopped_for_interactive)
            or now - self._pending_suspensions[0].recorded_at >= DEFERRED_WORK_MAX_DELAY_S
        ):
            self._flush_suspensions()
        if self._background_due_since is not None and (
            not interactive_running or now - self._background_due_since >= DEFERRED_WORK_MAX_DELAY_S
        ):
            self._background_due_since = None
            self._fill_background(self._tiers_of(BACKGROUND_POOL))

    def _tiers_of(self, pool: str) -> list[str]:
        return [name for name, tier in self.tiers.items()
                if (pool == FIFO_POOL or tier.pool == pool) and name not in self._paused_tiers]

    def _fill_pool(self, pool: str, tiers: list[str]) -> int:
        """Claim jobs for the idle workers of `pool`; return how many due jobs remain queued."""
        idle = [worker for worker in self.workers if worker.pool == pool and worker.idle]
        wall_now = time.time()
        candidates = self.store.candidates(tiers, list(self.app.registry), wall_now, limit=len(idle) + 8)
        if any(c.deadline is not None and c.deadline <= wall_now for c in candidates):
            # Cancel them unstarted rather than claim them late.
            self._cancel_overdue()
            candidates = [c for c in candidates if c.deadline is None or c.deadline > wall_now]
        ranked = rank_fifo(candidates) if pool == FIFO_POOL else rank_candidates(candidates, self.tiers, wall_now)
        if pool == INTERACTIVE_POOL and candidates:
            # Stop background workers before the claim's store write, so the
            # cores are free by the time the interactive job starts.
            self._interactive_queued = len(candidates)
            self._preempt()
        claimed = 0
        for candidate in ranked:
            if not idle:
                break
            outcome = self._claim_and_start(candidate, idle[0])
            if outcome is None:
                continue
            claimed += 1
            if outcome:
                idle.pop(0)
        return max(0, len(candidates) - claimed)

    def _queued_candidates(self, tiers: list[str], limit: int) -> list:
        wall_now = time.time()
        candidates = self.store.candidates(tiers, list(self.app.registry), wall_now, limit=limit)
        if any(c.deadline is not None and c.deadline <= wall_now for c in candidates):
            # Cancel them unstarted rather than claim them late.
            self._cancel_overdue()
            candidates = [c for c in candidates if c.deadline is None or c.deadline > wall_now]
        return candidates

    def _claim_and_start(self, candidate, worker: WorkerHandle) -> bool | None:
        """Claim `candidate` and start it on `worker`: True if started, False if claimed but cancelled, None if
        another node was first."""
        wall_now = time.time()
        claim = self.store.claim(candidate.id, self.node_id, worker.pid, wall_now + self.settings.node.lease_s, wall_now,
                                 woken_by=self._woken_by)
        if claim is None:
            return None
        if claim.deadline is not None and claim.deadline <= time.time():
            # The claim made the job ours; cancel it here rather than start it late.
            self.store.finish_cancelled(claim.id, claim.attempt, "deadline_exceeded", "deadline passed before start",
                                        self.node_id, time.time())
            return False
        metadata = claim.metadata
        worker.spans = start_attempt(claim.id, claim.name, claim.tier, claim.attempt, self.node_id, claim.metadata,
                                     claim.queued_at, wall_now)
        if worker.spans is not None:
            metadata = {**metadata, ATTEMPT_CONTEXT_KEY: worker.spans.carrier}
        worker.run(
            Assignment(claim.id, claim.attempt, claim.name, claim.tier, claim.priority, time.monotonic(),
                       timeout_s=claim.timeout_s, deadline=claim.deadline, resumed=claim.checkpoint is not None,
                       submitted_at=claim.submitted_at),
            claim.payload, claim.serializer, metadata, claim.checkpoint,
        )
        if worker.read_cpu() is not None:
            worker.assignment.cpu_start = worker.assignment.cpu_at_checkpoint = worker.assignment.cpu_last
        self.metrics.attempts.labels(claim.tier).inc()
        if claim.queued_at is not None:
            self.metrics.queue_wait.labels(claim.tier).observe(max(0.0, wall_now - claim.queued_at))
        logger.debug("Started job=%s name=%s tier=%s attempt=%d on worker pid=%d", claim.id, claim.name,
                     claim.tier, claim.attempt, worker.pid)
        return True

    def _fill_background(self, tiers: list[str]) -> None:
        """Give free background slots to the best of the queued and the time-sliced (parked) jobs.

        A background slot is free while fewer than `background_workers` jobs
        run unparked. Parked jobs keep their workers, so the pool may hold
        more workers than slots, up to `max_parked_jobs` more.
        """
        workers = [w for w in self.workers if w.pool == BACKGROUND_POOL and not w.dead]
        running = sum(1 for w in workers if w.assignment is not None and not w.parked)
        free_slots = max(0, self.settings.node.resolved_background_workers() - running)
        idle = [w for w in workers if w.idle]
        queued = self._queued_candidates(tiers, limit=free_slots + 8)
        parked = {w.assignment.job_id: w for w in workers
                  if w.parked and w.parked_reason == TIME_SLICE and w.assignment is not None}
        entries = queued + [self._parked_entry(worker) for worker in parked.values()]
        ranked = rank_candidates(entries, self.tiers, time.time())

        waiting = []
        for entry in ranked:
            if free_slots == 0:
                waiting.append(entry)
            elif entry.id in parked:
                self._unpark(parked[entry.id])
                free_slots -= 1
            elif idle:
                outcome = self._claim_and_start(entry, idle[0])
                if outcome:
                    idle.pop(0)
                    free_slots -= 1
            else:
                # A slot is free but every worker is busy or parked.
                self._ensure_spare_worker()
                waiting.append(entry)
        self._slice(waiting, free_slots)

    # -- preemption -------------------------------------------------------

    def _interactive_demand(self) -> int:
        running = sum(1 for w in self.workers if w.pool == INTERACTIVE_POOL and w.assignment is not None)
        return running + self._interactive_queued

    def _preempt(self) -> None:
        """Bring the set of stopped background workers in line with the plan."""
        if self.policy.scheduling == "fifo" or self.policy.suspend == "off":
            return
        background = {
            worker.worker_id: worker for worker in self.workers
            if worker.pool == BACKGROUND_POOL and worker.assignment is not None and not worker.dead
            and not worker.parked and not worker.cancelling
        }
        running_jobs = [
            RunningJob(key, w.assignment.tier, w.assignment.priority, w.assignment.started_at)
            for key, w in background.items()
        ]
        demand = self._interactive_demand()
        plan = plan_suspensions(self.policy, self.tiers, self.slots, demand, running_jobs, self.preemption, time.monotonic())
        self._next_plan_check_at = plan.next_check_at

        to_resume = [w for key, w in background.items() if key not in plan.suspend and w.held_stopped]
        for worker in background.values():
            if worker.worker_id in plan.suspend and not worker.held_stopped:
                worker.request_stop()
        for worker in to_resume:
            self._settle_stop(worker)
        resumed = [worker for worker in to_resume if worker.resume()]
        if resumed:
            self._record_resumed(resumed, "resumed")

    def _settle_stop(self, worker: WorkerHandle) -> None:
        """Before resuming, record a stop that took effect, or count one that never did."""
        if not worker.stop_requested or worker.assignment is None:
            return
        result = worker.confirm_stop()
        if result == "suspended":
            self._record_suspended([worker])
        elif result is None:
            self.metrics.suspends_cancelled.labels(worker.assignment.tier).inc()

    def _confirm_stops(self) -> None:
        """Record stops that took effect; resume at once any worker caught in a critical section."""
        suspended = []
        for worker in self.workers:
            if not worker.stop_requested:
                continue
            result = worker.confirm_stop()
            if result == "suspended" and worker.assignment is not None:
                suspended.append(worker)
            elif result == "deferred" and worker.assignment is not None:
                self.metrics.suspends_deferred.labels(worker.assignment.tier).inc()
                logger.debug("Deferred suspending job=%s: it is in a critical section", worker.assignment.job_id)
        if suspended:
            self._record_suspended(suspended)

    def _record_suspended(self, workers: list[WorkerHandle]) -> None:
        """Note stops that took effect; their store write waits (see _do_deferred_work)."""
        # The event's time is when SIGSTOP was sent: the kernel stops the worker
        # before it next returns to user mode, so the job makes no progress
        # after that. The delay until the stop was seen goes in the detail.
        # The signals of one batch go out microseconds apart, so one event
        # time serves them all.
        sent_at = min(worker.stop_sent_at for worker in workers)
        detail = f"{self._suspension_cause(workers)}; stop confirmed after {1000 * (time.time() - sent_at):.2f} ms"
        entries = [(worker, worker.assignment, worker.parked_reason) for worker in workers]
        self._pending_suspensions.append(_PendingSuspension(entries, sent_at, detail, time.monotonic()))

    def _flush_suspensions(self, resumed: SuspensionChange | None = None) -> None:
        """Store the noted suspensions, then `resumed`, in one transaction, and count and log them."""
        pending, self._pending_suspensions = self._pending_suspensions, []
        changes = [SuspensionChange([(job.job_id, job.attempt) for _, job, _ in entry.workers], True, "preempted",
                                    entry.sent_at, entry.detail) for entry in pending]
        if resumed is not None and resumed.jobs:
            changes.append(resumed)
        if changes:
            self.store.record_suspensions(changes, self.node_id)
        for entry in pending:
            for worker, job, parked_reason in entry.workers:
                if worker.spans is not None and worker.assignment is job:
                    worker.spans.suspended(entry.sent_at)
                self.metrics.preemptions.labels("suspend", job.tier).inc()
                if parked_reason is not None:
                    logger.info("Suspended job=%s tier=%s attempt=%d pid=%d: parked (%s)", job.job_id, job.tier,
                                job.attempt, worker.pid, parked_reason)
                else:
                    logger.info(
                        "Suspended job=%s tier=%s attempt=%d pid=%d to free its slot for interactive work. "
                        "It resumes when interactive work has drained for %.3f s.",
                        job.job_id, job.tier, job.attempt, worker.pid, self.policy.suspend_hold_s,
                    )

    def _suspension_cause(self, workers: list[WorkerHandle]) -> str:
        """Return why `workers` were stopped, for the event: the interactive jobs they make way for, or parking."""
        if all(worker.parked for worker in workers):
            return f"parked ({workers[0].parked_reason})"
        interactive = [w.assignment.job_id for w in self.workers
                       if w.pool == INTERACTIVE_POOL and w.assignment is not None]
        if interactive:
            cause = f"for interactive job {interactive[0]}"
            if len(interactive) > 1:
                cause += f" and {len(interactive) - 1} more"
        else:
            cause = f"for {self._interactive_queued} queued interactive job(s)"
        active = sum(1 for w in self.workers if w.assignment is not None and not w.dead and not w.parked)
        return f"{cause}; {active} jobs on {self.slots} slots"

    def _record_resumed(self, workers: list[WorkerHandle], reason: str) -> None:
        jobs = [(w.assignment.job_id, w.assignment.attempt) for w in workers if w.assignment]
        detail = None
        if reason == "resumed" and self._interactive_demand() > 0:
            detail = "its tier is owed its min_share while interactive work continues"
        elif reason == "resumed":
            detail = f"no interactive work for {self.policy.suspend_hold_s:g} s"
        resumed_at = time.time()
        # Suspensions still waiting to be stored go first, in the same transaction.
        self._flush_suspensions(SuspensionChange(jobs, False, reason, resumed_at, detail))
        for worker in workers:
            if worker.spans is not None:
                worker.spans.resumed(resumed_at)
        for worker in workers:
            if worker.assignment:
                self.metrics.resumes.labels(worker.assignment.tier).inc()
                logger.info("Resumed job=%s tier=%s attempt=%d pid=%d (%s)", worker.assignment.job_id,
                            worker.assignment.tier, worker.assignment.attempt, worker.pid, reason)

    # -- leases -----------------------------------------------------------

    def _heartbeat(self) -> None:
        """Read the workers' CPU time, queue expired jobs again, and cancel or purge what is due.

        Leases are renewed by the lease renewal thread, not here.
        """
        for worker in self.workers:
            if worker.assignment is not None and not worker.dead:
                worker.read_cpu()
        requeued = self.store.requeue_expired(time.time(), self.node_id)
        if requeued:
            logger.warning("Requeued %d job(s) whose lease expired: %s", len(requeued), requeued)
            self._dispatch_due = True
        self._cancel_overdue()
        self._purge_expired()

    def _stop_lost_leases(self) -> None:
        """Kill the workers of jobs whose lease the renewal thread found lost, so a newer attempt runs alone."""
        if self._renewer is None:
            return
        lost = set(self._renewer.take_lost())
        if not lost:
            return
        for worker in self.workers:
            job = worker.assignment
            if job is not None and (job.job_id, job.attempt) in lost:
                logger.warning("Lost the lease of job=%s attempt=%d; stopped worker pid=%d so that no other attempt "
                               "runs at the same time", job.job_id, job.attempt, worker.pid)
                self._end_trace(worker, "lease_lost")
                worker.assignment = None
                worker.kill()

    def _purge_expired(self) -> None:
        """Delete jobs past jobs.retention_s, at most once per PURGE_INTERVAL_S."""
        now = time.time()
        if now < self._next_purge_at:
            return
        self._next_purge_at = now + PURGE_INTERVAL_S
        purged = self.store.purge_finished(now - self.settings.jobs.retention_s)
        if purged:
            logger.info("Deleted %d job(s) that ended more than %.0f s ago (jobs.retention_s)", purged,
                        self.settings.jobs.retention_s)

    def _cancel_overdue(self) -> None:
        overdue = self.store.cancel_overdue(time.time())
        if overdue:
            logger.info("Cancelled %d queued job(s) whose deadline passed before they started: %s", len(overdue), overdue)
            if self.store_path is not None:
                notify(self.store_path, WAITER)
