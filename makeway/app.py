"""The public API: App, job registration and submission."""

from __future__ import annotations

import functools
import inspect
import math
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from makeway.observe.tracing import inject_context
from makeway.errors import UnknownJobError, UsageError
from makeway.jobs import JobHandle
from makeway.policy import Settings, load_settings, validate_priority
from makeway.serialization import JSON, PICKLE, SERIALIZERS, encode
from makeway.store import NewJob, Store, open_store, resolve_store_url, sqlite_path
from makeway.store.wakeup import CONTROL_HINT, NODE, notify

logger = logging.getLogger(__name__)

_OPTION_NAMES = ("tier", "priority", "max_retries", "delay_s", "idempotency_key", "metadata", "job_id", "timeout",
                 "deadline")


class App:
    """A set of job functions and the store their jobs go to.

    `store_url` is `sqlite:///relative.db` or `sqlite:////absolute.db`. When it
    is None, $MAKEWAY_STORE, then `store` in makeway.toml, then
    `sqlite:///makeway.db` is used. The resolved path is logged when the store
    opens, so that a client and a node on two databases show up at once.

    `serializer` is "json" (default) or "pickle". Pickle lets arguments be any
    Python object but lets anyone who can write to the store run code in the
    workers: enable it only when every writer is trusted.
    """

    def __init__(
        self,
        store_url: str | None = None,
        *,
        config: str | os.PathLike[str] | None = None,
        settings: Settings | None = None,
        serializer: str = JSON,
    ):
        if serializer not in SERIALIZERS:
            raise UsageError(f"serializer {serializer!r} is unknown; use one of {SERIALIZERS}")
        if serializer == PICKLE:
            logger.warning(
                "App uses the pickle serializer: anyone who can write to the store can run code in its workers"
            )
        if settings is None:
            settings, _ = load_settings(config)
        self.settings = settings
        self.serializer = serializer
        self.store_url = resolve_store_url(store_url, settings.store)
        self.registry: dict[str, JobFunction] = {}
        self._store: Store | None = None

    def __repr__(self) -> str:
        return f"App(store_url={self.store_url!r}, jobs={sorted(self.registry)})"

    @property
    def allows_pickle(self) -> bool:
        return self.serializer == PICKLE

    @property
    def store(self) -> Store:
        """The opened store; opened (and migrated) on first use."""
        if self._store is None:
            self._store = open_store(self.store_url)
        return self._store

    @property
    def store_path(self) -> Path | None:
        """The database file of a SQLite store, else None."""
        return sqlite_path(self.store_url) if self.store_url.startswith("sqlite:") else None

    def use_store(self, store_url: str) -> None:
        """Point this App at another store (the node's `--store` does this)."""
        if self._store is not None:
            self._store.close()
            self._store = None
        self.store_url = store_url

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def job(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        tier: str | None = None,
        priority: int = 0,
        max_retries: int | None = None,
        name: str | None = None,
        timeout: float | None = None,
    ):
        """Register a job function; usable as `@app.job` or `@app.job(tier="interactive")`.

        `timeout` is the run time in seconds each attempt may take, not
        counting time suspended; a job past it is stopped and fails with the
        reason `timed_out`. `name` defaults to "module:qualname". Nodes find the function by that
        name in the app they import, so a function defined in `__main__` needs
        an explicit name that the node's app registers too.
        """

        def register(function: Callable[..., Any]) -> JobFunction:
            job_function = JobFunction(self, function, tier=tier, priority=priority, max_retries=max_retries, name=name,
                                       timeout=timeout)
            if job_function.name in self.registry:
                raise UsageError(
                    f"job name {job_function.name!r} is already registered; pass name=... to tell the functions apart"
                )
            self.registry[job_function.name] = job_function
            return job_function

        return register(fn) if fn is not None else register

    def function(self, name: str) -> JobFunction:
        """Return the registered job function called `name`."""
        try:
            return self.registry[name]
        except KeyError:
            known = ", ".join(sorted(self.registry)) or "none"
            raise UnknownJobError(
                f"job name {name!r} is not registered in this app (registered: {known}); "
                "check the name or import the module that defines it"
            ) from None

    def submit_many(self, requests: Iterable[JobRequest]) -> list[JobHandle]:
        """Submit prepared jobs (from `fn.prepare(...)`) in one transaction; all or none are stored."""
        new_jobs = []
        for request in requests:
            if not isinstance(request, JobRequest):
                raise UsageError(f"submit_many takes JobRequest objects from fn.prepare(...), got {request!r}")
            new_jobs.append(request.new_job)
        ids = self.store.submit(new_jobs, idempotency_ttl_s=self.settings.jobs.idempotency_ttl_s)
        self._wake_nodes()
        return [JobHandle(self, job_id) for job_id in ids]

    def handle(self, job_id: str) -> JobHandle:
        """Return a handle for a job id, for example one passed from another process."""
        return JobHandle(self, job_id)

    def _wake_nodes(self, control: bool = False) -> None:
        """Wake the nodes on this store; `control` makes them re-read cancellations and pauses too."""
        if self.store_path is not None:
            notify(self.store_path, NODE, CONTROL_HINT if control else b"")


