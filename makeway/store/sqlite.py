"""The embedded SQLite store.

WAL mode lets clients read while a node writes; every write runs in a
`BEGIN IMMEDIATE` transaction under a busy timeout, so several processes can
submit at once without "database is locked". Each process opens its own
connection; a connection is never shared with a forked child.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from makeway.errors import StoreError, UnknownJobError, UsageError
from makeway.store.base import (
    PREEMPTION_REASONS, AttemptError, Candidate, Claim, Event, JobRecord, JobState, NewJob, Outcome, SuspensionChange,
    Usage,
)

BUSY_TIMEOUT_S = 30.0
# SQLite's own busy handler sleeps 1, 2, 5, 10 ms and more between tries
# (sqliteDefaultBusyCallback in its main.c). A lock held for 0.3 ms then
# costs a waiter 1 ms, a large part of an interactive job's latency. So this
# store waits for locks itself: first 50 us, doubling up to 2 ms.
LOCK_RETRY_FIRST_S = 0.00005
LOCK_RETRY_MAX_S = 0.002
# A connection without a background checkpointer (a client) checkpoints
# inside its own commit only past this many WAL pages (64 MiB of 4 KiB
# pages), a safety net for when no node runs. SQLite's default of 1000 made
# about one client submission in 40 stall for 7 to 19 ms.
CLIENT_AUTOCHECKPOINT_PAGES = 16384
# The background checkpointer forces a WAL restart past this many pages:
# under steady writes a passive checkpoint never catches up with the last
# frame, so the WAL would otherwise grow without bound.
RESTART_CHECKPOINT_PAGES = 4096
# Stored error texts and tracebacks are cut to these many characters, so a
# job that fails with a huge message cannot bloat the store.
ERROR_TEXT_LIMIT = 2000
TRACEBACK_TEXT_LIMIT = 20000

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
    # Checkpoints, progress, cancellation, pause, time limits, accounting,
    # and aging measured from the last time a job entered the queue.
    """
    ALTER TABLE jobs ADD COLUMN queued_at REAL NOT NULL DEFAULT 0;
    UPDATE jobs SET queued_at = MAX(submitted_at, not_before);
    ALTER TABLE jobs ADD COLUMN waited_s REAL NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN timeout_s REAL;
    ALTER TABLE jobs ADD COLUMN deadline REAL;
    ALTER TABLE jobs ADD COLUMN checkpoint TEXT;
    ALTER TABLE jobs ADD COLUMN checkpoint_attempt INTEGER;
    ALTER TABLE jobs ADD COLUMN checkpoint_at REAL;
    ALTER TABLE jobs ADD COLUMN checkpoints INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN progress_done REAL;
    ALTER TABLE jobs ADD COLUMN progress_total REAL;
    ALTER TABLE jobs ADD COLUMN progress_message TEXT;
    ALTER TABLE jobs ADD COLUMN cancel_requested_at REAL;
    ALTER TABLE jobs ADD COLUMN cancel_reason TEXT;
    ALTER TABLE jobs ADD COLUMN paused INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN run_s REAL NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN cpu_s REAL NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN wasted_cpu_s REAL NOT NULL DEFAULT 0;
    DROP INDEX jobs_queued_age;
    CREATE INDEX jobs_queued_age ON jobs (state, tier, queued_at);
    CREATE INDEX jobs_cancel ON jobs (node_id, cancel_requested_at);
    CREATE INDEX jobs_deadline ON jobs (state, deadline);
    CREATE TABLE paused_tiers (tier TEXT PRIMARY KEY, paused_at REAL NOT NULL);
    """,
    # The error and traceback of every failed attempt, not only the last.
    """
    CREATE TABLE attempt_errors (
        job_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        at REAL NOT NULL,
        reason TEXT NOT NULL,
        error TEXT,
        traceback TEXT
    );
    CREATE INDEX attempt_errors_job ON attempt_errors (job_id, attempt);
    """,
    # Idempotency keys are scoped per job name: the column stores
    # "name<US>key", where US is the ASCII unit separator.
    """
    UPDATE jobs SET idempotency_key = name || char(31) || idempotency_key WHERE idempotency_key IS NOT NULL;
    """,
    # Submissions per tier, counted at submit time, so that the count survives
    # the purge of ended jobs and can be a Prometheus counter.
    """
    CREATE TABLE submitted_totals (tier TEXT PRIMARY KEY, count INTEGER NOT NULL);
    INSERT INTO submitted_totals (tier, count) SELECT tier, COUNT(*) FROM jobs GROUP BY tier;
    CREATE INDEX events_at ON events (at);
    CREATE INDEX jobs_finished ON jobs (state, finished_at);
    """,
]
KEY_SEPARATOR = "\x1f"

_JOB_COLUMNS = (
    "id, name, tier, tier_rank, priority, state, payload, serializer, attempt, failures, max_retries, "
    "not_before, submitted_at, started_at, finished_at, lease_expires_at, node_id, worker_pid, result, "
    "error, traceback, metadata, idempotency_key, queued_at, waited_s, timeout_s, deadline, checkpoint, "
    "checkpoint_attempt, checkpoint_at, checkpoints, progress_done, progress_total, progress_message, "
    "cancel_requested_at, cancel_reason, paused, run_s, cpu_s, wasted_cpu_s"
)
# The columns a job leaves behind when it goes back to the queue.
_RELEASE = "lease_expires_at = NULL, node_id = NULL, worker_pid = NULL"


def _cap(text: str | None, limit: int) -> str | None:
    """Cut `text` to `limit` characters, saying how much was cut."""
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + f"... [{len(text) - limit} more characters not stored]"


def _where(equal: dict[str, Any]) -> tuple[str, list[Any]]:
    """Return a WHERE clause that matches each column to its value, skipping None values, and its parameters."""
    used = {column: value for column, value in equal.items() if value is not None}
    if not used:
        return "", []
    return "WHERE " + " AND ".join(f"{column} = ?" for column in used), list(used.values())


def _record(row: sqlite3.Row) -> JobRecord:
    values = dict(zip(_JOB_COLUMNS.split(", "), row))
    values["state"] = JobState(values["state"])
    values["metadata"] = json.loads(values["metadata"])
    values["paused"] = bool(values["paused"])
    if values["idempotency_key"] is not None:
        values["idempotency_key"] = values["idempotency_key"].split(KEY_SEPARATOR, 1)[-1]
    return JobRecord(**values)


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    """True if `exc` means another connection holds a lock (SQLITE_BUSY or SQLITE_LOCKED)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


