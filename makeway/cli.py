"""The `makeway` command."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from makeway.errors import MakewayError, UsageError

cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="makeway: run jobs in tiers and keep interactive work fast.")
console = Console(width=max(Console().width, 110))

STORE_HELP = "Store URL, e.g. sqlite:///makeway.db. Default: $MAKEWAY_STORE, then `store` in makeway.toml, then ./makeway.db."
CONFIG_HELP = "Path of the config file. Default: $MAKEWAY_CONFIG, then ./makeway.toml if it exists."


class JsonLogFormatter(logging.Formatter):
    """Format each record as one JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _configure_logging(level: str, log_format: str = "text") -> int:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise UsageError(f"log level {level!r} is invalid; use DEBUG, INFO, WARNING or ERROR")
    if log_format not in ("text", "json"):
        raise UsageError(f"log format {log_format!r} is invalid; use text or json")
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=numeric, handlers=[handler])
    return numeric


@contextmanager
def _import_path():
    """Put the working directory on sys.path while the app module is imported.

    An app module in the working directory must import, also when `makeway`
    runs as an installed script. The directory comes off again afterwards:
    worker processes start with this process's sys.path and import makeway
    before anything else, and a folder there named "makeway" (a clone, say)
    would shadow an editable install. Workers add the directory themselves
    once makeway is imported.
    """
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _load_app(app_spec: str, store: str | None, config: str | None):
    from makeway.app import load_app
    from makeway.policy import load_settings
    from makeway.store import resolve_store_url

    with _import_path():
        app = load_app(app_spec)
    if config is not None:
        app.settings, _ = load_settings(config)
    if store is not None or config is not None:
        app.use_store(resolve_store_url(store, app.settings.store))
    return app


def _open_store(store: str | None, config: str | None):
    from makeway.policy import load_settings
    from makeway.store import open_store, resolve_store_url

    settings, _ = load_settings(config)
    return open_store(resolve_store_url(store, settings.store), create=False)


def _int_or_text(value: str) -> int | str:
    try:
        return int(value)
    except ValueError:
        return value


@cli.command()
def node(
    app: str = typer.Option(..., "--app", help="The App to serve, as package.module:attribute."),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    suspend: Optional[str] = typer.Option(None, "--suspend", help="Override policy.suspend: all, as-needed or off."),
    scheduling: Optional[str] = typer.Option(None, "--scheduling", help="Override policy.scheduling: tiers or fifo."),
    slots: Optional[int] = typer.Option(None, "--slots", help="Override node.slots (default: CPU cores)."),
    node_nice: Optional[str] = typer.Option(
        None, "--node-nice", help="Override policy.node_nice: the supervisor's and interactive workers' nice value "
                                  "(-20 to 19), or inherit."),
    http: Optional[str] = typer.Option(
        None, "--http", help="Serve /metrics and the JSON API on HOST:PORT (overrides http.listen), for example "
                             "127.0.0.1:8377."),
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR."),
    log_format: str = typer.Option("text", "--log-format", help="text, or json for one JSON object per line."),
) -> None:
    """Start a node: a supervisor with warm worker processes, until SIGINT or SIGTERM."""
    from makeway.node.supervisor import Supervisor
    from makeway.policy import settings_from_mapping

    level = _configure_logging(log_level, log_format)
    if config is not None:
        # Workers import the app afresh; the variable makes them read the same file.
        os.environ["MAKEWAY_CONFIG"] = os.path.abspath(config)
    application = _load_app(app, store, config)
    raw = application.settings.model_dump()
    if suspend is not None:
        raw["policy"]["suspend"] = suspend
    if scheduling is not None:
        raw["policy"]["scheduling"] = scheduling
    if slots is not None:
        raw["node"]["slots"] = slots
    if node_nice is not None:
        raw["policy"]["node_nice"] = _int_or_text(node_nice)
    if http is not None:
        raw["http"]["listen"] = http
    settings = settings_from_mapping(raw, source="command-line options")
    Supervisor(application, app, settings=settings, log_level=level).run()


