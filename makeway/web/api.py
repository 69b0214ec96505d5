"""The JSON API and the Prometheus endpoint, as a FastAPI app over one store.

Reads need no credentials. Requests that change state (cancel, pause,
resume) need the bearer token given to `create_api`.
"""

from __future__ import annotations

import hmac
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from makeway.errors import MakewayError, UnknownJobError
from makeway.observe.metrics import read_pressure
from makeway.observe.top import WINDOW_S, take_snapshot
from makeway.policy import Settings
from makeway.store import JobState, Store
from makeway.store.base import Event
from makeway.store.wakeup import CONTROL_HINT, NODE, notify

if TYPE_CHECKING:
    from makeway.app import App

MAX_LIST = 1000
STATIC_DIR = Path(__file__).parent / "static"


class JobSummary(BaseModel):
    id: str
    name: str
    tier: str
    priority: int
    state: str
    attempt: int
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    node_id: str | None
    progress_done: float | None
    progress_total: float | None
    progress_message: str | None
    paused: bool
    error: str | None


class TierOut(BaseModel):
    name: str
    rank: int
    pool: str
    preemptible: bool
    paused: bool
    backlog: int
    states: dict[str, int]


class TierStats(BaseModel):
    name: str
    backlog: int
    running: int
    suspended: int
    completed: int
    p50_ms: float | None
    p99_ms: float | None
    preemptions_per_s: float
    cpu_s: float


class StatsOut(BaseModel):
    at: float
    window_s: float
    tiers: list[TierStats]
    pressure: dict[str, float]


class SubmitIn(BaseModel):
    """A job to queue: a registered job name, its arguments as JSON, and per-call options."""

    name: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    tier: str | None = None
    priority: int | None = None
    max_retries: int | None = None
    delay_s: float | None = None
    idempotency_key: str | None = None
    metadata: dict[str, Any] = {}
    timeout: float | None = None


class SubmitOut(BaseModel):
    id: str
    state: str


class ChangeOut(BaseModel):
    target: str
    state: str
    changed: bool


def _summary(record) -> JobSummary:
    return JobSummary(
        id=record.id, name=record.name, tier=record.tier, priority=record.priority, state=record.state.value,
        attempt=record.attempt, submitted_at=record.submitted_at, started_at=record.started_at,
        finished_at=record.finished_at, node_id=record.node_id, progress_done=record.progress_done,
        progress_total=record.progress_total, progress_message=record.progress_message, paused=record.paused,
        error=record.error,
    )