class _Checkpointer:
    """A thread that runs passive WAL checkpoints on its own connection."""

    def __init__(self, path: Path, interval_s: float):
        self._path = path
        # No busy timeout: RESTART holds the writer lock while it waits for
        # readers, so every submission and claim would wait with it.
        self._db = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
        self._interval_s = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="makeway-wal-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            self.checkpoint()

    def checkpoint(self) -> None:
        """Copy WAL frames into the database, and start the WAL over once it is large and no reader needs it."""
        try:
            # PASSIVE never waits for readers or writers, so it cannot
            # delay a claim. Frames it could not copy wait for the next run.
            _, wal_pages, _ = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if wal_pages >= RESTART_CHECKPOINT_PAGES:
                # RESTART blocks writers while it copies the few frames
                # written since the passive run, then lets the next writer
                # start the WAL from its beginning. While a reader still
                # uses an older snapshot it gives up at once, and the next
                # run tries again.
                self._db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
        except sqlite3.Error as exc:
            logging.getLogger(__name__).warning("WAL checkpoint of %s failed: %s; retrying in %.1f s",
                                                self._path, exc, self._interval_s)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(5.0)
        self._db.close()


def record_completion(db: sqlite3.Connection, job_id: str, attempt: int, result: bytes, now: float,
                      node_id: str | None, detail: str | None = None) -> bool:
    """In `db`'s open transaction, mark the job succeeded with `result`; False if `attempt` is not active."""
    from_state = SQLiteStore._active_state(db, job_id, attempt)
    if from_state is None:
        return False
    db.execute(
        "UPDATE jobs SET state = 'succeeded', result = ?, finished_at = ?, updated_at = ?, "
        "lease_expires_at = NULL WHERE id = ?",
        (result, now, now, job_id),
    )
    SQLiteStore._event(db, job_id, now, from_state, JobState.SUCCEEDED.value, "completed", node_id, attempt, detail)
    return True


def record_checkpoint(db: sqlite3.Connection, job_id: str, attempt: int, state: str, now: float) -> bool:
    """In `db`'s open transaction, store a checkpoint (JSON text); False if `attempt` is not active."""
    cursor = db.execute(
        "UPDATE jobs SET checkpoint = ?, checkpoint_attempt = ?, checkpoint_at = ?, "
        "checkpoints = checkpoints + 1, updated_at = ? "
        "WHERE id = ? AND attempt = ? AND state IN ('running', 'suspended')",
        (state, attempt, now, now, job_id, attempt),
    )
    return cursor.rowcount > 0