def _parse_json_argument(text: str, position: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        if position == "--kwargs":
            raise UsageError(
                f"--kwargs {text!r} is not JSON; pass a JSON object with quoted keys, for example '{{\"limit\": 10}}'"
            ) from None
        raise UsageError(
            f"{position} {text!r} is not JSON; quote strings as JSON, for example '\"{text}\"', "
            "and pass numbers, lists and objects as JSON"
        ) from None


@cli.command()
def submit(
    name: str = typer.Argument(..., help="Registered job name, as module:qualname or the name given to @app.job."),
    args: Optional[List[str]] = typer.Argument(None, help="Positional arguments, each a JSON value."),
    app: str = typer.Option(..., "--app", help="The App that registers the job, as package.module:attribute."),
    kwargs: Optional[str] = typer.Option(None, "--kwargs", help="Keyword arguments as a JSON object."),
    tier: Optional[str] = typer.Option(None, "--tier", help="Tier for this job (default: the job's tier)."),
    priority: Optional[int] = typer.Option(None, "--priority", help="Priority inside the tier; higher runs first."),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    wait: bool = typer.Option(False, "--wait", help="Wait for the result and print it as JSON."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="With --wait: seconds to wait; the job is not cancelled."),
) -> None:
    """Submit one job and print its id."""
    if timeout is not None and not wait:
        raise UsageError(f"--timeout {timeout} has no effect without --wait; add --wait or leave out --timeout")
    if timeout is not None and timeout < 0:
        raise UsageError(f"--timeout {timeout} is invalid; pass a number of seconds >= 0, or leave out --timeout to wait indefinitely")
    application = _load_app(app, store, config)
    function = application.function(name)
    positional = [_parse_json_argument(text, f"argument {index + 1}") for index, text in enumerate(args or [])]
    keywords = _parse_json_argument(kwargs, "--kwargs") if kwargs else {}
    if not isinstance(keywords, dict):
        raise UsageError(f"--kwargs {kwargs!r} must be a JSON object, for example '{{\"limit\": 10}}'")
    options = {key: value for key, value in (("tier", tier), ("priority", priority)) if value is not None}
    handle = function.options(**options).submit(*positional, **keywords)
    console.print(handle.id)
    if wait:
        console.print_json(json.dumps(handle.result(timeout=timeout)))


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,.2f}"


def _progress_text(record) -> str:
    if record.progress_done is None:
        return ""
    text = _number(record.progress_done)
    if record.progress_total:
        text += f"/{_number(record.progress_total)} ({100 * record.progress_done / record.progress_total:.0f} %)"
    if record.progress_message:
        text += f" {record.progress_message}"
    return text


def _timestamp(epoch: float | None) -> str | None:
    """Format epoch seconds as local ISO 8601 time, to the millisecond."""
    if epoch is None:
        return None
    from datetime import datetime

    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="milliseconds")


def _job_details(record, events) -> dict[str, Any]:
    from makeway.store import JobState
    from makeway.store.base import PREEMPTION_REASONS

    preemptions: dict[str, int] = {}
    for event in events:
        mode = PREEMPTION_REASONS.get(event.reason)
        if mode is not None:
            preemptions[mode] = preemptions.get(mode, 0) + 1
    return {
        "id": record.id, "name": record.name, "tier": record.tier, "priority": record.priority,
        "state": record.state.value, "attempt": record.attempt, "failures": record.failures,
        "max_retries": record.max_retries, "paused": record.paused, "node": record.node_id,
        "worker_pid": record.worker_pid, "submitted_at": record.submitted_at, "started_at": record.started_at,
        "finished_at": record.finished_at, "timeout_s": record.timeout_s, "deadline": record.deadline,
        "progress": {"done": record.progress_done, "total": record.progress_total, "message": record.progress_message},
        "checkpoints": record.checkpoints, "checkpoint_at": record.checkpoint_at,
        "cancel_requested_at": record.cancel_requested_at, "cancel_reason": record.cancel_reason,
        "preemptions": preemptions, "run_s": record.run_s, "cpu_s": record.cpu_s, "wasted_cpu_s": record.wasted_cpu_s,
        "last_reason": events[-1].reason if events else None,
        "result": record.result.decode("utf-8", "replace") if record.result is not None and record.serializer == "json"
        else None,
        # A job that failed, retried and then succeeded keeps the error of its
        # last failed attempt. The key names it as such, so that it does not
        # read as the job's current state.
        "error" if record.state in (JobState.FAILED, JobState.CANCELLED) else "last_failed_attempt_error": record.error,
    }


