"""One measured phase: a node, optional bulk load, and the interactive client beside it.

The demo and the benchmarks both run phases through `run_phase`, so their
figures are measured the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from makeway.demo.jobs import app, compress, file_statistic, stream_memory
from makeway.node.launch import NodeProcess, store_url_for
from makeway.store import JobState

DEMO_APP = "makeway.demo.jobs:app"


@dataclass
class BulkLoad:
    """The bulk job that keeps the background pool busy, and its input."""

    kind: str  # "compress" or "stream_memory"
    batches: Sequence[Sequence[str]] = ()
    buffer_mb: int = 256
    passes: int = 4

    def prepare(self, index: int):
        if self.kind == "compress":
            return compress.prepare(list(self.batches[index % len(self.batches)]))
        return stream_memory.prepare(self.buffer_mb, self.passes)


@dataclass
class PhaseResult:
    name: str
    latencies_s: list[float] = field(default_factory=list)
    failed: int = 0
    window_s: float = 0.0
    bulk_bytes: int = 0
    bulk_jobs: int = 0
    suspends: int = 0
    # Wall-clock bounds of the measured window and the store the phase used,
    # so a caller can analyse the store's timestamps afterwards.
    started_at: float = 0.0
    ended_at: float = 0.0
    store_url: str = ""

    @property
    def bulk_mb_per_s(self) -> float:
        return self.bulk_bytes / 1e6 / self.window_s if self.window_s else 0.0


@dataclass
class PhaseSpec:
    name: str
    node_args: Sequence[str] = ()
    bulk: BulkLoad | None = None
    interactive: bool = True


def run_phase(
    spec: PhaseSpec,
    workdir: Path,
    rate_per_s: float,
    duration_s: float,
    inputs: Sequence[str],
    on_tick: Callable[[float, dict], None] | None = None,
    slots: int = 2,
    *,
    drain_bulk_s: float = 0.0,
) -> PhaseResult:
    """Start a node on a fresh store, load it, run the client for `duration_s`, and measure.

    With `drain_bulk_s` > 0, the bulk jobs that started before the window ended
    are allowed up to that many seconds to finish before the node stops, so
    that their progress inside the window can be credited from the store's
    timestamps (see makeway.bench.timeline). The store is kept in `workdir`.
    """
    slug = spec.name.lower().replace(" ", "-").replace(",", "")
    db = workdir / f"{slug}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    url = store_url_for(db)
    inputs_file = workdir / "interactive-inputs.json"
    inputs_file.write_text(json.dumps(list(inputs)))
    out_file = workdir / f"{slug}-client.json"

    with open(workdir / f"{slug}-node.log", "w") as log, NodeProcess(DEMO_APP, url, spec.node_args, log=log) as node:
        node.wait_ready()
        app.use_store(url)
        submitted = 0
        if spec.bulk is not None:
            submitted = _top_up(spec.bulk, submitted, want_queued=2 * slots)
            time.sleep(1.0)  # let the bulk jobs saturate the cores first

        started_at = time.time()
        client = None
        if spec.interactive:
            client = subprocess.Popen([sys.executable, "-P", "-m", "makeway.demo.client", url, str(rate_per_s),
                                       str(duration_s), str(out_file), str(inputs_file)])
        while (client.poll() is None) if client else (time.time() - started_at < duration_s):
            if spec.bulk is not None:
                submitted = _top_up(spec.bulk, submitted, want_queued=2 * slots)
            if on_tick:
                on_tick(time.time() - started_at, _progress(started_at))
            time.sleep(0.25)
        ended_at = time.time()

        result = _measure(spec.name, started_at, ended_at, out_file if client else None)
        result.started_at, result.ended_at, result.store_url = started_at, ended_at, url
        for record in app.store.jobs(state=JobState.QUEUED):
            app.handle(record.id).cancel()
        if drain_bulk_s > 0:
            _wait_for_bulk(ended_at, drain_bulk_s)
        node.stop()
    app.close()
    return result


@dataclass
class StartLatencyResult:
    """Submit-to-start latencies of interactive jobs on an idle node, from the store's timestamps."""

    start_latencies_s: list[float]  # jobs.started_at - jobs.submitted_at, in submission order
    round_trips_s: list[float]  # submission to result, as the submitting process saw it
    failed: int = 0


def measure_start_latency(workdir: Path, inputs: Sequence[str], count: int, node_args: Sequence[str] = (),
                          warmup: int = 20, name: str = "start latency") -> StartLatencyResult:
    """Submit `count` interactive jobs one at a time to an idle node, each after the previous result.

    The first `warmup` jobs also run but are not counted, so that first-call
    costs in the workers and the store stay out of the figures.
    """
    slug = name.lower().replace(" ", "-")
    db = workdir / f"{slug}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    url = store_url_for(db)
    round_trips, failed, measured_ids = [], 0, []
    with open(workdir / f"{slug}-node.log", "w") as log, NodeProcess(DEMO_APP, url, node_args, log=log) as node:
        node.wait_ready()
        app.use_store(url)
        for index in range(warmup + count):
            started = time.perf_counter()
            handle = file_statistic.submit(inputs[index % len(inputs)])
            try:
                handle.result(timeout=30.0)
            except Exception:
                failed += 1
                continue
            if index >= warmup:
                round_trips.append(time.perf_counter() - started)
                measured_ids.append(handle.id)
        records = {record.id: record for record in app.store.jobs(name=file_statistic.name)}
        node.stop()
    app.close()
    latencies = [records[job_id].started_at - records[job_id].submitted_at for job_id in measured_ids]
    return StartLatencyResult(latencies, round_trips, failed)


def _top_up(bulk: BulkLoad, submitted: int, want_queued: int) -> int:
    queued = sum(n for (tier, state), n in app.store.counts().items() if tier == "bulk" and state == "queued")
    missing = want_queued - queued
    if missing > 0:
        app.submit_many([bulk.prepare(submitted + index) for index in range(missing)])
        submitted += missing
    return submitted


def _wait_for_bulk(started_before: float, timeout_s: float) -> None:
    """Wait until no bulk job that started before `started_before` is still running or suspended."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(record.tier == "bulk" and (record.started_at or 0) < started_before
                   for record in app.store.active_jobs()):
            return
        time.sleep(0.05)


def _progress(since: float) -> dict:
    counts = app.store.counts()
    return {
        "interactive_done": counts.get(("interactive", "succeeded"), 0),
        "bulk_done": counts.get(("bulk", "succeeded"), 0),
        "suspends": app.store.count_events("preempted", since),
    }


def _measure(name: str, started_at: float, ended_at: float, client_file: Path | None) -> PhaseResult:
    result = PhaseResult(name=name, window_s=ended_at - started_at)
    if client_file is not None:
        data = json.loads(client_file.read_text())
        result.latencies_s = data["latency_s"]
        result.failed = data["failed"]
    for record in app.store.jobs(state=JobState.SUCCEEDED):
        if record.tier == "bulk" and started_at <= (record.finished_at or 0) <= ended_at:
            result.bulk_bytes += json.loads(record.result)["input_bytes"]
            result.bulk_jobs += 1
    result.suspends = app.store.count_events("preempted", started_at)
    return result
