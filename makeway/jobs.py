"""JobHandle, a caller's reference to a job, and JobContext, the runtime's interface for a running job."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from makeway.errors import JobCancelled, JobFailed, UnknownJobError, UsageError
from makeway.serialization import decode
from makeway.store import JobState
from makeway.store.wakeup import WAITER, Listener

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

    def cancel(self) -> bool:
        """Cancel the job if it is still queued; return True if it is cancelled now.

        A job that is running, or already ended, is left alone and False is
        returned. NOTE: cancelling a running job is not supported yet.
        """
        return self.app.store.cancel_queued(self.id, time.time(), reason="cancelled_by_user").applied


def _wait_readable(listener: Listener, timeout_s: float) -> None:
    import select

    select.select([listener], [], [], max(timeout_s, 0))


class JobContext:
    """Runtime interface for a running job, passed to a job function's `ctx` parameter.

    Never serialized: each worker builds one per attempt.
    """

    def __init__(self, *, job_id: str, name: str, tier: str, attempt: int, metadata: dict[str, Any], flags: WorkerFlags | None):
        self.job_id = job_id
        self.name = name
        self.tier = tier
        self.attempt = attempt
        self.metadata = metadata
        self.logger = logging.getLogger(f"makeway.job.{name}")
        self._flags = flags

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