@cli.command()
def status(
    job_id: Optional[str] = typer.Argument(None, help="Show one job in detail instead of the summary."),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    failed: bool = typer.Option(False, "--failed", help="List the jobs that ended failed, with their last error."),
) -> None:
    """Show job counts per tier and state, running jobs with their progress, pauses and per-tier accounting."""
    from makeway.errors import UnknownJobError
    from makeway.store import JobState

    job_store = _open_store(store, config)
    if failed:
        _print_failed(job_store, as_json)
        return
    if job_id is not None:
        record = job_store.get(job_id)
        if record is None:
            raise UnknownJobError(f"job {job_id!r} is not in the store {job_store.url}; check the id and the --store URL")
        details = _job_details(record, job_store.events(job_id))
        details["attempt_errors"] = [
            {"attempt": e.attempt, "at": e.at, "reason": e.reason, "error": e.error, "traceback": e.traceback}
            for e in job_store.attempt_errors(job_id)
        ]
        if as_json:
            console.print_json(json.dumps(details))
            return
        table = Table(title=f"Job {job_id}", show_header=False)
        for key, value in details.items():
            if key == "progress":
                value = _progress_text(record)
            elif key.endswith("_at") or key == "deadline":
                value = _timestamp(value)
            elif key == "attempt_errors":
                value = "\n".join(f"attempt {e['attempt']} ({e['reason']}): {e['error']}" for e in value)
            table.add_row(key, "" if value is None else str(value))
        console.print(table)
        for error in details["attempt_errors"]:
            if error["traceback"]:
                console.print(f"Traceback of attempt {error['attempt']}:", style="bold")
                console.print(error["traceback"].rstrip(), markup=False, highlight=False)
        return

    counts = job_store.counts()
    active = job_store.active_jobs()
    paused_tiers, paused_jobs = job_store.paused()
    accounting = job_store.tier_accounting()
    if as_json:
        console.print_json(json.dumps({
            "store": job_store.url,
            "counts": [{"tier": tier, "state": state, "jobs": n} for (tier, state), n in sorted(counts.items())],
            "active": [{"id": r.id, "name": r.name, "tier": r.tier, "state": r.state.value, "attempt": r.attempt,
                        "node": r.node_id, "worker_pid": r.worker_pid, "started_at": r.started_at,
                        "progress": {"done": r.progress_done, "total": r.progress_total, "message": r.progress_message},
                        "cancel_requested": r.cancel_requested_at is not None} for r in active],
            "paused": {"tiers": sorted(paused_tiers), "jobs": sorted(paused_jobs)},
            "accounting": accounting,
        }))
        return

    states = [state.value for state in JobState]
    table = Table(title=f"Jobs in {job_store.url}")
    table.add_column("tier")
    for state in states:
        table.add_column(state, justify="right")
    for tier in sorted({tier for tier, _ in counts}):
        name = f"{tier} (paused)" if tier in paused_tiers else tier
        table.add_row(name, *(str(counts.get((tier, state), 0)) for state in states))
    console.print(table)

    running = Table(title="Running and suspended jobs")
    # Full ids on one line, so they can be copied or searched for.
    running.add_column("job", no_wrap=True, min_width=36)
    for column in ("name", "tier", "state", "attempt", "worker pid", "node", "running for", "progress"):
        running.add_column(column, overflow="fold")
    now = time.time()
    for record in active:
        state = record.state.value + (" (cancelling)" if record.cancel_requested_at is not None else "")
        running.add_row(record.id, record.name, record.tier, state, str(record.attempt),
                        str(record.worker_pid), record.node_id or "", f"{now - (record.started_at or now):.1f} s",
                        _progress_text(record))
    console.print(running)
    suspended = [r for r in active if r.state is JobState.SUSPENDED]
    console.print(f"Suspended workers: {len(suspended)}"
                  + (" (pids " + ", ".join(str(r.worker_pid) for r in suspended) + ")" if suspended else ""))
    if paused_jobs:
        console.print("Paused jobs: " + ", ".join(sorted(paused_jobs)))
    if accounting:
        usage = Table(title="Accounting per tier")
        columns = ("tier", "attempts", "checkpoints", "suspend", "yield", "requeue", "cpu s", "wasted cpu s")
        for column in columns:
            usage.add_column(column, justify="left" if column == "tier" else "right")
        for row in accounting:
            usage.add_row(row["tier"], str(row["attempts"]), str(row["checkpoints"]), str(row["preemptions"]["suspend"]),
                          str(row["preemptions"]["yield"]), str(row["preemptions"]["requeue"]),
                          f"{row['cpu_s']:.2f}", f"{row['wasted_cpu_s']:.2f}")
        console.print(usage)


