"""`makeway demo`: three phases on real input, then a latency and throughput table."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from makeway.bench.phases import BulkLoad, PhaseResult, PhaseSpec, run_phase
from makeway.bench.stats import summarize_ms
from makeway.demo.corpus import bulk_batches, interactive_inputs, stdlib_sources

# About two seconds of lzma CPU per batch, as measured on the development machine (AMD EPYC, 2 cores).
BULK_BATCH_BYTES = 4_000_000


def run_demo(duration_s: float, rate_per_s: float, workdir: str | None, console: Console) -> list[PhaseResult]:
    sources = stdlib_sources()
    inputs = interactive_inputs(sources)
    bulk = BulkLoad("compress", batches=bulk_batches(sources, BULK_BATCH_BYTES))
    slots = os.cpu_count() or 1
    phases = [
        PhaseSpec("interactive alone"),
        PhaseSpec("bulk + makeway", bulk=bulk),
        PhaseSpec("bulk + FIFO pool", node_args=["--scheduling", "fifo"], bulk=bulk),
    ]
    phase_s = duration_s / len(phases)
    console.print(
        f"makeway demo: {len(inputs)} standard-library files for interactive jobs at {rate_per_s:g}/s, "
        f"{len(bulk.batches)} lzma batches of about {BULK_BATCH_BYTES / 1e6:.0f} MB for bulk jobs, {slots} cores."
    )

    with tempfile.TemporaryDirectory(prefix="makeway-demo-") as temporary:
        root = Path(workdir) if workdir else Path(temporary)
        root.mkdir(parents=True, exist_ok=True)
        results = []
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[counts]}"),
                      TimeRemainingColumn(), console=console) as progress:
            for spec in phases:
                task = progress.add_task(spec.name, total=phase_s, counts="starting node")

                def on_tick(elapsed_s: float, counts: dict, task=task) -> None:
                    progress.update(task, completed=min(elapsed_s, phase_s), counts=(
                        f"interactive {counts['interactive_done']}  bulk {counts['bulk_done']}  "
                        f"suspends {counts['suspends']}"))

                result = run_phase(spec, root, rate_per_s, phase_s, inputs, on_tick, slots=slots)
                results.append(result)
                # The last tick comes before the client's final jobs return; show the measured counts.
                progress.update(task, completed=phase_s, counts=(
                    f"interactive {len(result.latencies_s)}  bulk {result.bulk_jobs}  suspends {result.suspends}"))
        console.print(_table(results))
        console.print(_summary(results))
        if workdir:
            console.print(f"Stores and node logs are in {root}")
    return results


def _table(results: list[PhaseResult]) -> Table:
    table = Table(
        title="Interactive latency, submission to result as the client sees it",
        caption="bulk + makeway: default policy (tiers, suspend all, background under SCHED_IDLE at nice 19, "
        "node at nice -5 where permitted). "
        "bulk + FIFO pool: one worker per core, no tiers, no preemption, no OS priority.",
    )
    for column in ("phase", "samples", "p50 ms", "p95 ms", "p99 ms", "max ms", "bulk MB/s", "bulk jobs", "suspends"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for result in results:
        stats = summarize_ms(result.latencies_s)
        table.add_row(
            result.name, str(len(result.latencies_s)) + (f" ({result.failed} failed)" if result.failed else ""),
            *(f"{stats[key]:.1f}" for key in ("p50", "p95", "p99", "max")),
            f"{result.bulk_mb_per_s:.2f}" if result.bulk_jobs else "-",
            str(result.bulk_jobs) if result.bulk_jobs else "-",
            str(result.suspends),
        )
    return table


def _summary(results: list[PhaseResult]) -> str:
    alone, tiered, fifo = (summarize_ms(result.latencies_s)["p99"] for result in results)
    return (
        f"With bulk load, interactive p99 is {tiered / alone:.2f}x its idle value under makeway's default policy "
        f"and {fifo / alone:.2f}x on a plain FIFO pool. Bulk throughput under makeway is "
        f"{results[1].bulk_mb_per_s / results[2].bulk_mb_per_s:.0%} of the plain pool's."
        if results[2].bulk_mb_per_s else "No bulk job finished in the plain pool phase; run longer with --duration."
    )