class SQLiteStore:
    """Store on one SQLite file; safe for many processes on one machine."""

    def __init__(self, path: Path, checkpoint_interval_s: float | None = None, busy_timeout_s: float = BUSY_TIMEOUT_S):
        """Open (and migrate) the database at `path`.

        With `checkpoint_interval_s`, this connection never runs a WAL
        checkpoint inside its own commits; a background thread runs a passive
        one at that interval instead. A checkpoint copies and syncs pages and
        took 7 to 19 ms on the development machine, so the supervisor keeps
        it off its dispatch path.
        """
        self.path = path
        self.url = f"sqlite:///{path}"
        self.busy_timeout_s = busy_timeout_s
        # The client API may be used from several threads; one lock serialises
        # them on this process's connection.
        self._lock = threading.RLock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            self._migrate()
            stat = os.stat(path)
            self.file_id = (stat.st_dev, stat.st_ino)
            self._checkpointer = None
            if checkpoint_interval_s is None:
                self._db.execute(f"PRAGMA wal_autocheckpoint={CLIENT_AUTOCHECKPOINT_PAGES}")
            else:
                self._db.execute("PRAGMA wal_autocheckpoint=0")
                self._checkpointer = _Checkpointer(path, checkpoint_interval_s)
            # From here on _retry_locked waits for locks (see LOCK_RETRY_FIRST_S).
            self._db.execute("PRAGMA busy_timeout=0")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the SQLite store at {path}: {exc}. Check the path and its permissions.") from exc

    # -- plumbing ---------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """Run a write transaction that takes the database's write lock up front."""
        with self._lock:
            try:
                self._retry_locked(lambda: self._db.execute("BEGIN IMMEDIATE"))
            except sqlite3.OperationalError as exc:
                if not _is_locked(exc):
                    raise
                raise StoreError(
                    f"the SQLite store {self.path} stayed locked by another process for {self.busy_timeout_s} s "
                    f"({exc}); a writer may be stuck: check for processes holding it open, such as a suspended "
                    "one or an open sqlite3 shell in a transaction"
                ) from exc
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            # In WAL mode a commit takes no further lock. In a rollback journal
            # (a file system without shared memory) it waits for readers.
            try:
                self._retry_locked(lambda: self._db.execute("COMMIT"))
            except sqlite3.Error:
                self._db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._retry_locked(lambda: self._db.execute(sql, params).fetchall())

    def _retry_locked(self, action: Callable[[], Any]) -> Any:
        """Run `action` until no other connection holds the lock it needs, for up to busy_timeout_s."""
        delay_s, deadline = LOCK_RETRY_FIRST_S, None
        while True:
            try:
                return action()
            except sqlite3.OperationalError as exc:
                if not _is_locked(exc):
                    raise
                now = time.monotonic()
                deadline = now + self.busy_timeout_s if deadline is None else deadline
                if now >= deadline:
                    raise
                time.sleep(min(delay_s, deadline - now))
                delay_s = min(2 * delay_s, LOCK_RETRY_MAX_S)

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

    @staticmethod
    def _add_usage(db: sqlite3.Connection, job_id: str, usage: Usage | None) -> None:
        if usage is not None:
            db.execute(
                "UPDATE jobs SET run_s = run_s + ?, cpu_s = cpu_s + ?, wasted_cpu_s = wasted_cpu_s + ? WHERE id = ?",
                (usage.run_s, usage.cpu_s, usage.wasted_cpu_s, job_id),
            )

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        with self._lock:
            self._db.close()

    def replaced(self) -> bool:
        """Return whether the file at this store's path is gone or is another file than the one it opened.

        A store deleted and created again (to reset it, say) is a new file.
        A connection to the old one would never see a job submitted to it.
        """
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (stat.st_dev, stat.st_ino) != self.file_id

    def check(self, full: bool = False) -> None:
        """Run SQLite's quick_check (or, with `full`, integrity_check); raise StoreError naming the file on damage."""
        pragma = "integrity_check" if full else "quick_check"
        try:
            rows = self._read(f"PRAGMA {pragma}")
        except sqlite3.DatabaseError as exc:
            rows = [(str(exc),)]
        problems = [row[0] for row in rows if row[0] != "ok"]
        if problems:
            raise StoreError(
                f"the SQLite store {self.path} failed PRAGMA {pragma}: {'; '.join(problems[:5])}. "
                "Stop every node and client using it, restore it from a backup or move it aside; "
                "see https://sqlite.org/recovery.html for recovering what it still holds"
            )

    def purge_finished(self, before: float) -> int:
        """Delete jobs that ended before `before`, with their events and errors; return how many."""
        with self._write() as db:
            ids = [row[0] for row in db.execute(
                "SELECT id FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at < ?",
                (before,),
            ).fetchall()]
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                db.execute(f"DELETE FROM events WHERE job_id IN ({marks})", chunk)
                db.execute(f"DELETE FROM attempt_errors WHERE job_id IN ({marks})", chunk)
                db.execute(f"DELETE FROM jobs WHERE id IN ({marks})", chunk)
        return len(ids)

    def schema_version(self) -> int:
        return self._read("SELECT version FROM schema_version")[0][0]

    # -- clients ----------------------------------------------------------

    def submit(self, jobs: Sequence[NewJob], idempotency_ttl_s: float | None = None) -> list[str]:
        """Insert `jobs` in one transaction.

        A job whose idempotency key was used before for the same job name
        returns the first job's id instead, unless that job ended more than
        `idempotency_ttl_s` ago: then the key is free again. The same key with
        other arguments is a UsageError, and nothing of the batch is stored.
        """
        now = time.time()
        ids: list[str] = []
        with self._write() as db:
            for job in jobs:
                key = None if job.idempotency_key is None else f"{job.name}{KEY_SEPARATOR}{job.idempotency_key}"
                if key is not None:
                    existing = self._existing_for_key(db, key, job, now, idempotency_ttl_s)
                    if existing is not None:
                        ids.append(existing)
                        continue
                if db.execute("SELECT 1 FROM jobs WHERE id = ?", (job.id,)).fetchone():
                    raise UsageError(
                        f"job_id {job.id!r} is already in the store; pass a new id, or an idempotency_key "
                        "to make a repeated submission return the first job"
                    )
                db.execute(
                    "INSERT INTO jobs (id, name, tier, tier_rank, priority, state, payload, serializer, "
                    "max_retries, not_before, submitted_at, updated_at, metadata, idempotency_key, queued_at, "
                    "timeout_s, deadline) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job.id, job.name, job.tier, job.tier_rank, job.priority, job.payload, job.serializer,
                     job.max_retries, job.not_before, now, now, json.dumps(job.metadata), key,
                     max(now, job.not_before), job.timeout_s, job.deadline),
                )
                self._event(db, job.id, now, None, JobState.QUEUED.value, "submitted", None, 0)
                db.execute(
                    "INSERT INTO submitted_totals (tier, count) VALUES (?, 1) "
                    "ON CONFLICT (tier) DO UPDATE SET count = count + 1",
                    (job.tier,),
                )
                ids.append(job.id)
        return ids

    @staticmethod
    def _existing_for_key(db: sqlite3.Connection, key: str, job: NewJob, now: float,
                          ttl_s: float | None) -> str | None:
        """Return the id of the job that owns `key`, or None once the key is free (releasing an expired one)."""
        row = db.execute("SELECT id, payload, finished_at FROM jobs WHERE idempotency_key = ?", (key,)).fetchone()
        if row is None:
            return None
        job_id, payload, finished_at = row
        if ttl_s is not None and finished_at is not None and finished_at < now - ttl_s:
            db.execute("UPDATE jobs SET idempotency_key = NULL WHERE id = ?", (job_id,))
            return None
        if bytes(payload) != job.payload:
            raise UsageError(
                f"idempotency_key {job.idempotency_key!r} was used for job {job_id} of {job.name} with other "
                "arguments; pass a new key for new arguments, or the same arguments to get that job back"
            )
        return job_id

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._read(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return _record(rows[0]) if rows else None

    def request_cancel(self, job_id: str, now: float, reason: str, detail: str | None = None) -> Outcome:
        """Cancel a queued job at once, or mark an active one for its node to stop.

        The outcome's state is CANCELLED for a queued job, the unchanged active
        state for a running or suspended one (its node finishes the
        cancellation), and the final state for an ended one (`applied` False).
        """
        with self._write() as db:
            row = db.execute("SELECT state, attempt, cancel_requested_at FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise UnknownJobError(f"job {job_id!r} is not in the store {self.url}; check the id and the store URL")
            state, attempt, requested_at = JobState(row[0]), row[1], row[2]
            if state is JobState.QUEUED:
                db.execute(
                    "UPDATE jobs SET state = 'cancelled', finished_at = ?, updated_at = ?, error = ?, "
                    "cancel_requested_at = ?, cancel_reason = ? WHERE id = ?",
                    (now, now, f"cancelled ({reason}) while queued", now, reason, job_id),
                )
                self._event(db, job_id, now, state.value, JobState.CANCELLED.value, reason, None, attempt, detail)
                return Outcome(JobState.CANCELLED, applied=True)
            if state.is_final:
                return Outcome(state, applied=False)
            if requested_at is None:
                db.execute(
                    "UPDATE jobs SET cancel_requested_at = ?, cancel_reason = ?, updated_at = ? WHERE id = ?",
                    (now, reason, now, job_id),
                )
                self._event(db, job_id, now, state.value, state.value, "cancel_requested", None, attempt,
                            detail or reason)
            return Outcome(state, applied=True)

    def cancel_requests(self, node_id: str) -> list[tuple[str, int, str]]:
        """Return (job id, attempt, reason) of this node's active jobs that a user asked to cancel."""
        rows = self._read(
            "SELECT id, attempt, cancel_reason FROM jobs WHERE node_id = ? AND cancel_requested_at IS NOT NULL "
            "AND state IN ('running', 'suspended')",
            (node_id,),
        )
        return [(row[0], row[1], row[2]) for row in rows]

    def cancel_overdue(self, now: float) -> list[str]:
        """Cancel queued jobs whose deadline has passed, so they never start."""
        with self._write() as db:
            rows = db.execute(
                "SELECT id, attempt, deadline FROM jobs WHERE state = 'queued' AND deadline IS NOT NULL AND deadline <= ?",
                (now,),
            ).fetchall()
            for job_id, attempt, deadline in rows:
                db.execute(
                    "UPDATE jobs SET state = 'cancelled', finished_at = ?, updated_at = ?, error = ?, "
                    "cancel_reason = 'deadline_exceeded' WHERE id = ?",
                    (now, now, f"deadline {deadline:.3f} passed before the job started", job_id),
                )
                self._event(db, job_id, now, JobState.QUEUED.value, JobState.CANCELLED.value, "deadline_exceeded",
                            None, attempt, "never started")
        return [row[0] for row in rows]

    def finish_cancelled(self, job_id: str, attempt: int, reason: str, detail: str | None, node_id: str,
                         now: float, usage: Usage | None = None) -> bool:
        """Record that an active job stopped because it was cancelled; False if `attempt` is stale."""
        with self._write() as db:
            from_state = self._active_state(db, job_id, attempt)
            if from_state is None:
                return False
            db.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?, updated_at = ?, error = ?, "
                "lease_expires_at = NULL, cancel_reason = COALESCE(cancel_reason, ?) WHERE id = ?",
                (now, now, f"cancelled ({reason})" + (f": {detail}" if detail else ""), reason, job_id),
            )
            self._add_usage(db, job_id, usage)
            self._event(db, job_id, now, from_state, JobState.CANCELLED.value, reason, node_id, attempt, detail)
            return True

    def add_event(self, job_id: str, attempt: int, reason: str, node_id: str | None, now: float,
                  detail: str | None = None) -> bool:
        """Record a decision about an active job that is not a transition (a yield request, say)."""
        with self._write() as db:
            state = self._active_state(db, job_id, attempt)
            if state is None:
                return False
            self._event(db, job_id, now, state, state, reason, node_id, attempt, detail)
            return True

    def set_paused(self, *, tier: str | None = None, job_id: str | None = None, paused: bool, now: float) -> bool:
        """Pause or resume a tier or one job; return True if anything changed."""
        if (tier is None) == (job_id is None):
            raise UsageError("pass exactly one of tier= or job_id= to set_paused")
        with self._write() as db:
            if tier is not None:
                if paused:
                    cursor = db.execute("INSERT OR IGNORE INTO paused_tiers (tier, paused_at) VALUES (?, ?)", (tier, now))
                else:
                    cursor = db.execute("DELETE FROM paused_tiers WHERE tier = ?", (tier,))
                return cursor.rowcount > 0
            row = db.execute("SELECT state, attempt, paused FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise UnknownJobError(f"job {job_id!r} is not in the store {self.url}; check the id and the store URL")
            if bool(row[2]) == paused:
                return False
            db.execute("UPDATE jobs SET paused = ?, updated_at = ? WHERE id = ?", (int(paused), now, job_id))
            self._event(db, job_id, now, row[0], row[0], "paused" if paused else "unpaused", None, row[1])
            return True

    def paused(self) -> tuple[set[str], set[str]]:
        """Return the paused tiers and the ids of paused jobs that have not ended."""
        tiers = {row[0] for row in self._read("SELECT tier FROM paused_tiers")}
        jobs = {row[0] for row in self._read(
            "SELECT id FROM jobs WHERE paused = 1 AND state IN ('queued', 'running', 'suspended')")}
        return tiers, jobs

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
        where = (f"state = 'queued' AND tier IN ({tier_marks}) AND name IN ({name_marks}) AND not_before <= ? "
                 "AND paused = 0")
        params = [*tiers, *names, now]
        columns = "id, name, tier, tier_rank, priority, submitted_at, queued_at, waited_s, deadline"
        best = self._read(
            f"SELECT {columns} FROM jobs WHERE {where} ORDER BY tier_rank, priority DESC, queued_at LIMIT ?",
            [*params, limit],
        )
        oldest = self._read(f"SELECT {columns} FROM jobs WHERE {where} ORDER BY queued_at LIMIT ?", [*params, limit])
        merged = {row[0]: Candidate(*row) for row in best + oldest}
        return list(merged.values())

    def claim(self, job_id: str, node_id: str, worker_pid: int, lease_expires_at: float, now: float,
              woken_by: str | None = None) -> Claim | None:
        """Take a lease on a queued job and raise its attempt; None if another node was first.

        `woken_by` names what woke the dispatch that claims it (a wake-up
        datagram or the poll), for the claim event.
        """
        with self._write() as db:
            cursor = db.execute(
                "UPDATE jobs SET state = 'running', attempt = attempt + 1, node_id = ?, worker_pid = ?, "
                "lease_expires_at = ?, started_at = ?, updated_at = ?, waited_s = waited_s + MAX(0, ? - queued_at) "
                "WHERE id = ? AND state = 'queued' AND paused = 0",
                (node_id, worker_pid, lease_expires_at, now, now, now, job_id),
            )
            if cursor.rowcount == 0:
                return None
            row = db.execute(
                "SELECT id, name, tier, priority, attempt, payload, serializer, submitted_at, metadata, timeout_s, "
                "deadline, checkpoint, queued_at FROM jobs WHERE id = ?",
                (job_id,),
            ).fetchone()
            detail = f"worker_pid={worker_pid}" + (f" woken_by={woken_by}" if woken_by else "")
            self._event(db, job_id, now, JobState.QUEUED.value, JobState.RUNNING.value, "claimed", node_id, row[4],
                        detail)
        return Claim(*row[:8], metadata=json.loads(row[8]), started_at=now, timeout_s=row[9], deadline=row[10],
                     checkpoint=row[11], queued_at=row[12])

    def complete(self, job_id: str, attempt: int, result: bytes, node_id: str, now: float,
                 usage: Usage | None = None) -> bool:
        """Record success; False (nothing written) if `attempt` is stale."""
        with self._write() as db:
            if record_completion(db, job_id, attempt, result, now, node_id):
                self._add_usage(db, job_id, usage)
                return True
            # The job's own transaction may have recorded this attempt's
            # completion already; the attempt is then not stale.
            row = db.execute("SELECT state, attempt FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None and row[0] == JobState.SUCCEEDED.value and row[1] == attempt:
                self._add_usage(db, job_id, usage)
                return True
            return False

    def fail(
        self, job_id: str, attempt: int, error: str, traceback: str | None, reason: str,
        retry_at: float | None, node_id: str, now: float, usage: Usage | None = None,
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
            error = _cap(error, ERROR_TEXT_LIMIT)
            traceback = _cap(traceback, TRACEBACK_TEXT_LIMIT)
            self._add_usage(db, job_id, usage)
            db.execute(
                "INSERT INTO attempt_errors (job_id, attempt, at, reason, error, traceback) VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, attempt, now, reason, error, traceback),
            )
            if retry_at is not None and failures <= max_retries:
                db.execute(
                    "UPDATE jobs SET state = 'queued', failures = ?, not_before = ?, queued_at = ?, error = ?, "
                    f"traceback = ?, {_RELEASE}, updated_at = ? WHERE id = ?",
                    (failures, retry_at, max(now, retry_at), error, traceback, now, job_id),
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

    def requeue(self, job_id: str, attempt: int, reason: str, node_id: str, now: float,
                usage: Usage | None = None, detail: str | None = None) -> bool:
        """Queue an active job again without counting a failure (yield, preemption, shutdown).

        It keeps its priority and the waiting time it earned, and waits behind
        jobs that entered the queue before it at the same effective priority.
        """
        with self._write() as db:
            from_state = self._active_state(db, job_id, attempt)
            if from_state is None:
                return False
            db.execute(
                f"UPDATE jobs SET state = 'queued', {_RELEASE}, queued_at = ?, updated_at = ? WHERE id = ?",
                (now, now, job_id),
            )
            self._add_usage(db, job_id, usage)
            self._event(db, job_id, now, from_state, JobState.QUEUED.value, reason, node_id, attempt, detail)
            return True

    def lose_worker(self, job_id: str, attempt: int, error: str, node_id: str, now: float, max_losses: int,
                    usage: Usage | None = None) -> Outcome:
        """Record that the worker running `attempt` died, and queue the job again without counting a failure.

        A lost worker is an interrupted attempt, not a failed one, so it uses
        none of the job's retries. A job that takes its worker down every
        time (it crashes the interpreter or runs out of memory) would loop
        forever, though, so past `max_losses` lost workers since its last
        checkpoint it fails.
        """
        with self._write() as db:
            from_state = self._active_state(db, job_id, attempt)
            if from_state is None:
                current = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
                return Outcome(JobState(current[0]) if current else JobState.FAILED, applied=False)
            error = _cap(error, ERROR_TEXT_LIMIT)
            self._add_usage(db, job_id, usage)
            db.execute(
                "INSERT INTO attempt_errors (job_id, attempt, at, reason, error, traceback) "
                "VALUES (?, ?, ?, 'worker_lost', ?, NULL)",
                (job_id, attempt, now, error),
            )
            # Only losses since the job's last checkpoint count: a job that
            # makes progress between them is not what kills its workers.
            losses = db.execute(
                "SELECT COUNT(*) FROM attempt_errors WHERE job_id = ? AND reason = 'worker_lost' "
                "AND at > COALESCE((SELECT checkpoint_at FROM jobs WHERE id = ?), 0)", (job_id, job_id),
            ).fetchone()[0]
            if losses <= max_losses:
                db.execute(
                    f"UPDATE jobs SET state = 'queued', {_RELEASE}, queued_at = ?, updated_at = ? WHERE id = ?",
                    (now, now, job_id),
                )
                self._event(db, job_id, now, from_state, JobState.QUEUED.value, "worker_lost", node_id, attempt,
                            f"lost worker {losses} of at most {max_losses} since the last checkpoint: {error}")
                return Outcome(JobState.QUEUED, applied=True)
            message = (f"{error}; the job lost its worker {losses} times since its last checkpoint "
                       f"(jobs.max_worker_losses = {max_losses}), so it probably crashes or exhausts memory itself")
            db.execute(
                "UPDATE jobs SET state = 'failed', error = ?, traceback = NULL, finished_at = ?, "
                "lease_expires_at = NULL, updated_at = ? WHERE id = ?",
                (message, now, now, job_id),
            )
            self._event(db, job_id, now, from_state, JobState.FAILED.value, "worker_lost", node_id, attempt, message)
            return Outcome(JobState.FAILED, applied=True)

    def save_checkpoint(self, job_id: str, attempt: int, state: str, now: float,
                        progress: tuple[float, float | None, str | None] | None = None) -> bool:
        """Store a job's checkpoint (JSON text), with its progress in the same write; False if `attempt` is stale."""
        with self._write() as db:
            if not record_checkpoint(db, job_id, attempt, state, now):
                return False
            if progress is not None:
                db.execute(
                    "UPDATE jobs SET progress_done = ?, progress_total = ?, progress_message = ? WHERE id = ?",
                    (*progress, job_id),
                )
            return True

    def set_progress(self, job_id: str, attempt: int, done: float, total: float | None, message: str | None,
                     now: float) -> bool:
        """Record a job's progress; False if `attempt` is stale."""
        with self._write() as db:
            cursor = db.execute(
                "UPDATE jobs SET progress_done = ?, progress_total = ?, progress_message = ?, updated_at = ? "
                "WHERE id = ? AND attempt = ? AND state IN ('running', 'suspended')",
                (done, total, message, now, job_id, attempt),
            )
            return cursor.rowcount > 0

    def set_suspended(
        self, jobs: Sequence[tuple[str, int]], suspended: bool, reason: str, node_id: str, now: float,
        detail: str | None = None,
    ) -> int:
        """Move running jobs to suspended (or back), fenced by attempt; return how many moved."""
        return self.record_suspensions([SuspensionChange(jobs, suspended, reason, now, detail)], node_id)

    def record_suspensions(self, changes: Sequence[SuspensionChange], node_id: str) -> int:
        """Apply suspensions and resumptions in order, in one transaction; return how many jobs moved.

        Each change is fenced by attempt and by the state it leaves, so one
        that arrives after the job ended or was claimed again changes nothing.
        """
        moved = 0
        with self._write() as db:
            for change in changes:
                from_state, to_state = (
                    (JobState.RUNNING.value, JobState.SUSPENDED.value) if change.suspended
                    else (JobState.SUSPENDED.value, JobState.RUNNING.value)
                )
                for job_id, attempt in change.jobs:
                    cursor = db.execute(
                        "UPDATE jobs SET state = ?, updated_at = ? WHERE id = ? AND attempt = ? AND state = ?",
                        (to_state, change.at, job_id, attempt, from_state),
                    )
                    if cursor.rowcount:
                        moved += 1
                        self._event(db, job_id, change.at, from_state, to_state, change.reason, node_id, attempt,
                                    change.detail)
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
                    f"UPDATE jobs SET state = 'queued', {_RELEASE}, queued_at = ?, updated_at = ? WHERE id = ?",
                    (now, now, job_id),
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

    def query_events(self, job_id: str | None = None, tier: str | None = None, since: float | None = None,
                     after_id: int | None = None, limit: int = 1000) -> list[Event]:
        """Return events oldest first, filtered by job, by the job's tier, by time and by position.

        Without `since` and `after_id`, the newest `limit` events are returned.
        """
        clauses, params = [], []
        if job_id is not None:
            clauses.append("events.job_id = ?")
            params.append(job_id)
        if tier is not None:
            clauses.append("events.job_id IN (SELECT id FROM jobs WHERE tier = ?)")
            params.append(tier)
        if since is not None:
            clauses.append("events.at >= ?")
            params.append(since)
        if after_id is not None:
            clauses.append("events.id > ?")
            params.append(after_id)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        columns = "job_id, at, from_state, to_state, reason, node_id, attempt, detail, id"
        if since is None and after_id is None:
            rows = self._read(f"SELECT {columns} FROM events {where} ORDER BY id DESC LIMIT ?", (*params, limit))
            rows.reverse()
        else:
            rows = self._read(f"SELECT {columns} FROM events {where} ORDER BY id LIMIT ?", (*params, limit))
        return [Event(*row) for row in rows]

    def list_jobs(self, state: JobState | None = None, tier: str | None = None, limit: int = 100) -> list[JobRecord]:
        """Return up to `limit` jobs, newest first, optionally of one state and one tier."""
        where, params = _where({"state": state.value if state is not None else None, "tier": tier})
        rows = self._read(f"SELECT {_JOB_COLUMNS} FROM jobs {where} ORDER BY submitted_at DESC LIMIT ?",
                          (*params, limit))
        return [_record(row) for row in rows]

    def recent_latencies(self, since: float) -> list[tuple[str, float]]:
        """Return (tier, seconds from submission to success) of the jobs that succeeded at or after `since`."""
        return self._read(
            "SELECT tier, finished_at - submitted_at FROM jobs WHERE state = 'succeeded' AND finished_at >= ?",
            (since,),
        )

    def event_counts(self, since: float) -> dict[tuple[str, str], int]:
        """Return the number of events per (tier, reason) at or after `since`."""
        rows = self._read(
            "SELECT jobs.tier, events.reason, COUNT(*) FROM events JOIN jobs ON jobs.id = events.job_id "
            "WHERE events.at >= ? GROUP BY jobs.tier, events.reason",
            (since,),
        )
        return {(tier, reason): count for tier, reason, count in rows}

    def count_events(self, reason: str, since: float = 0.0) -> int:
        return self._read("SELECT COUNT(*) FROM events WHERE reason = ? AND at >= ?", (reason, since))[0][0]

    def counts(self) -> dict[tuple[str, str], int]:
        """Return the number of jobs per (tier, state)."""
        rows = self._read("SELECT tier, state, COUNT(*) FROM jobs GROUP BY tier, state")
        return {(tier, state): count for tier, state, count in rows}

    def backlog(self, now: float) -> dict[str, int]:
        """Return the number of queued jobs per tier that are due (not delayed) and not paused."""
        rows = self._read(
            "SELECT tier, COUNT(*) FROM jobs WHERE state = 'queued' AND not_before <= ? AND paused = 0 GROUP BY tier",
            (now,),
        )
        return dict(rows)

    def submitted_totals(self) -> dict[str, int]:
        """Return the number of jobs ever submitted per tier, purged ones included."""
        return dict(self._read("SELECT tier, count FROM submitted_totals"))

    def attempt_errors(self, job_id: str) -> list[AttemptError]:
        """Return the error of every failed attempt of a job, oldest first."""
        rows = self._read(
            "SELECT attempt, at, reason, error, traceback FROM attempt_errors WHERE job_id = ? ORDER BY attempt, at",
            (job_id,),
        )
        return [AttemptError(*row) for row in rows]

    def retry(self, job_id: str, now: float, detail: str | None = None) -> Outcome:
        """Queue a failed or cancelled job again, with its failure count reset; other states are left alone."""
        with self._write() as db:
            row = db.execute("SELECT state, attempt FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise UnknownJobError(f"job {job_id!r} is not in the store {self.url}; check the id and the store URL")
            state, attempt = JobState(row[0]), row[1]
            if state not in (JobState.FAILED, JobState.CANCELLED):
                return Outcome(state, applied=False)
            db.execute(
                f"UPDATE jobs SET state = 'queued', failures = 0, not_before = ?, queued_at = ?, finished_at = NULL, "
                f"cancel_requested_at = NULL, cancel_reason = NULL, {_RELEASE}, updated_at = ? WHERE id = ?",
                (now, now, now, job_id),
            )
            self._event(db, job_id, now, state.value, JobState.QUEUED.value, "retried_by_user", None, attempt, detail)
            return Outcome(JobState.QUEUED, applied=True)

    def tier_accounting(self) -> list[dict[str, Any]]:
        """Per tier: attempts, checkpoints, preemptions by mode, run, CPU and wasted CPU seconds."""
        rows = self._read(
            "SELECT tier, SUM(attempt), SUM(checkpoints), SUM(run_s), SUM(cpu_s), SUM(wasted_cpu_s) "
            "FROM jobs GROUP BY tier ORDER BY tier"
        )
        counts = self._read(
            "SELECT jobs.tier, events.reason, COUNT(*) FROM events JOIN jobs ON jobs.id = events.job_id "
            "WHERE events.reason IN ('preempted', 'yielded', 'requeued') GROUP BY jobs.tier, events.reason"
        )
        preemptions: dict[str, dict[str, int]] = {}
        for tier, reason, count in counts:
            preemptions.setdefault(tier, {})[PREEMPTION_REASONS[reason]] = count
        return [
            {"tier": tier, "attempts": attempts or 0, "checkpoints": checkpoints or 0, "run_s": run_s or 0.0,
             "cpu_s": cpu_s or 0.0, "wasted_cpu_s": wasted or 0.0,
             "preemptions": {mode: preemptions.get(tier, {}).get(mode, 0) for mode in ("suspend", "yield", "requeue")}}
            for tier, attempts, checkpoints, run_s, cpu_s, wasted in rows
        ]

    def active_jobs(self) -> list[JobRecord]:
        rows = self._read(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN ('running', 'suspended') ORDER BY started_at"
        )
        return [_record(row) for row in rows]

    def jobs(self, state: JobState | None = None, name: str | None = None) -> list[JobRecord]:
        where, params = _where({"state": state.value if state is not None else None, "name": name})
        rows = self._read(f"SELECT {_JOB_COLUMNS} FROM jobs {where} ORDER BY submitted_at", params)
        return [_record(row) for row in rows]
