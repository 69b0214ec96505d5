"""JobHandle, a caller's reference to a job, and JobContext, the runtime's interface for a running job."""

from __future__ import annotations

import itertools
import json
import logging
import sqlite3
import os
import socket
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from makeway.errors import (
    CancellationRequested,
    JobCancelled,
    JobFailed,
    PayloadError,
    StaleAttempt,
    UnknownJobError,
    UsageError,
    YieldRequested,
)
from makeway.node.flags import CANCEL_REQUESTED as CANCEL_INDEX
from makeway.node.flags import YIELD_REQUESTED as YIELD_INDEX
from makeway.serialization import decode
from makeway.store import JobState
from makeway.store.sqlite import SQLiteStore, record_checkpoint, record_completion
from makeway.store.wakeup import WAITER, Listener, notify

if TYPE_CHECKING:
    from makeway.app import App
    from makeway.node.flags import WorkerFlags

# Upper bound on the gap between two store reads while waiting for a result,
# in case a wake-up datagram is lost.
RESULT_POLL_MAX_S = 0.25


class JobHandle:
    """A reference to a submitted job, usable from any process that opens the same store."""

    def __init__(self, app: App, job_id: str):
        self.app = app
        self.id = job_id

    def __repr__(self) -> str:
        return f"JobHandle(id={self.id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JobHandle) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def _record(self):
        record = self.app.store.get(self.id)
        if record is None:
            raise UnknownJobError(f"job {self.id!r} is not in the store {self.app.store.url}; check the id and the store URL")
        return record

    def status(self) -> JobState:
        """Return the job's current state."""
        return self._record().state

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the job to end and return its result.

        `timeout` is in seconds; None waits indefinitely. A timeout never
        cancels the job: it raises TimeoutError and the job goes on.

        Raises JobFailed (with the remote traceback) when the job failed on its
        last allowed attempt, JobCancelled when it was cancelled, TimeoutError
        when `timeout` passed first.
        """
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0):
            raise UsageError(f"timeout {timeout!r} is invalid; pass a number of seconds >= 0, or None to wait indefinitely")

        deadline = None if timeout is None else time.monotonic() + timeout
        listener = Listener(self.app.store_path, WAITER) if self.app.store_path is not None else None
        try:
            poll_s = 0.001
            while True:
                record = self._record()
                if record.state.is_final:
                    return self._outcome(record)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"job {self.id} is still {record.state.value} after {timeout} s; "
                        "it goes on running, call result() again to keep waiting"
                    )
                wait_s = poll_s if remaining is None else min(poll_s, remaining)
                if listener is not None:
                    _wait_readable(listener, wait_s)
                    listener.drain()
                else:
                    time.sleep(wait_s)
                poll_s = min(poll_s * 2, RESULT_POLL_MAX_S)
        finally:
            if listener is not None:
                listener.close()

    def _outcome(self, record) -> Any:
        if record.state is JobState.SUCCEEDED:
            return decode(record.result, record.serializer, allow_pickle=self.app.allows_pickle)
        if record.state is JobState.CANCELLED:
            raise JobCancelled(f"job {self.id} ({record.name}) was cancelled: {record.error}", job_id=self.id)
        raise JobFailed(
            f"job {self.id} ({record.name}) failed after {record.attempt} attempt(s): {record.error}",
            job_id=self.id,
            remote_traceback=record.traceback,
        )

    def cancel(self, wait: float | None = 0.0) -> JobState:
        """Cancel the job and return its state afterwards.

        A queued job is cancelled at once and never starts. A running or
        suspended job is stopped by its node, which sets the cancellation flag,
        then sends SIGTERM and finally SIGKILL to its process group after the
        grace periods (`jobs.cancel_grace_s`, `jobs.kill_grace_s`). The job
        stays running or suspended until its node confirms the stop, so the
        state returned is never "cancelled" while job code still runs.

        `wait` is how many seconds to wait for that confirmation (None: until
        the job ends). A job that ended before the request keeps its final
        state: a job that completed is not undone.
        """
        if wait is not None and (isinstance(wait, bool) or not isinstance(wait, (int, float)) or wait < 0):
            raise UsageError(f"wait {wait!r} is invalid; pass a number of seconds >= 0, or None to wait until the job ends")
        requester = f"JobHandle.cancel() in pid {os.getpid()} on {socket.gethostname()}"
        outcome = self.app.store.request_cancel(self.id, time.time(), reason="cancelled_by_user", detail=requester)
        if outcome.state.is_final:
            return outcome.state
        self.app._wake_nodes(control=True)
        if wait == 0:
            return outcome.state
        try:
            self.result(timeout=wait)
        except (JobCancelled, JobFailed, TimeoutError):
            pass
        return self.status()

    @property
    def cancel_requested(self) -> bool:
        """True once someone asked to cancel this job."""
        return self._record().cancel_requested_at is not None


def wait_for_final(store, job_id: str, timeout_s: float) -> JobState:
    """Poll `store` until the job ends or `timeout_s` passes; return its state then."""
    deadline = time.monotonic() + timeout_s
    poll_s = 0.01
    while True:
        record = store.get(job_id)
        if record.state.is_final or time.monotonic() >= deadline:
            return record.state
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        poll_s = min(poll_s * 2, RESULT_POLL_MAX_S)


def _wait_readable(listener: Listener, timeout_s: float) -> None:
    import select

    select.select([listener], [], [], max(timeout_s, 0))


# The key under which ctx.iterate keeps its cursor and state in a checkpoint.
ITERATE_KEY = "makeway.iterate"
# Progress reports between checkpoints go to the supervisor at most this often.
PROGRESS_INTERVAL_S = 0.2


# Tells `ctx.transaction()` called without a result from one called with None.
_NO_RESULT = object()


class JobContext:
    """Runtime interface for a running job, passed to a job function's `ctx` parameter.

    Never serialized: each worker builds one per attempt. Outside a worker (a
    job function called directly with a context from `JobContext.local()`),
    checkpoints stay in memory and no yield is ever requested.
    """

    def __init__(self, *, job_id: str, name: str, tier: str, attempt: int, metadata: dict[str, Any],
                 flags: WorkerFlags | None, channel: Any = None, resume_state: Any = None,
                 state_limit_bytes: int = 1_048_576, store_path: Any = None, transaction_max_s: float = 2.0,
                 encode_result: Callable[[Any], bytes] | None = None):
        self.job_id = job_id
        self.name = name
        self.tier = tier
        self.attempt = attempt
        self.metadata = metadata
        self.logger = logging.getLogger(f"makeway.job.{name}")
        self._flags = flags
        self._array = flags.array if flags is not None else [0] * 4
        self._channel = channel
        self._resume_state = resume_state
        self._state_limit_bytes = state_limit_bytes
        self._progress: tuple[float, float | None, str | None] | None = None
        self._progress_sent_at = 0.0
        self._store_path = store_path
        self._transaction_max_s = transaction_max_s
        self._encode_result = encode_result
        self.last_checkpoint: Any = None
        # Set once a transaction recorded the job's result; later checkpoints
        # and transactions of this attempt are refused.
        self.completed = False

    @classmethod
    def local(cls, name: str = "local", resume_state: Any = None) -> JobContext:
        """A context for calling a job function directly, in tests or a shell."""
        return cls(job_id="local", name=name, tier="local", attempt=1, metadata={}, flags=None,
                   resume_state=resume_state)

    # -- yield points -----------------------------------------------------

    def should_yield(self) -> bool:
        """True when the supervisor requests that this job give up its slot.

        A read of shared memory, cheap enough to call on every item. On True,
        call `checkpoint()`, which saves the state and ends the attempt; the
        job is queued again and resumes from that checkpoint.
        """
        return self._array[YIELD_INDEX] != 0

    @property
    def cancelled(self) -> bool:
        """True once the job has been cancelled, by a user, its time limit or its deadline."""
        return self._array[CANCEL_INDEX] != 0

    def raise_if_cancelled(self) -> None:
        """Raise CancellationRequested if the job has been cancelled."""
        if self._array[CANCEL_INDEX]:
            raise CancellationRequested(f"job {self.job_id} was cancelled")

    @property
    def resume_state(self) -> Any:
        """The state of the last checkpoint of an earlier attempt, or None on a first run."""
        return self._resume_state

    def checkpoint(self, state: Any) -> None:
        """Save `state` (a JSON value) so that a later attempt resumes from it.

        The write is fenced by the attempt number and carries the latest
        `progress()`. Afterwards the call raises YieldRequested if the
        supervisor asked the job to yield, and CancellationRequested if the job
        was cancelled; let both propagate. StaleAttempt means this attempt has
        lost its lease and another owns the job.
        """
        if self.completed:
            raise UsageError(f"job {self.job_id} already recorded its result in a transaction; a checkpoint after "
                             "it has nothing to resume")
        text = _encode_state(state, self._state_limit_bytes)
        if self._channel is None:
            self.last_checkpoint = json.loads(text)
        elif not self._channel.checkpoint(text, self._progress):
            raise StaleAttempt(f"job {self.job_id} attempt {self.attempt} lost its lease; its checkpoint was rejected")
        else:
            self.last_checkpoint = state
        if self._array[CANCEL_INDEX]:
            raise CancellationRequested(f"job {self.job_id} was cancelled")
        if self._array[YIELD_INDEX]:
            raise YieldRequested(f"job {self.job_id} yields its slot at a checkpoint")

    def progress(self, done: float, total: float | None = None, message: str | None = None) -> None:
        """Report progress, shown by `makeway status`; cheap to call often."""
        for label, value in (("done", done), ("total", total)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise UsageError(f"progress {label} {value!r} is invalid; pass a number")
        if message is not None and not isinstance(message, str):
            raise UsageError(f"progress message {message!r} is invalid; pass a string or None")
        self._progress = (float(done), None if total is None else float(total), message)
        now = time.monotonic()
        finished = total is not None and done >= total
        if self._channel is not None and (finished or now - self._progress_sent_at >= PROGRESS_INTERVAL_S):
            self._progress_sent_at = now
            self._channel.progress(*self._progress)

    def iterate(self, items: Iterable[Any], *, state: dict[str, Any] | None = None,
                checkpoint_every: int | None = None, seconds: float | None = 10.0,
                batch: int | None = None) -> Iterator[Any]:
        """Iterate over `items` from where an earlier attempt stopped, checkpointing as it goes.

        The cursor counts the items already processed, so it names a position
        in the input: an item is counted only once the loop body for it has
        run, and changing `batch` between attempts skips nothing. `state` is a
        dict the loop carries between items (a running total, say); it is saved
        with the cursor and restored in place on resume.

        A checkpoint is written every `checkpoint_every` items or `seconds`
        seconds, whichever comes first, at the end of the input, and whenever
        the supervisor requests a yield; the loop then raises
        YieldRequested. With `batch`, the loop yields lists of up to `batch`
        items and checkpoints only between batches.
        """
        if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int)
                                             or checkpoint_every < 1):
            raise UsageError(f"checkpoint_every {checkpoint_every!r} is invalid; pass an integer >= 1 or None")
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0):
            raise UsageError(f"seconds {seconds!r} is invalid; pass a number of seconds > 0 or None")
        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
            raise UsageError(f"batch {batch!r} is invalid; pass an integer >= 1 or None")
        if state is not None and not isinstance(state, dict):
            raise UsageError(f"state {state!r} is invalid; pass a dict of JSON values, updated in place")

        cursor, finished = 0, False
        saved = self._resume_state.get(ITERATE_KEY) if isinstance(self._resume_state, dict) else None
        if saved is not None:
            cursor, finished = int(saved["cursor"]), bool(saved.get("finished"))
            if state is not None:
                state.clear()
                state.update(saved.get("state") or {})
        if finished:
            return

        def save(position: int, done: bool) -> None:
            self.checkpoint({ITERATE_KEY: {"cursor": position, "state": state, "finished": done}})

        position = cursor
        since = 0
        last_saved_at = time.monotonic()
        array = self._array
        for chunk, size in _chunks(_skip(items, cursor), batch):
            yield chunk
            position += size
            since += size
            if array[CANCEL_INDEX]:
                raise CancellationRequested(f"job {self.job_id} was cancelled")
            if array[YIELD_INDEX] or (checkpoint_every is not None and since >= checkpoint_every) or (
                seconds is not None and time.monotonic() - last_saved_at >= seconds
            ):
                save(position, False)
                since = 0
                last_saved_at = time.monotonic()
        save(position, True)

    # -- transactions -----------------------------------------------------

    @contextmanager
    def transaction(self, checkpoint: Any = None, result: Any = _NO_RESULT) -> Iterator[sqlite3.Connection]:
        """Run the block in one transaction on the job store, committed with a checkpoint or with the job's result.

        The block gets a sqlite3 connection for the job's own tables. At the
        end, its writes and `checkpoint` (a JSON value, or None for none)
        commit together, fenced by the attempt number. With `result`, the
        block is the job's last step: its writes commit together with the
        job's completion, `result` becomes the job's result, and the job
        should return at once (its return value is not stored again). An
        attempt that lost its lease raises StaleAttempt and writes nothing,
        and an attempt killed inside the block leaves nothing behind. So each
        committed write happens once, even when the job is interrupted and
        resumed.

        The block is a critical section, since it holds the store's only
        write lock; past `jobs.transaction_max_s` it is rolled back with a
        TransactionTooLong error. Keep the work between the block's
        statements short, and compute outside the block.
        """
        if self._store_path is None:
            raise UsageError("ctx.transaction() needs a job running on a node with a SQLite store")
        if self.completed:
            raise UsageError(f"job {self.job_id} already recorded its result in a transaction; return from the job "
                             "instead of opening another one")
        completing = result is not _NO_RESULT
        if completing and checkpoint is not None:
            raise UsageError("pass checkpoint= or result= to ctx.transaction(), not both: a completed job resumes "
                             "from no checkpoint")
        if completing and self._encode_result is None:
            raise UsageError("ctx.transaction(result=...) needs a job running on a node")
        text = None if checkpoint is None else _encode_state(checkpoint, self._state_limit_bytes)
        # Encode before taking the lock, so a result that cannot be stored fails
        # the job without holding up other writers.
        data = self._encode_result(result) if completing else None
        with self.critical():
            db = sqlite3.connect(self._store_path, timeout=self._transaction_max_s, isolation_level=None)
            deadline = time.monotonic() + self._transaction_max_s
            # Abort a statement that runs past the cap; checked every 1000 VM steps.
            db.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 1000)
            try:
                db.execute("BEGIN IMMEDIATE")
                if SQLiteStore._active_state(db, self.job_id, self.attempt) is None:
                    raise StaleAttempt(f"job {self.job_id} attempt {self.attempt} lost its lease; its transaction was "
                                       "rolled back")
                yield db
                if time.monotonic() > deadline:
                    raise TransactionTooLong(self._transaction_max_s)
                now = time.time()
                if completing:
                    record_completion(db, self.job_id, self.attempt, data, now, None,
                                      "result committed with the job's transaction")
                elif text is not None:
                    record_checkpoint(db, self.job_id, self.attempt, text, now)
                db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if "interrupted" in str(exc):
                    raise TransactionTooLong(self._transaction_max_s) from exc
                raise
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            finally:
                db.close()
        if completing:
            self.completed = True
            notify(self._store_path, WAITER)
        elif text is not None:
            self.last_checkpoint = checkpoint
            if self._channel is not None:
                self._channel.checkpointed()

    # -- critical sections ------------------------------------------------

    @contextmanager
    def critical(self) -> Iterator[None]:
        """Keep the supervisor from suspending this job while the block runs.

        Use it around code that holds a lock other processes wait for (a
        database transaction, a file lock), so that a suspended job never blocks
        them. Sections nest. A suspension requested meanwhile takes effect as
        soon as the outermost section ends.
        """
        if self._flags is None:
            yield
            return
        self._flags.enter_critical()
        try:
            yield
        finally:
            self._flags.exit_critical()


class TransactionTooLong(UsageError):
    """A ctx.transaction() block held the store's write lock past jobs.transaction_max_s."""

    def __init__(self, limit_s: float):
        super().__init__(
            f"ctx.transaction() ran longer than jobs.transaction_max_s = {limit_s} s and was rolled back; "
            "do the slow work before the block and keep only the writes inside it"
        )


def _encode_state(state: Any, limit_bytes: int) -> str:
    try:
        text = json.dumps(state, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise PayloadError(
            f"checkpoint state {state!r:.200} is not JSON ({exc}); pass dicts, lists, strings, numbers, "
            "booleans and None only"
        ) from None
    if len(text) > limit_bytes:
        raise PayloadError(
            f"checkpoint state is {len(text)} bytes, over jobs.payload_limit_bytes = {limit_bytes}; "
            "store large data elsewhere and checkpoint a reference to it"
        )
    return text


def _skip(items: Iterable[Any], count: int) -> Iterator[Any]:
    """Iterate `items` from position `count`, without materialising what is skipped where possible."""
    if isinstance(items, range):
        return iter(items[count:])
    if isinstance(items, Sequence) and not isinstance(items, (str, bytes)):
        return (items[index] for index in range(count, len(items)))
    return itertools.islice(iter(items), count, None)


def _chunks(iterator: Iterator[Any], batch: int | None) -> Iterator[tuple[Any, int]]:
    if batch is None:
        for item in iterator:
            yield item, 1
        return
    while True:
        chunk = list(itertools.islice(iterator, batch))
        if not chunk:
            return
        yield chunk, len(chunk)
