"""`makeway top`: a live terminal view of a store's tiers and running jobs.

Everything shown is read from the store, so the view works for any number
of nodes and needs no endpoint of theirs.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from makeway.bench.stats import percentile
from makeway.policy import Settings
from makeway.store import JobState, Store

WINDOW_S = 60.0
PREEMPTION_REASONS = ("preempted", "yielded", "requeued")
RUNNING_ROWS = 20


@dataclass
class TierRow:
    name: str
    backlog: int = 0
    running: int = 0
    suspended: int = 0
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    completed: int = 0
    preemptions_per_s: float = 0.0


@dataclass
class Snapshot:
    at: float
    tiers: list[TierRow]
    running: list = field(default_factory=list)


def take_snapshot(store: Store, settings: Settings, now: float | None = None, window_s: float = WINDOW_S) -> Snapshot:
    """Read per-tier figures over the last `window_s` and the running jobs from `store`."""
    now = time.time() if now is None else now
    since = now - window_s
    counts = store.counts()
    backlog = store.backlog(now)
    latencies: dict[str, list[float]] = defaultdict(list)
    for tier, seconds in store.recent_latencies(since):
        latencies[tier].append(seconds)
    events = store.event_counts(since)
    rows = []
    for name, _ in sorted(settings.tiers.items(), key=lambda item: item[1].rank):
        samples = latencies.get(name, [])
        rows.append(TierRow(
            name=name,
            backlog=backlog.get(name, 0),
            running=counts.get((name, JobState.RUNNING.value), 0),
            suspended=counts.get((name, JobState.SUSPENDED.value), 0),
            p50_ms=percentile(samples, 0.50) * 1000,
            p99_ms=percentile(samples, 0.99) * 1000,
            completed=len(samples),
            preemptions_per_s=sum(events.get((name, reason), 0) for reason in PREEMPTION_REASONS) / window_s,
        ))
    active = (store.list_jobs(state=JobState.RUNNING, limit=RUNNING_ROWS)
              + store.list_jobs(state=JobState.SUSPENDED, limit=RUNNING_ROWS))
    return Snapshot(at=now, tiers=rows, running=active[:RUNNING_ROWS])


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def render(snapshot: Snapshot) -> Group:
    """Return the rich renderable of one frame: the tier table and the running jobs with progress bars."""
    tiers = Table(title=f"makeway top - {time.strftime('%H:%M:%S', time.localtime(snapshot.at))} "
                        f"(latency and preemptions over the last {WINDOW_S:.0f} s)", title_justify="left")
    for header in ("tier", "backlog", "running", "suspended", "done", "p50 ms", "p99 ms", "preemptions/s"):
        tiers.add_column(header, justify="left" if header == "tier" else "right")
    for row in snapshot.tiers:
        tiers.add_row(row.name, str(row.backlog), str(row.running), str(row.suspended), str(row.completed),
                      _ms(row.p50_ms), _ms(row.p99_ms), f"{row.preemptions_per_s:.2f}")

    jobs = Table(title="running and suspended jobs", title_justify="left")
    # Full ids, never wrapped, so they can be copied into `makeway cancel`.
    jobs.add_column("job", no_wrap=True, min_width=36)
    for header in ("name", "tier", "state", "attempt", "running for", "progress"):
        jobs.add_column(header, overflow="fold")
    for record in snapshot.running:
        elapsed = snapshot.at - record.started_at if record.started_at else 0.0
        if record.progress_done is not None and record.progress_total:
            bar = ProgressBar(total=record.progress_total, completed=record.progress_done, width=24)
            label = Text(f" {100 * record.progress_done / record.progress_total:.0f} % {record.progress_message or ''}")
            progress = Group(bar, label)
        elif record.progress_done is not None:
            progress = Text(f"{record.progress_done:g} {record.progress_message or ''}")
        else:
            progress = Text("")
        jobs.add_row(record.id, record.name, record.tier, record.state.value, str(record.attempt),
                     f"{elapsed:.1f} s", progress)
    return Group(tiers, jobs)
