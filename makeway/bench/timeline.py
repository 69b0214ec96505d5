"""Figures computed from a store's timestamps after a phase: bulk progress and preemption delays.

The store records every state transition as an event with its wall-clock time
(`events.at`), and each job's `submitted_at`, `started_at` and `finished_at`.
From them this module rebuilds when each job was running, which is enough to

- credit bulk progress to a window precisely: a job that straddles an edge of
  the window counts with the share of its running time (suspended time
  excluded) that falls inside it, instead of all or nothing;
- measure how long after an interactive job's arrival the background jobs it
  preempted were stopped.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from makeway.store import Event, JobRecord, JobState

RUNNING = JobState.RUNNING.value
INTERACTIVE = "interactive"
BULK = "bulk"
PREEMPTED = "preempted"


@dataclass(frozen=True)
class Interval:
    """A stretch of time in which one attempt of a job was in the running state."""

    job_id: str
    attempt: int
    start: float
    end: float  # math.inf while the job is still running
    end_reason: str | None  # the reason of the event that ended it, e.g. "preempted" or "completed"


@dataclass
class Timeline:
    """The jobs and events of one store."""

    jobs: dict[str, JobRecord]
    intervals: dict[str, list[Interval]] = field(default_factory=dict)

    @classmethod
    def from_store(cls, store) -> Timeline:
        """Read every job and event of `store` (a SQLiteStore: it needs `jobs()`)."""
        jobs = {record.id: record for record in store.jobs()}
        return cls.from_records(jobs.values(), store.events(limit=2**62))

    @classmethod
    def from_records(cls, jobs: Iterable[JobRecord], events: Sequence[Event]) -> Timeline:
        timeline = cls({record.id: record for record in jobs})
        by_job: dict[str, list[Event]] = defaultdict(list)
        for event in events:
            by_job[event.job_id].append(event)
        for job_id, job_events in by_job.items():
            timeline.intervals[job_id] = running_intervals(job_id, job_events)
        return timeline

    def of_tier(self, tier: str) -> list[JobRecord]:
        return [record for record in self.jobs.values() if record.tier == tier]


def running_intervals(job_id: str, events: Sequence[Event]) -> list[Interval]:
    """Turn one job's events (in the order the store wrote them) into its running intervals."""
    intervals = []
    opened: tuple[float, int] | None = None
    for event in events:
        if opened is not None and event.to_state != RUNNING:
            intervals.append(Interval(job_id, opened[1], opened[0], event.at, event.reason))
            opened = None
        if event.to_state == RUNNING and opened is None:
            opened = (event.at, event.attempt)
    if opened is not None:
        intervals.append(Interval(job_id, opened[1], opened[0], math.inf, None))
    return intervals


def _overlap(start: float, end: float, window: tuple[float, float]) -> float:
    return max(0.0, min(end, window[1]) - max(start, window[0]))


@dataclass
class BulkProgress:
    """Bulk work credited to a window."""

    window_s: float
    credited_bytes: float  # bytes, with straddling jobs counted by their share of running time in the window
    completed_bytes: int  # bytes of jobs that finished inside the window, each counted whole
    completed_jobs: int
    partial_jobs: int  # jobs that straddle an edge of the window
    unfinished_jobs: int  # jobs that ran in the window but had not finished when the store was read, so are not credited
    job_run_s: list[float]  # finished_at - started_at of every job that finished inside the window

    @property
    def mb_per_s(self) -> float:
        return self.credited_bytes / 1e6 / self.window_s if self.window_s > 0 else math.nan


def bulk_progress(timeline: Timeline, window: tuple[float, float], tier: str = BULK) -> BulkProgress:
    """Credit the bytes of succeeded `tier` jobs to `window` by their running time inside it.

    A job's bytes are its result's "input_bytes". Only the attempt that
    succeeded counts (an earlier attempt's work was lost). Progress is assumed
    even over a job's running time; time suspended is excluded.
    """
    progress = BulkProgress(window[1] - window[0], 0.0, 0, 0, 0, 0, [])
    for record in timeline.of_tier(tier):
        intervals = [iv for iv in timeline.intervals.get(record.id, []) if iv.attempt == record.attempt]
        inside = sum(_overlap(iv.start, iv.end, window) for iv in intervals)
        if inside <= 0:
            continue
        if record.state is not JobState.SUCCEEDED or record.result is None:
            progress.unfinished_jobs += 1
            continue
        total = sum(iv.end - iv.start for iv in intervals)
        input_bytes = json.loads(record.result)["input_bytes"]
        progress.credited_bytes += input_bytes * min(1.0, inside / total) if total > 0 else 0.0
        if window[0] <= record.finished_at <= window[1]:
            progress.completed_bytes += input_bytes
            progress.completed_jobs += 1
            progress.job_run_s.append(record.finished_at - record.started_at)
        if inside < total - 1e-9:
            progress.partial_jobs += 1
    return progress


def interactive_window(timeline: Timeline, tier: str = INTERACTIVE) -> tuple[float, float] | None:
    """From the first interactive submission to the last interactive job's end; None without any."""
    records = [r for r in timeline.of_tier(tier) if r.finished_at is not None]
    if not records:
        return None
    return min(r.submitted_at for r in records), max(r.finished_at for r in records)


def queue_waits_s(timeline: Timeline, tier: str = INTERACTIVE) -> list[float]:
    """started_at - submitted_at of every `tier` job that started, in submission order."""
    records = sorted((r for r in timeline.of_tier(tier) if r.started_at is not None), key=lambda r: r.submitted_at)
    return [r.started_at - r.submitted_at for r in records]


@dataclass
class PreemptionDelays:
    """Delays from interactive arrivals to the recorded stop of the background jobs they preempted."""

    # Seconds from an interactive job's submitted_at to the latest "preempted"
    # event among the jobs it preempted. Those are the background jobs running
    # at its arrival whose running interval ended with "preempted" before the
    # next interactive arrival. There is one entry per arrival that found a
    # background job running and was followed by such an event. The supervisor
    # writes the event once it has confirmed the stop, which may be after the
    # interactive job has finished.
    delays_s: list[float]
    arrivals_with_background_running: int
    # Of those arrivals, how many saw no stop recorded before the next arrival.
    arrivals_without_preemption: int


def preemption_delays(timeline: Timeline, interactive_tier: str = INTERACTIVE,
                      background_tiers: Sequence[str] = (BULK,)) -> PreemptionDelays:
    background = sorted(
        (iv for record in timeline.jobs.values() if record.tier in background_tiers
         for iv in timeline.intervals.get(record.id, [])),
        key=lambda iv: iv.start,
    )
    arrivals = sorted((r.submitted_at for r in timeline.of_tier(interactive_tier)))
    result = PreemptionDelays([], 0, 0)
    active: list[Interval] = []
    next_index = 0
    for position, arrived in enumerate(arrivals):
        next_arrival = arrivals[position + 1] if position + 1 < len(arrivals) else math.inf
        while next_index < len(background) and background[next_index].start <= arrived:
            active.append(background[next_index])
            next_index += 1
        active = [iv for iv in active if iv.end > arrived]
        if not active:
            continue
        result.arrivals_with_background_running += 1
        stopped = [iv.end for iv in active if iv.end_reason == PREEMPTED and iv.end < next_arrival]
        if stopped:
            result.delays_s.append(max(stopped) - arrived)
        else:
            result.arrivals_without_preemption += 1
    return result
