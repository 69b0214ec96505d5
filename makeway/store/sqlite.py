"""The embedded SQLite store.

WAL mode lets clients read while a node writes; every write runs in a
`BEGIN IMMEDIATE` transaction under a busy timeout, so several processes can
submit at once without "database is locked". Each process opens its own
connection; a connection is never shared with a forked child.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from makeway.errors import StoreError, UnknownJobError, UsageError
from makeway.store.base import Candidate, Claim, Event, JobRecord, JobState, NewJob, Outcome

BUSY_TIMEOUT_S = 30.0
# A connection without a background checkpointer (a client) checkpoints
# inside its own commit only past this many WAL pages (64 MiB of 4 KiB
# pages), a safety net for when no node runs. SQLite's default of 1000 made
# about one client submission in 40 stall for 7 to 19 ms.
CLIENT_AUTOCHECKPOINT_PAGES = 16384
# The background checkpointer forces a WAL restart past this many pages:
# under steady writes a passive checkpoint never catches up with the last
# frame, so the WAL would otherwise grow without bound.
RESTART_CHECKPOINT_PAGES = 4096

# Each entry migrates the schema from version N-1 to N; a released entry is
# never edited, only followed by a new one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        tier TEXT NOT NULL,
        tier_rank INTEGER NOT NULL,
        priority INTEGER NOT NULL,
        state TEXT NOT NULL,
        payload BLOB NOT NULL,
        serializer TEXT NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 0,
        failures INTEGER NOT NULL DEFAULT 0,
        max_retries INTEGER NOT NULL,
        not_before REAL NOT NULL,
        submitted_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        updated_at REAL NOT NULL,
        lease_expires_at REAL,
        node_id TEXT,
        worker_pid INTEGER,
        result BLOB,
        error TEXT,
        traceback TEXT,
        metadata TEXT NOT NULL DEFAULT '{}',
        idempotency_key TEXT UNIQUE
    );
    CREATE INDEX jobs_claim_order ON jobs (state, tier_rank, priority DESC, submitted_at);
    CREATE INDEX jobs_queued_age ON jobs (state, tier, submitted_at);
    CREATE INDEX jobs_lease ON jobs (state, lease_expires_at);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        at REAL NOT NULL,
        from_state TEXT,
        to_state TEXT NOT NULL,
        reason TEXT NOT NULL,
        node_id TEXT,
        attempt INTEGER NOT NULL,
        detail TEXT
    );
    CREATE INDEX events_job ON events (job_id, id);
    """,
]

_JOB_COLUMNS = (
    "id, name, tier, tier_rank, priority, state, payload, serializer, attempt, failures, max_retries, "
    "not_before, submitted_at, started_at, finished_at, lease_expires_at, node_id, worker_pid, result, "
    "error, traceback, metadata, idempotency_key"
)


def _record(row: sqlite3.Row) -> JobRecord:
    values = dict(zip(_JOB_COLUMNS.split(", "), row))
    values["state"] = JobState(values["state"])
    values["metadata"] = json.loads(values["metadata"])
    return JobRecord(**values)


class _Checkpointer:
    """A thread that runs passive WAL checkpoints on its own connection."""

    def __init__(self, path: Path, interval_s: float):
        self._path = path
        self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        self._interval_s = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="makeway-wal-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            try:
                # PASSIVE never waits for readers or writers, so it cannot
                # delay a claim. Frames it could not copy wait for the next run.
                _, wal_pages, _ = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if wal_pages >= RESTART_CHECKPOINT_PAGES:
                    # RESTART blocks writers while it copies the few frames
                    # written since the passive run, then lets the next writer
                    # start the WAL from its beginning.
                    self._db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
            except sqlite3.Error as exc:
                logging.getLogger(__name__).warning("WAL checkpoint of %s failed: %s; retrying in %.1f s",
                                                    self._path, exc, self._interval_s)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(5.0)
        self._db.close()