@dataclass(frozen=True)
class JobRequest:
    """A validated, encoded job ready to be stored."""

    new_job: NewJob


@dataclass(frozen=True)
class JobOptions:
    """Per-call options, kept apart from job arguments so their names never collide."""

    tier: str | None = None
    priority: int | None = None
    max_retries: int | None = None
    delay_s: float = 0.0
    idempotency_key: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    job_id: str | None = None
    timeout: float | None = None
    # Epoch seconds or an aware datetime; the job is cancelled once it passes.
    deadline: Any = None


class JobFunction:
    """A registered job function. Calling it runs it here; `submit` queues a job."""

    def __init__(self, app: App, fn: Callable[..., Any], *, tier: str | None, priority: int,
                 max_retries: int | None, name: str | None, timeout: float | None = None):
        self.app = app
        self.fn = fn
        self.name = name or _default_name(fn)
        self.tier = tier or app.settings.jobs.default_tier
        app.settings.tier(self.tier)
        self.priority = validate_priority(priority)
        self.max_retries = app.settings.jobs.max_retries if max_retries is None else _validate_retries(max_retries)
        self.timeout = _validate_timeout(timeout)
        self.signature = inspect.signature(fn)
        self.takes_context = "ctx" in self.signature.parameters
        # The parameters a caller passes: everything but the runtime-provided ctx.
        self.call_signature = self.signature.replace(
            parameters=[p for p in self.signature.parameters.values() if p.name != "ctx"]
        )
        self.is_async = inspect.iscoroutinefunction(fn)
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"JobFunction(name={self.name!r}, tier={self.tier!r})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def options(self, **options: Any) -> BoundJobFunction:
        """Return this function with per-call options: tier, priority, max_retries, delay_s, idempotency_key,
        metadata, job_id, timeout (seconds of run time) and deadline (epoch seconds or an aware datetime)."""
        unknown = sorted(set(options) - set(_OPTION_NAMES))
        if unknown:
            raise UsageError(f"option(s) {unknown} are unknown; use {list(_OPTION_NAMES)}")
        return BoundJobFunction(self, JobOptions(**options))

    def prepare(self, *args: Any, **kwargs: Any) -> JobRequest:
        return BoundJobFunction(self, JobOptions()).prepare(*args, **kwargs)

    def submit(self, *args: Any, **kwargs: Any) -> JobHandle:
        """Queue a job that calls this function with these arguments; return its handle."""
        return BoundJobFunction(self, JobOptions()).submit(*args, **kwargs)