def create_api(store: Store, settings: Settings, token: str,
               registries: Callable[[], Iterable[CollectorRegistry]] | None = None, app: App | None = None) -> FastAPI:
    """Build the app. `registries` returns the Prometheus registries that /metrics exposes; `app`, whose job
    functions check a submission's arguments, enables POST /api/jobs."""
    api = FastAPI(title="makeway", summary="Jobs, tiers and events of a makeway store", version="1")

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette lists only the methods of the first route whose path
            # matches; a path with a GET and a POST route needs both.
            methods = {method for route in api.routes if isinstance(route, Route)
                       and route.path_regex.match(request.url.path) for method in (route.methods or ())}
            headers["Allow"] = ", ".join(sorted(methods))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    def require_token(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.encode(), token.encode()):
            raise HTTPException(status_code=401, detail="missing or wrong token; send 'Authorization: Bearer TOKEN'",
                                headers={"WWW-Authenticate": "Bearer"})

    def wake_nodes() -> None:
        path = getattr(store, "path", None)
        if path is not None:
            notify(path, NODE, CONTROL_HINT)

    @api.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        body = b"".join(generate_latest(registry) for registry in (registries() if registries else []))
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @api.get("/api/jobs", response_model=list[JobSummary])
    def list_jobs(state: JobState | None = None, tier: str | None = None,
                  limit: int = Query(100, ge=1, le=MAX_LIST)) -> list[JobSummary]:
        """Jobs, newest first, optionally of one state and tier."""
        return [_summary(record) for record in store.list_jobs(state=state, tier=tier, limit=limit)]

    @api.get("/api/jobs/{job_id}", response_model=JobSummary, responses={404: {"description": "no such job"}})
    def get_job(job_id: str) -> JobSummary:
        record = store.get(job_id)
        if record is None:
            raise HTTPException(status_code=404, detail=f"job {job_id!r} is not in the store")
        return _summary(record)

    @api.get("/api/tiers", response_model=list[TierOut])
    def list_tiers() -> list[TierOut]:
        """List every tier with its queued backlog and its jobs per state."""
        counts = store.counts()
        backlog = store.backlog(time.time())
        paused, _ = store.paused()
        return [
            TierOut(name=name, rank=tier.rank, pool=tier.pool, preemptible=tier.preemptible, paused=name in paused,
                    backlog=backlog.get(name, 0),
                    states={state: count for (tier_name, state), count in counts.items() if tier_name == name})
            for name, tier in sorted(settings.tiers.items(), key=lambda item: item[1].rank)
        ]

    @api.get("/api/stats", response_model=StatsOut)
    def stats() -> StatsOut:
        """Summarise each tier over the last minute, with the CPU seconds its attempts used so far and the
        machine's pressure; the dashboard polls it."""
        snapshot = take_snapshot(store, settings)
        cpu = {row["tier"]: row["cpu_s"] for row in store.tier_accounting()}
        tiers = [
            TierStats(name=row.name, backlog=row.backlog, running=row.running, suspended=row.suspended,
                      completed=row.completed, p50_ms=None if math.isnan(row.p50_ms) else row.p50_ms,
                      p99_ms=None if math.isnan(row.p99_ms) else row.p99_ms,
                      preemptions_per_s=row.preemptions_per_s, cpu_s=cpu.get(row.name, 0.0))
            for row in snapshot.tiers
        ]
        return StatsOut(at=snapshot.at, window_s=WINDOW_S, tiers=tiers, pressure=read_pressure())

    @api.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    api.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @api.get("/api/events", response_model=list[Event])
    def list_events(job: str | None = None, tier: str | None = None,
                    since: float | None = Query(None, description="epoch seconds; only events at or after it"),
                    limit: int = Query(200, ge=1, le=MAX_LIST)) -> list[Event]:
        """State changes and scheduler decisions, oldest first."""
        return store.query_events(job_id=job, tier=tier, since=since, limit=limit)

    @api.post("/api/jobs/{job_id}/cancel", response_model=ChangeOut, dependencies=[Depends(require_token)],
              responses={401: {"description": "missing or wrong token"}, 404: {"description": "no such job"}})
    def cancel_job(job_id: str) -> ChangeOut:
        """Cancel a job: a queued one at once, a running one through its node."""
        try:
            outcome = store.request_cancel(job_id, time.time(), reason="cancelled_by_user", detail="HTTP API")
        except UnknownJobError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        if not outcome.state.is_final:
            wake_nodes()
        return ChangeOut(target=job_id, state=outcome.state.value, changed=outcome.applied)

    @api.post("/api/jobs", response_model=SubmitOut, status_code=201, dependencies=[Depends(require_token)],
              responses={400: {"description": "the body is not valid JSON"},
                         401: {"description": "missing or wrong token"}, 404: {"description": "unknown job name"},
                         422: {"description": "invalid arguments or options"},
                         503: {"description": "no app to check submissions against"}})
    def submit_job(request: SubmitIn) -> SubmitOut:
        """Queue a job of a registered function; arguments are JSON and are checked against its signature."""
        if app is None:
            raise HTTPException(status_code=503, detail="this endpoint has no app to check jobs against; serve it "
                                                        "from a node (--http) or run makeway dashboard --app")
        try:
            function = app.function(request.name)
        except UnknownJobError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        options = {key: value for key, value in request.model_dump().items()
                   if key not in ("name", "args", "kwargs") and value not in (None, {})}
        try:
            handle = function.options(**options).submit(*request.args, **request.kwargs)
        except MakewayError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        wake_nodes()
        return SubmitOut(id=handle.id, state=store.get(handle.id).state.value)

    def set_paused(target: str, paused: bool) -> ChangeOut:
        now = time.time()
        if target in settings.tiers:
            if paused and not settings.tiers[target].preemptible:
                raise HTTPException(status_code=409, detail=f"tier {target!r} is not preemptible, so it cannot be paused")
            changed = store.set_paused(tier=target, paused=paused, now=now)
        elif store.get(target) is not None:
            changed = store.set_paused(job_id=target, paused=paused, now=now)
        else:
            raise HTTPException(status_code=404, detail=f"{target!r} is neither a tier nor a job id")
        wake_nodes()
        return ChangeOut(target=target, state="paused" if paused else "resumed", changed=changed)

    @api.post("/api/pause/{target}", response_model=ChangeOut, dependencies=[Depends(require_token)],
              responses={401: {"description": "missing or wrong token"}, 404: {"description": "no such tier or job"},
                         409: {"description": "the tier cannot be paused"}})
    def pause(target: str) -> ChangeOut:
        """Pause a tier or a job: nothing new is claimed, running jobs yield or are suspended."""
        return set_paused(target, True)

    @api.post("/api/resume/{target}", response_model=ChangeOut, dependencies=[Depends(require_token)],
              responses={401: {"description": "missing or wrong token"}, 404: {"description": "no such tier or job"},
                         409: {"description": "the tier cannot be paused"}})
    def resume(target: str) -> ChangeOut:
        """Lift a pause."""
        return set_paused(target, False)

    return api