class SQLiteStore:
    """Store on one SQLite file; safe for many processes on one machine."""

    def __init__(self, path: Path, checkpoint_interval_s: float | None = None):
        """Open (and migrate) the database at `path`.

        With `checkpoint_interval_s`, this connection never runs a WAL
        checkpoint inside its own commits; a background thread runs a passive
        one at that interval instead. A checkpoint copies and syncs pages and
        took 7 to 19 ms on the development machine, so the supervisor keeps
        it off its dispatch path.
        """
        self.path = path
        self.url = f"sqlite:///{path}"
        # The client API may be used from several threads; one lock serialises
        # them on this process's connection.
        self._lock = threading.RLock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            self._migrate()
            self._checkpointer = None
            if checkpoint_interval_s is None:
                self._db.execute(f"PRAGMA wal_autocheckpoint={CLIENT_AUTOCHECKPOINT_PAGES}")
            else:
                self._db.execute("PRAGMA wal_autocheckpoint=0")
                self._checkpointer = _Checkpointer(path, checkpoint_interval_s)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the SQLite store at {path}: {exc}. Check the path and its permissions.") from exc

    # -- plumbing ---------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """Run a write transaction that takes the database's write lock up front."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def _migrate(self) -> None:
        with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"the store at {self.path} has schema version {version}, newer than this makeway "
                    f"({len(MIGRATIONS)}); upgrade makeway"
                )
            for number in range(version, len(MIGRATIONS)):
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        db.execute(statement)
            if row is None:
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (len(MIGRATIONS),))
            else:
                db.execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS),))

    @staticmethod
    def _event(
        db: sqlite3.Connection, job_id: str, at: float, from_state: str | None, to_state: str,
        reason: str, node_id: str | None, attempt: int, detail: str | None = None,
    ) -> None:
        db.execute(
            "INSERT INTO events (job_id, at, from_state, to_state, reason, node_id, attempt, detail) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, at, from_state, to_state, reason, node_id, attempt, detail),
        )

    @staticmethod
    def _active_state(db: sqlite3.Connection, job_id: str, attempt: int) -> str | None:
        """Return the job's state if it is running or suspended at `attempt`, else None (a stale writer)."""
        row = db.execute(
            "SELECT state FROM jobs WHERE id = ? AND attempt = ? AND state IN ('running', 'suspended')",
            (job_id, attempt),
        ).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        with self._lock:
            self._db.close()

    def schema_version(self) -> int:
        return self._read("SELECT version FROM schema_version")[0][0]

    # -- clients ----------------------------------------------------------

    def submit(self, jobs: Sequence[NewJob]) -> list[str]:
        """Insert `jobs` in one transaction; a known idempotency key returns the first job's id."""
        now = time.time()
        ids: list[str] = []
        with self._write() as db:
            for job in jobs:
                if job.idempotency_key is not None:
                    row = db.execute("SELECT id FROM jobs WHERE idempotency_key = ?", (job.idempotency_key,)).fetchone()
                    if row:
                        ids.append(row[0])
                        continue
                if db.execute("SELECT 1 FROM jobs WHERE id = ?", (job.id,)).fetchone():
                    raise UsageError(
                        f"job_id {job.id!r} is already in the store; pass a new id, or an idempotency_key "
                        "to make a repeated submission return the first job"
                    )
                db.execute(
                    "INSERT INTO jobs (id, name, tier, tier_rank, priority, state, payload, serializer, "
                    "max_retries, not_before, submitted_at, updated_at, metadata, idempotency_key) "
                    "VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job.id, job.name, job.tier, job.tier_rank, job.priority, job.payload, job.serializer,
                     job.max_retries, job.not_before, now, now, json.dumps(job.metadata), job.idempotency_key),
                )
                self._event(db, job.id, now, None, JobState.QUEUED.value, "submitted", None, 0)
                ids.append(job.id)
        return ids

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._read(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return _record(rows[0]) if rows else None

    def cancel_queued(self, job_id: str, now: float, reason: str) -> Outcome:
        """Cancel `job_id` if it is queued; `applied` is True only if this call cancelled it."""
        with self._write() as db:
            row = db.execute("SELECT state, attempt FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise UnknownJobError(f"job {job_id!r} is not in the store {self.url}; check the id and the store URL")
            state, attempt = JobState(row[0]), row[1]
            if state is not JobState.QUEUED:
                return Outcome(state, applied=False)
            db.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?, updated_at = ?, error = ? WHERE id = ?",
                (now, now, f"cancelled: {reason}", job_id),
            )
            self._event(db, job_id, now, state.value, JobState.CANCELLED.value, reason, None, attempt)
            return Outcome(JobState.CANCELLED, applied=True)

    # -- nodes ------------------------------------------------------------

    def candidates(self, tiers: Sequence[str], names: Sequence[str], now: float, limit: int) -> list[Candidate]:
        """Return queued, due jobs of `tiers` with registered `names`.

        Two index scans are merged: the best by (tier rank, priority, submission
        time), and the oldest, so that aging and max_wait can promote a job that
        the first order would never reach.
        """
        if not tiers or not names or limit <= 0:
            return []
        tier_marks = ",".join("?" * len(tiers))
        name_marks = ",".join("?" * len(names))
        where = f"state = 'queued' AND tier IN ({tier_marks}) AND name IN ({name_marks}) AND not_before <= ?"
        params = [*tiers, *names, now]
        columns = "id, name, tier, tier_rank, priority, submitted_at"
        best = self._read(
            f"SELECT {columns} FROM jobs WHERE {where} ORDER BY tier_rank, priority DESC, submitted_at LIMIT ?",
            [*params, limit],
        )
        oldest = self._read(f"SELECT {columns} FROM jobs WHERE {where} ORDER BY submitted_at LIMIT ?", [*params, limit])
        merged = {row[0]: Candidate(*row) for row in best + oldest}
        return list(merged.values())

    def claim(self, job_id: str, node_id: str, worker_pid: int, lease_expires_at: float, now: float) -> Claim | None:
        """Take a lease on a queued job and raise its attempt; None if another node was first."""
        with self._write() as db:
            cursor = db.execute(
                "UPDATE jobs SET state = 'running', attempt = attempt + 1, node_id = ?, worker_pid = ?, "
                "lease_expires_at = ?, started_at = ?, updated_at = ? WHERE id = ? AND state = 'queued'",
                (node_id, worker_pid, lease_expires_at, now, now, job_id),
            )
            if cursor.rowcount == 0:
                return None
            row = db.execute(
                "SELECT id, name, tier, priority, attempt, payload, serializer, submitted_at, metadata FROM jobs WHERE id = ?",
                (job_id,),
            ).fetchone()
            self._event(db, job_id, now, JobState.QUEUED.value, JobState.RUNNING.value, "claimed", node_id, row[4],
                        f"worker_pid={worker_pid}")
        return Claim(*row[:8], metadata=json.loads(row[8]), started_at=now)

    def complete(self, job_id: str, attempt: int, result: bytes, node_id: str, now: float) -> bool:
        """Record success; False (nothing written) if `attempt` is stale."""
        with self._write() as db:
            from_state = self._active_state(db, job_id, attempt)
            if from_state is None:
                return False
            db.execute(
                "UPDATE jobs SET state = 'succeeded', result = ?, finished_at = ?, updated_at = ?, "
                "lease_expires_at = NULL WHERE id = ?",
                (result, now, now, job_id),
            )
            self._event(db, job_id, now, from_state, JobState.SUCCEEDED.value, "completed", node_id, attempt)
            return True

    def fail(
        self, job_id: str, attempt: int, error: str, traceback: str | None, reason: str,
        retry_at: float | None, node_id: str, now: float,
    ) -> Outcome:
        """Count a failed attempt; queue the job again at `retry_at` while retries remain.

        `retry_at` None means the caller wants no retry (a payload that cannot be
        decoded will not decode next time either).
        """
        with self._write() as db:
            row = db.execute(
                "SELECT state, failures, max_retries FROM jobs WHERE id = ? AND attempt = ? "
                "AND state IN ('running', 'suspended')",
                (job_id, attempt),
            ).fetchone()
            if row is None:
                current = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
                return Outcome(JobState(current[0]) if current else JobState.FAILED, applied=False)
            from_state, failures, max_retries = row
            failures += 1
            if retry_at is not None and failures <= max_retries:
                db.execute(
                    "UPDATE jobs SET state = 'queued', failures = ?, not_before = ?, error = ?, traceback = ?, "
                    "lease_expires_at = NULL, node_id = NULL, worker_pid = NULL, updated_at = ? WHERE id = ?",
                    (failures, retry_at, error, traceback, now, job_id),
                )
                self._event(db, job_id, now, from_state, JobState.QUEUED.value, reason, node_id, attempt,
                            f"retry {failures} of {max_retries} at {retry_at:.3f}: {error}")
                return Outcome(JobState.QUEUED, applied=True)
            db.execute(
                "UPDATE jobs SET state = 'failed', failures = ?, error = ?, traceback = ?, finished_at = ?, "
                "lease_expires_at = NULL, updated_at = ? WHERE id = ?",
                (failures, error, traceback, now, now, job_id),
            )
            self._event(db, job_id, now, from_state, JobState.FAILED.value, reason, node_id, attempt, error)
            return Outcome(JobState.FAILED, applied=True)

    def requeue(self, job_id: str, attempt: int, reason: str, node_id: str, now: float) -> bool:
        """Queue a running job again without counting a failure (shutdown, preemption)."""
        with self._write() as db:
            from_state = self._active_state(db, job_id, attempt)
            if from_state is None:
                return False
            db.execute(
                "UPDATE jobs SET state = 'queued', lease_expires_at = NULL, node_id = NULL, worker_pid = NULL, "
                "updated_at = ? WHERE id = ?",
                (now, job_id),
            )
            self._event(db, job_id, now, from_state, JobState.QUEUED.value, reason, node_id, attempt)
            return True

    def set_suspended(
        self, jobs: Sequence[tuple[str, int]], suspended: bool, reason: str, node_id: str, now: float,
        detail: str | None = None,
    ) -> int:
        """Move running jobs to suspended (or back), fenced by attempt; return how many moved."""
        from_state, to_state = (
            (JobState.RUNNING.value, JobState.SUSPENDED.value) if suspended
            else (JobState.SUSPENDED.value, JobState.RUNNING.value)
        )
        moved = 0
        with self._write() as db:
            for job_id, attempt in jobs:
                cursor = db.execute(
                    "UPDATE jobs SET state = ?, updated_at = ? WHERE id = ? AND attempt = ? AND state = ?",
                    (to_state, now, job_id, attempt, from_state),
                )
                if cursor.rowcount:
                    moved += 1
                    self._event(db, job_id, now, from_state, to_state, reason, node_id, attempt, detail)
        return moved

    def renew_leases(self, jobs: Sequence[tuple[str, int]], lease_expires_at: float) -> list[tuple[str, int]]:
        """Extend the leases this node holds; return the (job id, attempt) pairs it no longer holds."""
        lost = []
        if not jobs:
            return lost
        with self._write() as db:
            for job_id, attempt in jobs:
                cursor = db.execute(
                    "UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND attempt = ? "
                    "AND state IN ('running', 'suspended')",
                    (lease_expires_at, job_id, attempt),
                )
                if cursor.rowcount == 0:
                    lost.append((job_id, attempt))
        return lost

    def requeue_expired(self, now: float, node_id: str) -> list[str]:
        """Queue again every active job whose lease has expired (its node is gone)."""
        with self._write() as db:
            rows = db.execute(
                "SELECT id, state, attempt FROM jobs WHERE state IN ('running', 'suspended') AND lease_expires_at < ?",
                (now,),
            ).fetchall()
            for job_id, state, attempt in rows:
                db.execute(
                    "UPDATE jobs SET state = 'queued', lease_expires_at = NULL, node_id = NULL, worker_pid = NULL, "
                    "updated_at = ? WHERE id = ?",
                    (now, job_id),
                )
                self._event(db, job_id, now, state, JobState.QUEUED.value, "lease_expired", node_id, attempt)
        return [row[0] for row in rows]

    # -- inspection -------------------------------------------------------

    def events(self, job_id: str | None = None, limit: int = 1000) -> list[Event]:
        columns = "job_id, at, from_state, to_state, reason, node_id, attempt, detail"
        if job_id is None:
            rows = self._read(f"SELECT {columns} FROM events ORDER BY id DESC LIMIT ?", (limit,))
            rows.reverse()
        else:
            rows = self._read(f"SELECT {columns} FROM events WHERE job_id = ? ORDER BY id LIMIT ?", (job_id, limit))
        return [Event(*row) for row in rows]

    def count_events(self, reason: str, since: float = 0.0) -> int:
        return self._read("SELECT COUNT(*) FROM events WHERE reason = ? AND at >= ?", (reason, since))[0][0]

    def counts(self) -> dict[tuple[str, str], int]:
        """Return the number of jobs per (tier, state)."""
        rows = self._read("SELECT tier, state, COUNT(*) FROM jobs GROUP BY tier, state")
        return {(tier, state): count for tier, state, count in rows}

    def active_jobs(self) -> list[JobRecord]:
        rows = self._read(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN ('running', 'suspended') ORDER BY started_at"
        )
        return [_record(row) for row in rows]

    def jobs(self, state: JobState | None = None, name: str | None = None) -> list[JobRecord]:
        clauses, params = [], []
        if state is not None:
            clauses.append("state = ?")
            params.append(state.value)
        if name is not None:
            clauses.append("name = ?")
            params.append(name)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._read(f"SELECT {_JOB_COLUMNS} FROM jobs {where} ORDER BY submitted_at", params)
        return [_record(row) for row in rows]
