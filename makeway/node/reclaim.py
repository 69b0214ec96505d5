"""The supervisor's steps that take a slot back from a running job.

Time slicing and pauses park a job in its worker or ask it to yield, falling
back to requeue; cancellation, time limits and deadlines stop it for good.
Each is a `Reclaim` on the worker that `_advance_reclaims` moves forward one
grace period at a time. `Supervisor` inherits these methods, and they use
its state; they live here to keep the supervisor's main loop readable.
"""

from __future__ import annotations

import logging
import time

from makeway.node.pool import Reclaim, WorkerHandle
from makeway.policy import BACKGROUND_POOL
from makeway.scheduler.slicing import TIME_SLICE, SlotHolder, plan_handoffs
from makeway.store import Candidate

logger = logging.getLogger("makeway.node.supervisor")


class ReclaimSteps:
    """Time slicing, pauses, cancellation and limits, as methods of the supervisor."""

    def _parked_entry(self, worker: WorkerHandle) -> Candidate:
        """Return a parked job as a dispatch candidate, waiting since it was parked."""
        job = worker.assignment
        tier = self.tiers[job.tier]
        return Candidate(job.job_id, job.name, job.tier, tier.rank, job.priority, worker.parked_at,
                         worker.parked_at, 0.0)

    def _ensure_spare_worker(self) -> None:
        """Start a background worker if none is idle and parked jobs leave room for one."""
        workers = [w for w in self.workers if w.pool == BACKGROUND_POOL and not w.dead]
        if any(not w.ready or w.idle for w in workers):
            return
        limit = self.settings.node.resolved_background_workers() + self.settings.node.resolved_max_parked_jobs()
        if len(workers) < limit:
            self.workers.append(self._spawn_worker(BACKGROUND_POOL))

    def _parking_room(self) -> bool:
        parked = sum(1 for w in self.workers if w.parked and not w.dead)
        return parked < self.settings.node.resolved_max_parked_jobs()

    def _park(self, worker: WorkerHandle, reason: str) -> None:
        """Suspend a background job in its worker outside the interactive plan, freeing its slot."""
        job = worker.assignment
        worker.reclaim = None
        worker.parked_reason, worker.parked_at = reason, time.time()
        worker.park_origin = reason
        if not worker.held_stopped:
            worker.request_stop()
        self._dispatch_due = True
        logger.info("Parked job=%s tier=%s attempt=%d pid=%d (%s)", job.job_id, job.tier, job.attempt, worker.pid,
                    reason)

    def _unpark(self, worker: WorkerHandle) -> None:
        reason = "unpaused" if worker.park_origin == "paused" else TIME_SLICE
        if worker.resume():
            self._record_resumed([worker], reason)
        else:
            worker.parked_reason = None

    def _slice(self, waiting: list, free_slots: int) -> None:
        """Take back slots of running background jobs for waiting ones, following the slicing plan."""
        holders, reclaiming = [], 0
        for worker in self.workers:
            if worker.pool != BACKGROUND_POOL or worker.assignment is None or worker.dead:
                continue
            if worker.reclaim is not None or worker.parked:
                reclaiming += worker.reclaim is not None
                continue
            job = worker.assignment
            can_park = "suspend" in self.tiers[job.tier].preemption and self._parking_room()
            resumable = job.resumed or job.checkpoints > 0 or can_park
            holders.append(SlotHolder(worker.worker_id, job.tier, job.priority, job.slice_started_at, resumable))
        if not holders or not waiting:
            return
        handoffs = plan_handoffs(self.tiers, holders, waiting, free_slots + reclaiming, time.time(), time.monotonic())
        by_id = {worker.worker_id: worker for worker in self.workers}
        for handoff in handoffs:
            worker = by_id[handoff.victim]
            self._start_handoff(worker, handoff.reason, f"for job {handoff.beneficiary}", handoff.same_tier)

    def _start_handoff(self, worker: WorkerHandle, reason: str, detail: str, same_tier: bool = False) -> None:
        """Make a background job give its slot back, trying its tier's modes in order."""
        job = worker.assignment
        resumable = job.resumed or job.checkpoints > 0
        modes = []
        for mode in self.tiers[job.tier].preemption:
            if mode == "suspend" and reason != "paused" and not self._parking_room():
                continue
            if mode != "suspend" and same_tier and not resumable:
                # Without a checkpoint it would start over; its own tier waits instead.
                continue
            modes.append(mode)
        if not modes:
            return
        worker.reclaim = Reclaim(mode="", reason=reason, next_at=None, fallbacks=modes, detail=detail)
        self._next_mode(worker)

    def _next_mode(self, worker: WorkerHandle) -> None:
        """Apply the next fallback mode of a worker's reclaim."""
        reclaim, job = worker.reclaim, worker.assignment
        tier = self.tiers[job.tier]
        if not reclaim.fallbacks:
            logger.warning("Job=%s tier=%s kept its slot: it did not yield within %.1f s and no other mode is allowed",
                           job.job_id, job.tier, tier.yield_grace_s)
            worker.reclaim = None
            return
        mode = reclaim.fallbacks.pop(0)
        now, decided_at = time.monotonic(), time.time()
        reclaim.mode, reclaim.stage = mode, 0
        if mode == "suspend":
            # The worker stays assigned and stopped: until the pause is lifted,
            # or until time slicing gives the job a slot again.
            self._park(worker, "paused" if reclaim.reason == "paused" else TIME_SLICE)
            return
        worker.flags.request_yield()
        grace = tier.yield_grace_s if mode == "yield" else tier.requeue_grace_s
        reclaim.next_at = now + grace
        # The request is an event, so the time from decision to free slot can be read from the store.
        self.store.add_event(job.job_id, job.attempt, f"{mode}_requested", self.node_id, decided_at,
                             f"{reclaim.reason} ({reclaim.detail}); grace {grace} s")
        logger.info("Asked job=%s tier=%s attempt=%d to give up its slot by %s (%s, %s)", job.job_id, job.tier,
                    job.attempt, mode, reclaim.reason, reclaim.detail)

    def _start_cancel(self, worker: WorkerHandle, reason: str) -> None:
        """Stop a running job for good: flag, then SIGTERM, then SIGKILL, after the grace periods."""
        if worker.cancelling:
            return
        job = worker.assignment
        decided_at = time.time()
        worker.flags.request_cancel()
        if worker.held_stopped:
            # A stopped job can neither see the flag nor handle SIGTERM.
            if worker.resume():
                self._record_resumed([worker], reason)
        worker.reclaim = Reclaim(mode="cancel", reason=reason,
                                 next_at=time.monotonic() + self.settings.jobs.cancel_grace_s)
        self.store.add_event(job.job_id, job.attempt, "stop_requested", self.node_id, decided_at,
                             f"{reason}; SIGTERM in {self.settings.jobs.cancel_grace_s} s")
        logger.info("Cancelling job=%s tier=%s attempt=%d pid=%d (%s)", job.job_id, job.tier, job.attempt,
                    worker.pid, reason)

    def _advance_reclaims(self) -> None:
        """Take the next step of every reclaim whose grace period is over."""
        now = time.monotonic()
        for worker in self.workers:
            reclaim = worker.reclaim
            if reclaim is None or reclaim.next_at is None or now < reclaim.next_at or worker.dead:
                continue
            if reclaim.mode == "yield":
                logger.info("Job=%s did not yield within its grace period; trying the next mode",
                            worker.assignment.job_id)
                self._next_mode(worker)
                continue
            worker.read_cpu()
            if reclaim.stage == 0:
                reclaim.stage = 1
                reclaim.next_at = now + self.settings.jobs.kill_grace_s
                if worker.held_stopped:
                    worker.resume()
                worker.terminate()
                logger.info("Sent SIGTERM to job=%s pid=%d (%s)", worker.assignment.job_id, worker.pid, reclaim.reason)
            elif reclaim.stage == 1:
                reclaim.stage = 2
                reclaim.next_at = None
                logger.warning("Killing job=%s pid=%d: it did not stop within %.1f s of SIGTERM (%s)",
                               worker.assignment.job_id, worker.pid, self.settings.jobs.kill_grace_s, reclaim.reason)
                worker.kill()

    def _limit_due_at(self, worker: WorkerHandle, now: float) -> float | None:
        """When the worker's job reaches its timeout or deadline (monotonic), if it has one and is not being stopped."""
        job = worker.assignment
        if job is None or worker.cancelling:
            return None
        due = []
        if job.timeout_s is not None and job.suspended_since is None:
            due.append(now + job.timeout_s - job.run_s(now))
        if job.deadline is not None:
            due.append(now + job.deadline - time.time())
        return min(due) if due else None

    def _enforce_limits(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            job = worker.assignment
            if job is None or worker.dead or worker.cancelling:
                continue
            if job.timeout_s is not None and job.run_s(now) >= job.timeout_s:
                self._start_cancel(worker, "timed_out")
            elif job.deadline is not None and time.time() >= job.deadline:
                self._start_cancel(worker, "deadline_exceeded")

    def _check_controls(self) -> None:
        """Apply cancel requests and pauses that clients wrote to the store."""
        self._controls_due = False
        self._next_controls_at = time.monotonic() + self.settings.node.poll_interval_s
        requests = {(job_id, attempt): reason for job_id, attempt, reason in self.store.cancel_requests(self.node_id)}
        tiers, jobs = self.store.paused()
        if tiers != self._paused_tiers or jobs != self._paused_jobs:
            self._dispatch_due = True
        self._paused_tiers, self._paused_jobs = tiers, jobs
        for worker in self.workers:
            job = worker.assignment
            if job is None or worker.dead:
                continue
            reason = requests.get((job.job_id, job.attempt))
            if reason is not None:
                self._start_cancel(worker, reason)
                continue
            paused = job.tier in tiers or job.job_id in jobs
            if paused and worker.reclaim is None and not worker.parked and self.tiers[job.tier].preemptible:
                self._start_handoff(worker, "paused", "tier paused" if job.tier in tiers else "job paused")
            elif not paused and worker.parked and worker.parked_reason == "paused":
                # It waits for a free slot like any time-sliced job.
                worker.parked_reason, worker.parked_at = TIME_SLICE, time.time()
                self._dispatch_due = True
