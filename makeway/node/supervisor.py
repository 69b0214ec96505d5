"""The supervisor: claims jobs, runs them in workers, and preempts lower tiers.

One thread does everything, in a loop that waits on every input at once
(wake-up datagrams, signals, worker pipes, worker process sentinels) and then
takes named steps:

    wake-ups and signals -> worker messages -> dead workers -> dispatch
        -> preemption -> stop confirmations -> heartbeat

Decisions come from `makeway.scheduler`; this module only carries them out
and writes the store. Workers never write the store.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import uuid
from multiprocessing.connection import wait
from typing import Sequence

from makeway.app import App
from makeway.errors import RuntimeFault
from makeway.node.pool import Assignment, WorkerHandle
from makeway.node.worker import ERROR, INVALID, OK
from makeway.observe.metrics import NodeMetrics
from makeway.policy import BACKGROUND_POOL, INTERACTIVE_POOL, Settings
from makeway.scheduler.dispatch import rank_candidates, rank_fifo
from makeway.scheduler.preemption import PreemptionState, RunningJob, plan_suspensions
from makeway.scheduler.retry import retry_delay_s
from makeway.store import JobState, open_store
from makeway.store.wakeup import NODE, WAITER, Listener, notify

logger = logging.getLogger(__name__)

FIFO_POOL = "fifo"
WORKER_START_TIMEOUT_S = 60.0
# While a SIGSTOP has not yet taken effect, the loop re-checks after half the
# time waited so far, within these bounds. A niced worker on busy cores may
# take tens of milliseconds to be scheduled and stop, and checking it at a
# fixed fast rate would take CPU from the interactive job meanwhile.
STOP_CONFIRM_MIN_INTERVAL_S = 0.0005
STOP_CONFIRM_MAX_INTERVAL_S = 0.01


class NodeStartError(RuntimeFault):
    """A worker could not start, usually because the app module failed to import."""


class Supervisor:
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
        self.metrics = NodeMetrics()
        self.workers: list[WorkerHandle] = []
        self.preemption = PreemptionState()
        self._next_worker_id = 0
        self._stopping = False
        self._force_stop = False
        self._dispatch_due = True
        self._next_poll_at = 0.0
        self._next_heartbeat_at = 0.0
        self._next_plan_check_at: float | None = None
        self._interactive_queued = 0
        self._listener: Listener | None = None
        self._signal_reader, self._signal_writer = socket.socketpair()

    # -- life cycle -------------------------------------------------------

    def run(self) -> None:
        """Start workers, serve until a stop signal, then shut down cleanly."""
        self._install_signal_handlers()
        try:
            self._start_workers()
            requeued = self.store.requeue_expired(time.time(), self.node_id)
            if requeued:
                logger.warning("Requeued %d job(s) whose lease expired while no node held them: %s", len(requeued), requeued)
            if self.store_path is not None:
                self._listener = Listener(self.store_path, NODE)
            logger.info(
                "Node ready node=%s slots=%d interactive_workers=%d background_workers=%d scheduling=%s suspend=%s",
                self.node_id, self.slots, self._pool_size(INTERACTIVE_POOL), self._pool_size(BACKGROUND_POOL),
                self.policy.scheduling, self.policy.suspend,
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
            nice=self.policy.background_nice if background else 0,
            ionice=self.policy.background_ionice if background else "none",
            cpu_policy=self.policy.background_cpu_policy if background else "normal",
            log_level=self.log_level,
        )
        self._next_worker_id += 1
        logger.debug("Started worker pid=%d pool=%s", worker.pid, pool)
        return worker

    def _shutdown(self) -> None:
        """Let running jobs finish within the grace period, then requeue the rest."""
        logger.info("Node stopping node=%s; waiting up to %.1f s for running jobs", self.node_id,
                    self.settings.node.shutdown_grace_s)
        for worker in self.workers:
            if worker.held_stopped and worker.resume() and worker.assignment:
                self._record_resumed([worker], "shutdown")

        deadline = time.monotonic() + self.settings.node.shutdown_grace_s
        while any(w.assignment for w in self.workers if not w.dead) and time.monotonic() < deadline and not self._force_stop:
            ready = wait(self._wait_objects(), timeout=0.05)
            self._drain_signals(ready)
            self._read_messages(ready)
            self._reap_dead_workers(replace=False)

        for worker in self.workers:
            if worker.assignment and not worker.dead:
                job = worker.assignment
                worker.kill()
                if self.store.requeue(job.job_id, job.attempt, "shutdown", self.node_id, time.time()):
                    logger.warning("Requeued job=%s tier=%s attempt=%d: the node stopped before it finished",
                                   job.job_id, job.tier, job.attempt)
                worker.assignment = None
        for worker in self.workers:
            worker.stop_when_idle()
        for worker in self.workers:
            worker.join(2.0)
        if self._listener is not None:
            self._listener.close()
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
        timeout_s = max(0.0, min(deadlines) - now)
        return wait(self._wait_objects(), timeout=timeout_s)

    def _step(self, ready: Sequence) -> None:
        self._drain_signals(ready)
        if self._listener is not None and self._listener in ready:
            self._listener.drain()
            self._dispatch_due = True
        self._read_messages(ready)
        self._reap_dead_workers(replace=True)
        if self._stopping:
            return

        now = time.monotonic()
        if self._dispatch_due or now >= self._next_poll_at:
            self._dispatch()
            self._next_poll_at = time.monotonic() + self.settings.node.poll_interval_s
        self._preempt()
        self._confirm_stops()
        if time.monotonic() >= self._next_heartbeat_at:
            self._heartbeat()
            self._next_heartbeat_at = time.monotonic() + self.settings.node.heartbeat_s

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
        elif kind == "critical_exit":
            # The job left the critical section that put off its suspension;
            # try again now if the plan still wants it stopped.
            if worker.deferred:
                worker.deferred = False
                worker.flags.set_suspend_pending(False)
                self._next_plan_check_at = time.monotonic()

    def _finish(self, worker: WorkerHandle, job_id: str, attempt: int, kind: str, result, error, traceback) -> None:
        job = worker.assignment
        self._release_worker(worker)
        if job is None or job.job_id != job_id:
            logger.error("Worker pid=%d reported job=%s it was not running; ignored", worker.pid, job_id)
            return

        applied, outcome = self._record_outcome(job, attempt, kind, result, error, traceback)
        if not applied:
            logger.warning("Dropped the outcome of job=%s attempt=%d: the attempt is stale (its lease was lost)", job_id, attempt)
        self.metrics.jobs_finished.labels(job.tier, outcome if applied else "stale").inc()
        if self.store_path is not None:
            notify(self.store_path, WAITER)

    def _release_worker(self, worker: WorkerHandle) -> None:
        """Mark a worker idle after its job ended, and let background work continue."""
        worker.assignment = None
        # The result may have been sent just before a SIGSTOP went out; an idle
        # worker left stopped would hang the next job given to it.
        if worker.held_stopped:
            worker.resume()
        self._dispatch_due = True
        if worker.pool == INTERACTIVE_POOL:
            # Let background work continue before the store write, since every
            # millisecond it stays stopped is lost throughput.
            self._preempt()

    def _record_outcome(self, job: Assignment, attempt: int, kind: str, result, error, traceback) -> tuple[bool, str]:
        """Write an attempt's outcome, fenced by `attempt`; return (applied, outcome)."""
        job_id = job.job_id
        now = time.time()
        if kind == OK:
            return self.store.complete(job_id, attempt, result, self.node_id, now), "succeeded"

        retry_at = None if kind == INVALID else now + self._retry_delay(job_id)
        reason = "invalid_payload" if kind == INVALID else "job_error"
        result_state = self.store.fail(job_id, attempt, error, traceback, reason, retry_at, self.node_id, now)
        if result_state.applied and result_state.state is JobState.FAILED:
            logger.error("Job failed job=%s name=%s attempt=%d: %s\n%s", job_id, job.name, attempt, error, traceback or "")
        elif result_state.applied:
            logger.info("Job will retry job=%s name=%s attempt=%d: %s", job_id, job.name, attempt, error)
        return result_state.applied, result_state.state.value

    def _retry_delay(self, job_id: str) -> float:
        record = self.store.get(job_id)
        failures = (record.failures if record else 0) + 1
        jobs = self.settings.jobs
        return retry_delay_s(failures, jobs.retry_backoff_s, jobs.retry_backoff_max_s)

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
            self.workers.remove(worker)
            self.metrics.workers_lost.labels(worker.pool).inc()
            job = worker.assignment
            if job is not None:
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

    def _requeue_lost(self, worker: WorkerHandle, job: Assignment) -> None:
        now = time.time()
        error = f"worker pid={worker.pid} exited with code {worker.process.exitcode} while running the job"
        outcome = self.store.fail(job.job_id, job.attempt, error, None, "worker_lost", now, self.node_id, now)
        next_step = "queued again" if outcome.state is JobState.QUEUED else "failed: no retries left"
        logger.warning("Lost worker pid=%d running job=%s tier=%s attempt=%d (exit code %s); the job is %s",
                       worker.pid, job.job_id, job.tier, job.attempt, worker.process.exitcode, next_step)
        if outcome.state is JobState.FAILED and self.store_path is not None:
            notify(self.store_path, WAITER)

    # -- dispatch ---------------------------------------------------------

    def _dispatch(self) -> None:
        """Claim queued jobs for idle workers, interactive pool first."""
        self._dispatch_due = False
        if self.policy.scheduling == "fifo":
            self._fill_pool(FIFO_POOL, list(self.tiers))
            return
        self._interactive_queued = self._fill_pool(INTERACTIVE_POOL, self._tiers_of(INTERACTIVE_POOL))
        self._fill_pool(BACKGROUND_POOL, self._tiers_of(BACKGROUND_POOL))

    def _tiers_of(self, pool: str) -> list[str]:
        return [name for name, tier in self.tiers.items() if tier.pool == pool]

    def _fill_pool(self, pool: str, tiers: list[str]) -> int:
        """Claim jobs for the idle workers of `pool`; return how many due jobs remain queued."""
        idle = [worker for worker in self.workers if worker.pool == pool and worker.idle]
        wall_now = time.time()
        candidates = self.store.candidates(tiers, list(self.app.registry), wall_now, limit=len(idle) + 8)
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
            worker = idle[0]
            claim = self.store.claim(candidate.id, self.node_id, worker.pid, wall_now + self.settings.node.lease_s, time.time())
            if claim is None:
                continue
            claimed += 1
            idle.pop(0)
            worker.run(
                Assignment(claim.id, claim.attempt, claim.name, claim.tier, claim.priority, time.monotonic()),
                claim.payload, claim.serializer, claim.metadata,
            )
            logger.debug("Started job=%s name=%s tier=%s attempt=%d on worker pid=%d", claim.id, claim.name,
                         claim.tier, claim.attempt, worker.pid)
        return max(0, len(candidates) - claimed)

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
        # The event's time is when SIGSTOP was sent: the kernel stops the worker
        # before it next returns to user mode, so the job makes no progress
        # after that. The delay until the stop was seen goes in the detail.
        # One write for the whole batch keeps store time off the interactive
        # job's path; the signals of one batch go out microseconds apart.
        sent_at = min(worker.stop_sent_at for worker in workers)
        detail = f"stop confirmed after {1000 * (time.time() - sent_at):.2f} ms"
        jobs = [(worker.assignment.job_id, worker.assignment.attempt) for worker in workers]
        self.store.set_suspended(jobs, True, "preempted", self.node_id, sent_at, detail)
        for worker in workers:
            job = worker.assignment
            self.metrics.preemptions.labels("suspend", job.tier).inc()
            logger.info(
                "Suspended job=%s tier=%s attempt=%d pid=%d to free its slot for interactive work. "
                "It resumes when interactive work has drained for %.3f s.",
                job.job_id, job.tier, job.attempt, worker.pid, self.policy.suspend_hold_s,
            )

    def _record_resumed(self, workers: list[WorkerHandle], reason: str) -> None:
        jobs = [(w.assignment.job_id, w.assignment.attempt) for w in workers if w.assignment]
        self.store.set_suspended(jobs, False, reason, self.node_id, time.time())
        for worker in workers:
            if worker.assignment:
                self.metrics.resumes.labels(worker.assignment.tier).inc()
                logger.info("Resumed job=%s tier=%s attempt=%d pid=%d (%s)", worker.assignment.job_id,
                            worker.assignment.tier, worker.assignment.attempt, worker.pid, reason)

    # -- leases -----------------------------------------------------------

    def _heartbeat(self) -> None:
        """Renew this node's leases, stop jobs whose lease was lost, and recover expired ones."""
        held = [(w.assignment.job_id, w.assignment.attempt) for w in self.workers if w.assignment and not w.dead]
        lost = set(self.store.renew_leases(held, time.time() + self.settings.node.lease_s))
        for worker in self.workers:
            job = worker.assignment
            if job is not None and (job.job_id, job.attempt) in lost:
                logger.warning("Lost the lease of job=%s attempt=%d; killing worker pid=%d so the newer attempt runs alone",
                               job.job_id, job.attempt, worker.pid)
                worker.assignment = None
                worker.kill()
        requeued = self.store.requeue_expired(time.time(), self.node_id)
        if requeued:
            logger.warning("Requeued %d job(s) whose lease expired: %s", len(requeued), requeued)
            self._dispatch_due = True
