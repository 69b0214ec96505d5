"""The Store protocol and the records that cross it.

A store persists jobs, leases and events. Every write that concerns a running
job is fenced by its attempt number: the store applies it only while the row's
attempt still equals the writer's, so a worker that lost its lease can never
overwrite a newer attempt.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence


class JobState(str, enum.Enum):
    """The six job states. Why a transition happened is an event's reason."""

    QUEUED = "queued"
    RUNNING = "running"
    SUSPENDED = "suspended"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
# The event reason that records each preemption mode.
PREEMPTION_REASONS = {"preempted": "suspend", "yielded": "yield", "requeued": "requeue"}
ACTIVE_STATES = frozenset({JobState.RUNNING, JobState.SUSPENDED})


@dataclass(frozen=True)
class NewJob:
    """A job as a client submits it, before the store gives it a row."""

    id: str
    name: str
    tier: str
    tier_rank: int
    priority: int
    payload: bytes
    serializer: str
    max_retries: int
    not_before: float
    metadata: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    # Run time allowed per attempt, not counting suspended time; None: no limit.
    timeout_s: float | None = None
    # Wall-clock time (epoch seconds) after which the job is cancelled; None: none.
    deadline: float | None = None


@dataclass(frozen=True)
class JobRecord:
    """A job row as stored."""

    id: str
    name: str
    tier: str
    tier_rank: int
    priority: int
    state: JobState
    payload: bytes
    serializer: str
    attempt: int
    failures: int
    max_retries: int
    not_before: float
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    lease_expires_at: float | None
    node_id: str | None
    worker_pid: int | None
    result: bytes | None
    error: str | None
    traceback: str | None
    metadata: dict[str, Any]
    idempotency_key: str | None
    queued_at: float
    waited_s: float
    timeout_s: float | None
    deadline: float | None
    checkpoint: str | None
    checkpoint_attempt: int | None
    checkpoint_at: float | None
    checkpoints: int
    progress_done: float | None
    progress_total: float | None
    progress_message: str | None
    cancel_requested_at: float | None
    cancel_reason: str | None
    paused: bool
    run_s: float
    cpu_s: float
    wasted_cpu_s: float


@dataclass(frozen=True)
class Usage:
    """Resources one attempt used, added to the job's totals when the attempt ends.

    `wasted_cpu_s` is the CPU time spent after the attempt's last checkpoint
    by an attempt that did not complete: a later attempt does that work again.
    """

    run_s: float = 0.0
    cpu_s: float = 0.0
    wasted_cpu_s: float = 0.0


@dataclass(frozen=True)
class SuspensionChange:
    """Jobs that were suspended (or resumed) together, for one event each."""

    jobs: Sequence[tuple[str, int]]  # (job id, attempt)
    suspended: bool
    reason: str
    at: float
    detail: str | None = None


@dataclass(frozen=True)
class Candidate:
    """A queued job the scheduler may claim, with what ranking needs."""

    id: str
    name: str
    tier: str
    tier_rank: int
    priority: int
    submitted_at: float
    # When the job last entered the queue (submission, retry, yield or requeue),
    # and the seconds it waited in earlier turns: aging credit it keeps.
    queued_at: float
    waited_s: float
    deadline: float | None = None


@dataclass(frozen=True)
class Claim:
    """A job this node now holds a lease on, at `attempt`."""

    id: str
    name: str
    tier: str
    priority: int
    attempt: int
    payload: bytes
    serializer: str
    submitted_at: float
    metadata: dict[str, Any]
    started_at: float
    timeout_s: float | None = None
    deadline: float | None = None
    # The last checkpoint's JSON text, from any earlier attempt; None if none.
    checkpoint: str | None = None
    # When the job last entered the queue (submission, retry or requeue).
    queued_at: float | None = None


@dataclass(frozen=True)
class Event:
    """One state transition of a job."""

    job_id: str
    at: float
    from_state: str | None
    to_state: str
    reason: str
    node_id: str | None
    attempt: int
    detail: str | None
    # Position in the store's event log; later events have larger ids.
    id: int | None = None


@dataclass(frozen=True)
class AttemptError:
    """The error of one failed attempt."""

    attempt: int
    at: float
    reason: str
    error: str | None
    traceback: str | None