class BoundJobFunction:
    """A job function with per-call options applied."""

    def __init__(self, function: JobFunction, options: JobOptions):
        self.function = function
        self.opts = options

    def submit(self, *args: Any, **kwargs: Any) -> JobHandle:
        return self.function.app.submit_many([self.prepare(*args, **kwargs)])[0]

    def prepare(self, *args: Any, **kwargs: Any) -> JobRequest:
        """Validate and encode a job without storing it (for `App.submit_many`)."""
        function, opts, app = self.function, self.opts, self.function.app
        try:
            function.call_signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise UsageError(
                f"arguments do not match {function.name}{function.call_signature}: {exc}; "
                "ctx is provided by the runtime and is never passed"
            ) from None

        tier_name = opts.tier or function.tier
        tier = app.settings.tier(tier_name)
        priority = function.priority if opts.priority is None else validate_priority(opts.priority)
        max_retries = function.max_retries if opts.max_retries is None else _validate_retries(opts.max_retries)
        if isinstance(opts.delay_s, bool) or not isinstance(opts.delay_s, (int, float)) or not 0 <= opts.delay_s < math.inf:
            raise UsageError(f"delay_s {opts.delay_s!r} is invalid; pass a finite number of seconds >= 0")
        if not isinstance(opts.metadata, dict):
            raise UsageError(f"metadata {opts.metadata!r} is invalid; pass a dict of JSON values")
        encode(opts.metadata, JSON, what="metadata", limit_bytes=app.settings.jobs.payload_limit_bytes)

        payload = encode(
            {"args": list(args), "kwargs": kwargs},
            app.serializer,
            what=f"arguments of {function.name}",
            limit_bytes=app.settings.jobs.payload_limit_bytes,
        )
        job_id = str(uuid.uuid4()) if opts.job_id is None else opts.job_id
        if not isinstance(job_id, str) or not job_id:
            raise UsageError(f"job_id {job_id!r} is invalid; pass a non-empty string or leave it out")
        return JobRequest(NewJob(
            id=job_id,
            name=function.name,
            tier=tier_name,
            tier_rank=tier.rank,
            priority=priority,
            payload=payload,
            serializer=app.serializer,
            max_retries=max_retries,
            not_before=time.time() + opts.delay_s,
            metadata=inject_context(opts.metadata),
            idempotency_key=opts.idempotency_key,
            timeout_s=function.timeout if opts.timeout is None else _validate_timeout(opts.timeout),
            deadline=_validate_deadline(opts.deadline),
        ))


def _default_name(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None)
    if module == "__main__" or module is None:
        raise UsageError(
            f"job function {fn.__qualname__} is defined in __main__, which a node cannot import; "
            "move it to a module and start the node with --app module:app, or pass name=... explicitly"
        )
    return f"{module}:{fn.__qualname__}"


def _validate_retries(max_retries: object) -> int:
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise UsageError(f"max_retries {max_retries!r} is invalid; pass an integer >= 0")
    return max_retries


def _validate_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise UsageError(f"timeout {timeout!r} is invalid; pass a finite number of seconds > 0, or None for no limit")
    return float(timeout)


def _validate_deadline(deadline: object) -> float | None:
    import datetime

    if deadline is None:
        return None
    if isinstance(deadline, datetime.datetime):
        if deadline.tzinfo is None:
            raise UsageError(
                f"deadline {deadline!r} has no time zone; pass an aware datetime, "
                "for example datetime.now(timezone.utc) + timedelta(minutes=5)"
            )
        return deadline.timestamp()
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not math.isfinite(deadline):
        raise UsageError(f"deadline {deadline!r} is invalid; pass epoch seconds (time.time() + 60) or an aware datetime")
    return float(deadline)


def load_app(spec: str) -> App:
    """Import "package.module:attribute" and return the App it names."""
    import importlib

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"app {spec!r} is invalid; use the form package.module:app")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UsageError(
            f"app {spec!r}: module {module_name!r} cannot be imported ({exc}); "
            "run from the directory that contains it or add it to PYTHONPATH"
        ) from exc
    app = getattr(module, attribute, None)
    if not isinstance(app, App):
        raise UsageError(f"app {spec!r}: {module_name}.{attribute} is {type(app).__name__}, not a makeway App")
    return app