def _wake_nodes(job_store, control: bool) -> None:
    """Wake the nodes of a SQLite store; `control` makes them re-read cancel requests and pauses."""
    from makeway.store.wakeup import CONTROL_HINT, NODE, notify

    path = getattr(job_store, "path", None)
    if path is not None:
        notify(path, NODE, CONTROL_HINT if control else b"")


def _print_failed(job_store, as_json: bool) -> None:
    from makeway.store import JobState

    records = job_store.jobs(state=JobState.FAILED)
    rows = []
    for record in records:
        events = job_store.events(record.id)
        rows.append({"id": record.id, "name": record.name, "tier": record.tier, "attempts": record.attempt,
                     "failures": record.failures, "finished_at": record.finished_at,
                     "reason": events[-1].reason if events else None, "error": record.error})
    if as_json:
        console.print_json(json.dumps({"store": job_store.url, "failed": rows}))
        return
    table = Table(title=f"Failed jobs in {job_store.url} ({len(rows)})")
    table.add_column("job", no_wrap=True, min_width=36)
    for column in ("name", "tier", "attempts", "failures", "ended", "reason", "error"):
        table.add_column(column, overflow="fold")
    for row in rows:
        first_line = (row["error"] or "").splitlines()[0] if row["error"] else ""
        table.add_row(row["id"], row["name"], row["tier"], str(row["attempts"]), str(row["failures"]),
                      _timestamp(row["finished_at"]) or "", row["reason"] or "", first_line)
    console.print(table)
    if rows:
        console.print("Queue one again with `makeway retry ID`; `makeway status ID` shows every attempt's error.")