@dataclass(frozen=True)
class Outcome:
    """Result of a store write that may not apply: the state afterwards, and whether this write changed it."""

    state: JobState
    applied: bool


class Store(Protocol):
    """Interface of a store; the SQLite store implements it, and a PostgreSQL store will."""

    url: str

    def close(self) -> None: ...

    def submit(self, jobs: Sequence[NewJob], idempotency_ttl_s: float | None = None) -> list[str]: ...

    def get(self, job_id: str) -> JobRecord | None: ...

    def candidates(self, tiers: Sequence[str], names: Sequence[str], now: float, limit: int) -> list[Candidate]: ...

    def claim(self, job_id: str, node_id: str, worker_pid: int, lease_expires_at: float, now: float,
              woken_by: str | None = None) -> Claim | None: ...

    def complete(self, job_id: str, attempt: int, result: bytes, node_id: str, now: float,
                 usage: Usage | None = None) -> bool: ...

    def fail(
        self, job_id: str, attempt: int, error: str, traceback: str | None, reason: str,
        retry_at: float | None, node_id: str, now: float, usage: Usage | None = None,
    ) -> Outcome: ...

    def requeue(self, job_id: str, attempt: int, reason: str, node_id: str, now: float,
                usage: Usage | None = None, detail: str | None = None) -> bool: ...

    def finish_cancelled(self, job_id: str, attempt: int, reason: str, detail: str | None, node_id: str,
                         now: float, usage: Usage | None = None) -> bool: ...

    def save_checkpoint(self, job_id: str, attempt: int, state: str, now: float,
                        progress: tuple[float, float | None, str | None] | None = None) -> bool: ...

    def set_progress(self, job_id: str, attempt: int, done: float, total: float | None, message: str | None,
                     now: float) -> bool: ...

    def request_cancel(self, job_id: str, now: float, reason: str, detail: str | None = None) -> Outcome: ...

    def cancel_requests(self, node_id: str) -> list[tuple[str, int, str]]: ...

    def cancel_overdue(self, now: float) -> list[str]: ...

    def add_event(self, job_id: str, attempt: int, reason: str, node_id: str | None, now: float,
                  detail: str | None = None) -> bool: ...

    def set_paused(self, *, tier: str | None = None, job_id: str | None = None, paused: bool, now: float) -> bool: ...

    def paused(self) -> tuple[set[str], set[str]]: ...

    def set_suspended(
        self, jobs: Sequence[tuple[str, int]], suspended: bool, reason: str, node_id: str, now: float,
        detail: str | None = None,
    ) -> int: ...

    def record_suspensions(self, changes: Sequence[SuspensionChange], node_id: str) -> int: ...

    def lose_worker(self, job_id: str, attempt: int, error: str, node_id: str, now: float, max_losses: int,
                    usage: Usage | None = None) -> Outcome: ...

    def backlog(self, now: float) -> dict[str, int]: ...

    def recent_latencies(self, since: float) -> list[tuple[str, float]]: ...

    def event_counts(self, since: float) -> dict[tuple[str, str], int]: ...

    def query_events(self, job_id: str | None = None, tier: str | None = None, since: float | None = None,
                     after_id: int | None = None, limit: int = 1000) -> list[Event]: ...

    def list_jobs(self, state: JobState | None = None, tier: str | None = None, limit: int = 100) -> list[JobRecord]: ...

    def submitted_totals(self) -> dict[str, int]: ...

    def renew_leases(self, jobs: Sequence[tuple[str, int]], lease_expires_at: float) -> list[tuple[str, int]]: ...

    def requeue_expired(self, now: float, node_id: str) -> list[str]: ...


    def events(self, job_id: str | None = None, limit: int = 1000) -> list[Event]: ...

    def counts(self) -> dict[tuple[str, str], int]: ...

    def active_jobs(self) -> list[JobRecord]: ...

    def tier_accounting(self) -> list[dict[str, Any]]: ...

    def attempt_errors(self, job_id: str) -> list[AttemptError]: ...

    def check(self, full: bool = False) -> None: ...

    def purge_finished(self, before: float) -> int: ...

    def retry(self, job_id: str, now: float, detail: str | None = None) -> Outcome: ...
