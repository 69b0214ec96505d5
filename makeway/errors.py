"""The exception hierarchy.

Every error makeway raises derives from `MakewayError`. The branches say who
has to act: `UsageError` for a caller's mistake (fix the call or the config),
`JobError` for the outcome of a job, `RuntimeFault` for breakage inside the
runtime or its store.
"""

from __future__ import annotations


class MakewayError(Exception):
    """Base class of every error makeway raises."""


class UsageError(MakewayError, ValueError):
    """A caller passed an invalid value; the message names it and the fix."""


class ConfigError(UsageError):
    """`makeway.toml` or a policy setting is invalid."""


class UnknownJobError(UsageError, LookupError):
    """A job name or job id that the app or the store does not know."""


class PayloadError(UsageError):
    """Job arguments or a result that the serializer cannot encode or decode."""


class JobError(MakewayError):
    """Base class of job outcomes that `JobHandle.result()` raises."""

    def __init__(self, message: str, *, job_id: str):
        super().__init__(message)
        self.job_id = job_id


class JobFailed(JobError):
    """The job raised, or its worker was lost, on its last allowed attempt.

    `remote_traceback` is the formatted traceback from the worker, when the
    job function raised.
    """

    def __init__(self, message: str, *, job_id: str, remote_traceback: str | None = None):
        super().__init__(message, job_id=job_id)
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        text = super().__str__()
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback
        return text


class JobCancelled(JobError):
    """The job was cancelled before it completed."""


class RuntimeFault(MakewayError):
    """The runtime or its store failed; retrying later may succeed."""


class StoreError(RuntimeFault):
    """The store could not be opened, migrated or written."""


class JobInterrupt(BaseException):
    """Raised inside job code when the runtime takes the job's slot away.

    It derives from BaseException, as `asyncio.CancelledError` does, so that
    `except Exception` in job code cannot swallow it. Let it propagate: the
    worker catches it and reports why the attempt ended. A job that returns
    normally has always succeeded.
    """


class YieldRequested(JobInterrupt):
    """The supervisor asked the job to give up its slot; the job is queued again
    and a later attempt resumes from the last checkpoint."""


class CancellationRequested(JobInterrupt):
    """The job was cancelled (by a user, its time limit or its deadline) and must stop."""


class StaleAttempt(JobInterrupt):
    """This attempt lost its lease: a newer attempt owns the job, so this one must stop
    without writing anything more."""