@cli.command()
def retry(
    job_ids: List[str] = typer.Argument(..., help="Ids of failed or cancelled jobs to queue again."),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Queue failed or cancelled jobs again, with their failure count reset."""
    job_store = _open_store(store, config)
    for job_id in job_ids:
        outcome = job_store.retry(job_id, time.time(), detail="makeway retry")
        if outcome.applied:
            console.print(f"{job_id}: queued again")
        else:
            console.print(f"{job_id}: {outcome.state.value}, left alone; only failed or cancelled jobs can be retried")
    _wake_nodes(job_store, control=False)


@cli.command()
def check(
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    full: bool = typer.Option(False, "--full", help="Run the slower full integrity check instead of the quick one."),
) -> None:
    """Check the store for damage; nodes run the quick check whenever they start."""
    job_store = _open_store(store, config)
    job_store.check(full=full)
    console.print(f"{job_store.url}: {'integrity_check' if full else 'quick_check'} ok")


@cli.command()
def cancel(
    job_ids: List[str] = typer.Argument(..., help="Ids of the jobs to cancel."),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    wait: float = typer.Option(0.0, "--wait", help="Seconds to wait for running jobs to stop; 0 returns at once."),
) -> None:
    """Cancel jobs: queued ones at once, running ones through their node (flag, SIGTERM, then SIGKILL)."""
    from makeway.jobs import wait_for_final
    if wait < 0:
        raise UsageError(f"--wait {wait} is invalid; pass a number of seconds >= 0")
    job_store = _open_store(store, config)
    for job_id in job_ids:
        outcome = job_store.request_cancel(job_id, time.time(), reason="cancelled_by_user", detail="makeway cancel")
        state = outcome.state
        if not state.is_final:
            _wake_nodes(job_store, control=True)
            if wait > 0:
                state = wait_for_final(job_store, job_id, wait)
        if state.is_final and not outcome.applied:
            console.print(f"{job_id}: already {state.value}, left alone")
        elif state.is_final:
            console.print(f"{job_id}: {state.value}")
        else:
            console.print(f"{job_id}: cancelling (still {state.value}; its node stops it)")


def _set_paused(target: str, paused: bool, store: str | None, config: str | None) -> None:
    from makeway.policy import load_settings

    settings, _ = load_settings(config)
    job_store = _open_store(store, config)
    now = time.time()
    if target in settings.tiers:
        if not settings.tiers[target].preemptible and paused:
            raise UsageError(f"tier {target!r} is not preemptible, so it cannot be paused; pause a background tier")
        changed = job_store.set_paused(tier=target, paused=paused, now=now)
        what = f"tier {target}"
    elif job_store.get(target) is not None:
        changed = job_store.set_paused(job_id=target, paused=paused, now=now)
        what = f"job {target}"
    else:
        raise UsageError(f"{target!r} is neither a tier ({', '.join(sorted(settings.tiers))}) nor a job id in "
                         f"{job_store.url}; check the name")
    _wake_nodes(job_store, control=True)
    verb = "paused" if paused else "resumed"
    console.print(f"{what}: {verb}" if changed else f"{what}: already {verb}")


@cli.command()
def pause(
    target: str = typer.Argument(..., help="A tier name or a job id."),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Pause a tier or a job: nothing new is claimed, and running jobs yield or are suspended."""
    _set_paused(target, True, store, config)


@cli.command()
def resume(
    target: str = typer.Argument(..., help="A tier name or a job id."),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Lift a pause set by `makeway pause`."""
    _set_paused(target, False, store, config)


_SINCE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _parse_since(text: str) -> float:
    """Return the epoch time `text` ago ("90s", "5m", "2h", "1d") or at `text` (ISO 8601 with a time zone)."""
    number, unit = text[:-1], text[-1:]
    if unit in _SINCE_UNITS:
        try:
            return time.time() - float(number) * _SINCE_UNITS[unit]
        except ValueError:
            pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise UsageError(f"--since {text!r} is invalid; pass a duration such as 90s, 5m, 2h or 1d, or an ISO 8601 "
                         "time with a time zone such as 2026-12-05T10:00:00+00:00")
    return moment.timestamp()


def _event_line(event) -> str:
    moment = datetime.fromtimestamp(event.at).strftime("%H:%M:%S.%f")[:-3]
    change = f"{event.from_state or '-'} -> {event.to_state}"
    text = f"{moment}  {event.job_id}  #{event.attempt}  {change:<24} {event.reason}"
    if event.detail:
        text += f": {event.detail}"
    return text


@cli.command()
def events(
    job: Optional[str] = typer.Option(None, "--job", help="Only events of this job id."),
    tier: Optional[str] = typer.Option(None, "--tier", help="Only events of jobs of this tier."),
    since: Optional[str] = typer.Option(None, "--since", help="Only events at or after this: 90s, 5m, 2h, 1d, or an ISO "
                                                              "8601 time with a time zone."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new events until Ctrl-C."),
    limit: int = typer.Option(200, "--limit", help="Events to print at most (before --follow)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per event and line."),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Print the store's event log: every state change and scheduler decision, with its reason."""
    if limit < 1:
        raise UsageError(f"--limit {limit} is invalid; pass a number of events >= 1")
    if tier is not None:
        from makeway.policy import load_settings

        settings, _ = load_settings(config)
        settings.tier(tier)
    since_at = _parse_since(since) if since is not None else None
    job_store = _open_store(store, config)

    def emit(batch) -> None:
        for event in batch:
            print(json.dumps(event.__dict__) if as_json else _event_line(event), flush=True)

    batch = job_store.query_events(job_id=job, tier=tier, since=since_at, limit=limit)
    emit(batch)
    last_id = batch[-1].id if batch else None
    if last_id is None and follow:
        newest = job_store.query_events(limit=1)
        last_id = newest[-1].id if newest else 0
    try:
        while follow:
            time.sleep(0.2)
            batch = job_store.query_events(job_id=job, tier=tier, after_id=last_id, limit=1000)
            emit(batch)
            if batch:
                last_id = batch[-1].id
    except KeyboardInterrupt:
        pass


@cli.command()
def top(
    interval: float = typer.Option(1.0, "--interval", help="Seconds between refreshes."),
    once: bool = typer.Option(False, "--once", help="Print one frame and exit, for scripts."),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Show a live view of the tiers (backlog, running, suspended, latency, preemptions) and the running jobs."""
    from rich.live import Live

    from makeway.observe.top import render, take_snapshot
    from makeway.policy import load_settings

    if not 0.05 <= interval <= 3600:
        raise UsageError(f"--interval {interval} is invalid; pass seconds from 0.05 to 3600")
    settings, _ = load_settings(config)
    job_store = _open_store(store, config)
    if once:
        console.print(render(take_snapshot(job_store, settings)))
        return
    try:
        with Live(render(take_snapshot(job_store, settings)), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(take_snapshot(job_store, settings)), refresh=True)
    except KeyboardInterrupt:
        pass


@cli.command()
def dashboard(
    listen: Optional[str] = typer.Option(None, "--listen", help="HOST:PORT to serve on (overrides http.listen; "
                                                                "default 127.0.0.1:8378)."),
    app_spec: Optional[str] = typer.Option(None, "--app", help="The App, as package.module:attribute, whose job "
                                                              "functions check submissions; without it the API "
                                                              "cannot submit."),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Serve the web dashboard, the JSON API and store-wide /metrics for a store, until Ctrl-C."""
    from prometheus_client import CollectorRegistry

    from makeway.observe.metrics import PressureCollector, StoreCollector
    from makeway.policy import load_settings
    from makeway.web.api import create_api
    from makeway.web.server import HttpServer, parse_listen, resolve_token

    settings, _ = load_settings(config)
    host, port = parse_listen(listen or settings.http.listen or "127.0.0.1:8378")
    token, generated = resolve_token(host, settings.http.token)
    application = _load_app(app_spec, store, config) if app_spec else None
    job_store = application.store if application is not None else _open_store(store, config)
    registry = CollectorRegistry()
    registry.register(StoreCollector(lambda: (job_store.counts(), job_store.backlog(time.time()),
                                              job_store.submitted_totals())))
    registry.register(PressureCollector())
    server = HttpServer(create_api(job_store, settings, token, registries=lambda: [registry], app=application),
                        host, port)
    server.start()
    console.print(f"Dashboard at http://{host}:{server.port}/ (API docs at /docs)")
    if generated:
        console.print(f"Token for requests that change state: {token}")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


@cli.command()
def chaos(
    duration: float = typer.Option(60.0, "--duration", help="Seconds of random faults."),
    jobs: int = typer.Option(2000, "--jobs", help="Jobs submitted, of every tier; a third write ledger rows."),
    seed: int = typer.Option(1, "--seed", help="Seed of the random faults, to repeat a run."),
    workdir: Optional[str] = typer.Option(None, "--workdir", help="Keep the store and node logs here."),
) -> None:
    """Run jobs while killing workers and the supervisor at random; check nothing is lost or done twice."""
    from pathlib import Path

    from makeway.chaos import run_chaos

    if duration <= 0:
        raise UsageError(f"--duration {duration} is invalid; pass a number of seconds > 0")
    if jobs < 1:
        raise UsageError(f"--jobs {jobs} is invalid; pass at least 1")
    report = run_chaos(duration, jobs, Path(workdir) if workdir else None, seed=seed, log=console.print)
    console.print(f"jobs: {report.jobs} ({report.ledger_jobs} writing {report.ledger_rows} ledger rows); "
                  f"final states: {report.final_states}")
    console.print(f"faults: {report.worker_kills} worker kills, {report.suspensions} suspensions, "
                  f"{report.supervisor_kills} supervisor kills")
    console.print(f"checks: {len(report.not_final)} not final, {len(report.wrong_results)} wrong results, "
                  f"{report.missing_rows} missing and {report.duplicate_rows} duplicate ledger rows, "
                  f"{len(report.leftover_workers)} leftover workers")
    if not report.ok:
        raise typer.Exit(1)
    console.print("chaos run passed")


@cli.command()
def demo(
    duration: float = typer.Option(60.0, "--duration", help="Total run time in seconds, split over three phases."),
    rate: float = typer.Option(10.0, "--rate", help="Interactive jobs submitted per second."),
    workdir: Optional[str] = typer.Option(None, "--workdir", help="Keep the stores and logs here (default: a temporary directory)."),
) -> None:
    """Run real work with the embedded store and compare interactive latency with and without heavy jobs."""
    from makeway.demo.run import run_demo

    if duration < 6:
        raise UsageError(f"--duration {duration} is too short; pass at least 6 seconds (2 per phase)")
    if not 0 < rate <= 200:
        raise UsageError(f"--rate {rate} is invalid; pass a rate from 0 (exclusive) to 200 jobs per second")
    run_demo(duration_s=duration, rate_per_s=rate, workdir=workdir, console=console)


def main() -> None:
    try:
        cli()
    except MakewayError as exc:
        # Plain text, unwrapped, so the message stays greppable in logs.
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
