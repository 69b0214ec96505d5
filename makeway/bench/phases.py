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

from makeway.demo.jobs import app, compress, stream_memory
from makeway.node.launch import NodeProcess, store_url_for
from makeway.store import JobState

DEMO_APP = "makeway.demo.jobs:app"


@dataclass
class BulkLoad:
    """Which bulk job keeps the background pool busy, and with what input."""

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
) -> PhaseResult:
    """Start a node on a fresh store, load it, run the client for `duration_s`, and measure."""
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
            client = subprocess.Popen([sys.executable, "-m", "makeway.demo.client", url, str(rate_per_s),
                                       str(duration_s), str(out_file), str(inputs_file)])
        while (client.poll() is None) if client else (time.time() - started_at < duration_s):
            if spec.bulk is not None:
                submitted = _top_up(spec.bulk, submitted, want_queued=2 * slots)
            if on_tick:
                on_tick(time.time() - started_at, _progress(started_at))
            time.sleep(0.25)
        ended_at = time.time()

        result = _measure(spec.name, started_at, ended_at, out_file if client else None)
        for record in app.store.jobs(state=JobState.QUEUED):
            app.handle(record.id).cancel()
        node.stop()
    app.close()
    return result


def _top_up(bulk: BulkLoad, submitted: int, want_queued: int) -> int:
    queued = sum(n for (tier, state), n in app.store.counts().items() if tier == "bulk" and state == "queued")
    missing = want_queued - queued
    if missing > 0:
        app.submit_many([bulk.prepare(submitted + index) for index in range(missing)])
        submitted += missing
    return submitted


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
