"""makeway: a job runtime that keeps interactive work fast while heavy background jobs run."""

from makeway.app import App, BoundJobFunction, JobFunction, JobRequest, load_app
from makeway.errors import (
    ConfigError,
    JobCancelled,
    JobError,
    JobFailed,
    MakewayError,
    PayloadError,
    RuntimeFault,
    StoreError,
    UnknownJobError,
    UsageError,
)
from makeway.jobs import JobContext, JobHandle
from makeway.store import JobState

__version__ = "0.1.0"

__all__ = [
    "App", "BoundJobFunction", "ConfigError", "JobCancelled", "JobContext", "JobError", "JobFailed",
    "JobFunction", "JobHandle", "JobRequest", "JobState", "MakewayError", "PayloadError", "RuntimeFault",
    "StoreError", "UnknownJobError", "UsageError", "load_app",
]
