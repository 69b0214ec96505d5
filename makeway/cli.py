"""The `makeway` command."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from makeway.errors import MakewayError, UsageError

cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="makeway: run jobs in tiers and keep interactive work fast.")
console = Console(width=max(Console().width, 110))

STORE_HELP = "Store URL, e.g. sqlite:///makeway.db. Default: $MAKEWAY_STORE, then `store` in makeway.toml, then ./makeway.db."
CONFIG_HELP = "Path of the config file. Default: $MAKEWAY_CONFIG, then ./makeway.toml if it exists."


def _configure_logging(level: str) -> int:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise UsageError(f"log level {level!r} is invalid; use DEBUG, INFO, WARNING or ERROR")
    logging.basicConfig(level=numeric, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return numeric


def _import_path() -> None:
    # An app module in the working directory must import as it does with
    # `python -m`, also when `makeway` runs as an installed script.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _load_app(app_spec: str, store: str | None, config: str | None):
    from makeway.app import load_app
    from makeway.policy import load_settings
    from makeway.store import resolve_store_url

    _import_path()
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


@cli.command()
def node(
    app: str = typer.Option(..., "--app", help="The App to serve, as package.module:attribute."),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    suspend: Optional[str] = typer.Option(None, "--suspend", help="Override policy.suspend: all, as-needed or off."),
    scheduling: Optional[str] = typer.Option(None, "--scheduling", help="Override policy.scheduling: tiers or fifo."),
    slots: Optional[int] = typer.Option(None, "--slots", help="Override node.slots (default: CPU cores)."),
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR."),
) -> None:
    """Start a node: a supervisor with warm worker processes, until SIGINT or SIGTERM."""
    from makeway.node.supervisor import Supervisor
    from makeway.policy import settings_from_mapping

    level = _configure_logging(log_level)
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


@cli.command()
def status(
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Show job counts per tier and state, running jobs and suspended workers."""
    job_store = _open_store(store, config)
    counts = job_store.counts()
    active = job_store.active_jobs()
    if as_json:
        console.print_json(json.dumps({
            "store": job_store.url,
            "counts": [{"tier": tier, "state": state, "jobs": n} for (tier, state), n in sorted(counts.items())],
            "active": [{"id": r.id, "name": r.name, "tier": r.tier, "state": r.state.value, "attempt": r.attempt,
                        "node": r.node_id, "worker_pid": r.worker_pid, "started_at": r.started_at} for r in active],
        }))
        return

    from makeway.store import JobState

    states = [state.value for state in JobState]
    table = Table(title=f"Jobs in {job_store.url}")
    table.add_column("tier")
    for state in states:
        table.add_column(state, justify="right")
    for tier in sorted({tier for tier, _ in counts}):
        table.add_row(tier, *(str(counts.get((tier, state), 0)) for state in states))
    console.print(table)

    running = Table(title="Running and suspended jobs")
    for column in ("job", "name", "tier", "state", "attempt", "worker pid", "node", "running for"):
        running.add_column(column)
    now = time.time()
    for record in active:
        running.add_row(record.id, record.name, record.tier, record.state.value, str(record.attempt),
                        str(record.worker_pid), record.node_id or "", f"{now - (record.started_at or now):.1f} s")
    console.print(running)
    suspended = [r for r in active if r.state is JobState.SUSPENDED]
    console.print(f"Suspended workers: {len(suspended)}"
                  + (" (pids " + ", ".join(str(r.worker_pid) for r in suspended) + ")" if suspended else ""))


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
