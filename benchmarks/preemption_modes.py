"""Cost of yield points and checkpoints, and the time each preemption mode takes to free a slot.

Three measurements, all on this machine:

    should_yield   nanoseconds per `ctx.should_yield()` on a real shared-memory
                   flag array, next to an empty function call as the floor
    checkpoint     latency of `ctx.checkpoint()` inside a job on a real node with
                   a SQLite store: a round trip to the supervisor and one fenced
                   write, p50 and p99
    modes          from the supervisor's decision to the slot being free, for
                   suspend (SIGSTOP sent to stop seen), yield (request to the
                   job's requeue), requeue (request, SIGTERM after a grace of 0,
                   requeue) and cancel (request to the final state); read from
                   the event timestamps in the store

Run from the repository root: `python benchmarks/preemption_modes.py`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
import timeit
from pathlib import Path

from makeway.bench.stats import percentile
from makeway.node.launch import NodeProcess, store_url_for

APP = "makeway.bench.modes:app"
REPO_ROOT = Path(__file__).resolve().parent.parent


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure_should_yield(calls: int) -> dict:
    from makeway.jobs import JobContext
    from makeway.node.flags import WorkerFlags, new_flag_array

    context = JobContext(job_id="bench", name="bench", tier="bulk", attempt=1, metadata={},
                         flags=WorkerFlags(new_flag_array()))
    empty = lambda: None  # noqa: E731
    rounds = 5
    per_call = min(timeit.repeat(context.should_yield, number=calls, repeat=rounds)) / calls
    floor = min(timeit.repeat(empty, number=calls, repeat=rounds)) / calls
    return {"should_yield_ns": per_call * 1e9, "empty_call_ns": floor * 1e9, "calls": calls}


def start_node(workdir: Path, name: str, config: str) -> tuple[NodeProcess, str]:
    store_url = store_url_for(workdir / f"{name}.db")
    config_path = workdir / f"{name}.toml"
    config_path.write_text(config)
    log_file = open(workdir / f"{name}.log", "w")
    node = NodeProcess(APP, store_url, ["--config", str(config_path)], log=log_file, cwd=REPO_ROOT,
                       env={"PYTHONPATH": str(REPO_ROOT)})
    node.wait_ready()
    return node, store_url


def bench_app(store_url: str):
    from makeway.bench.modes import app

    app.use_store(store_url)
    return app


def measure_checkpoints(workdir: Path, count: int, state_bytes: int) -> dict:
    from makeway.bench import modes

    node, store_url = start_node(workdir, "checkpoints", "[node]\nslots = 1\n")
    try:
        bench_app(store_url)
        latencies = modes.checkpoints.submit(count, state_bytes).result(timeout=600)
    finally:
        node.stop()
    return {"count": count, "state_bytes": state_bytes, "p50_ms": percentile(latencies, 0.50),
            "p99_ms": percentile(latencies, 0.99), "max_ms": max(latencies)}


def event_time(store, job_id: str, reason: str, after: float = 0.0) -> float | None:
    for event in store.events(job_id):
        if event.reason == reason and event.at >= after:
            return event.at
    return None


def measure_modes(workdir: Path, repeats: int) -> dict:
    from makeway.bench import modes

    results: dict[str, list[float]] = {"suspend": [], "yield": [], "requeue": [], "cancel": []}
    base = "[node]\nslots = 1\npoll_interval_s = 0.02\n\n[tiers.essential]\nmax_wait_s = 0.05\n"

    # Suspend: the node times the stop itself; read it from each "preempted" event.
    node, store_url = start_node(workdir, "suspend", "[node]\nslots = 1\n\n[tiers.bulk]\nmin_share = 0.0\n")
    try:
        app = bench_app(store_url)
        bulk = modes.spin.submit(3600)
        while bulk.status().value != "running":
            time.sleep(0.01)
        for _ in range(repeats):
            time.sleep(0.1)
            probe = modes.short.options(tier="interactive").submit()
            probe.result(timeout=60)
        for event in app.store.events(bulk.id):
            if event.reason == "preempted" and event.detail:
                results["suspend"].append(float(event.detail.split("after ")[1].split(" ms")[0]))
        bulk.cancel(wait=30)
    finally:
        node.stop()

    # Yield and requeue: an overdue essential job takes the one background slot.
    for mode, job, tier_config in (
        ("yield", lambda: modes.iterate.submit(10**10), 'preemption = ["yield"]\n'),
        ("requeue", lambda: modes.spin.submit(3600), 'preemption = ["requeue"]\nrequeue_grace_s = 0.0\n'),
    ):
        node, store_url = start_node(workdir, mode, base + "\n[tiers.bulk]\n" + tier_config)
        try:
            app = bench_app(store_url)
            bulk = job()
            for _ in range(repeats):
                while app.store.get(bulk.id).state.value != "running":
                    time.sleep(0.01)
                since = time.time()
                modes.short.submit().result(timeout=60)
                asked = event_time(app.store, bulk.id, f"{mode}_requested", since)
                freed = event_time(app.store, bulk.id, "yielded" if mode == "yield" else "requeued", since)
                if asked is not None and freed is not None:
                    results[mode].append(1000 * (freed - asked))
            bulk.cancel(wait=30)
        finally:
            node.stop()

    # Cancel: a job without yield points; SIGTERM after the default grace stops it.
    node, store_url = start_node(workdir, "cancel", "[node]\nslots = 1\n\n[jobs]\ncancel_grace_s = 0.0\n")
    try:
        app = bench_app(store_url)
        for _ in range(repeats):
            bulk = modes.spin.submit(3600)
            while bulk.status().value != "running":
                time.sleep(0.01)
            bulk.cancel(wait=30)
            asked = event_time(app.store, bulk.id, "stop_requested")
            record = app.store.get(bulk.id)
            if asked is not None and record.finished_at is not None:
                results["cancel"].append(1000 * (record.finished_at - asked))
    finally:
        node.stop()

    return {mode: {"samples": len(values), "p50_ms": percentile(values, 0.50) if values else None,
                   "p99_ms": percentile(values, 0.99) if values else None} for mode, values in results.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--calls", type=int, default=1_000_000, help="should_yield calls per timing round")
    parser.add_argument("--checkpoints", type=int, default=2000, help="checkpoints in the checkpoint job")
    parser.add_argument("--state-bytes", type=int, default=200, help="size of each checkpoint's state")
    parser.add_argument("--repeats", type=int, default=30, help="preemptions measured per mode")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results",
                        help="directory for the JSON results")
    args = parser.parse_args()

    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
              "command": " ".join(sys.argv)}
    log("should_yield")
    report["should_yield"] = measure_should_yield(args.calls)
    with tempfile.TemporaryDirectory(prefix="makeway-modes-") as directory:
        workdir = Path(directory)
        log("checkpoint latency")
        report["checkpoint"] = measure_checkpoints(workdir, args.checkpoints, args.state_bytes)
        log("decision to free slot, per mode")
        report["modes"] = measure_modes(workdir, args.repeats)

    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"preemption-modes-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))

    should = report["should_yield"]
    print(f"should_yield: {should['should_yield_ns']:.0f} ns per call (empty call {should['empty_call_ns']:.0f} ns)")
    checkpoint = report["checkpoint"]
    print(f"checkpoint on SQLite ({checkpoint['state_bytes']} B state, {checkpoint['count']} calls): "
          f"p50 {checkpoint['p50_ms']:.2f} ms, p99 {checkpoint['p99_ms']:.2f} ms")
    print()
    print("| mode | what is timed | samples | p50 ms | p99 ms |")
    print("| --- | --- | ---: | ---: | ---: |")
    what = {"suspend": "SIGSTOP sent to stop seen", "yield": "yield request to requeue",
            "requeue": "request, SIGTERM at once, requeue", "cancel": "stop request to cancelled"}
    for mode, figures in report["modes"].items():
        p50 = "n/a" if figures["p50_ms"] is None else f"{figures['p50_ms']:.2f}"
        p99 = "n/a" if figures["p99_ms"] is None else f"{figures['p99_ms']:.2f}"
        print(f"| {mode} | {what[mode]} | {figures['samples']} | {p50} | {p99} |")
    print(f"\nraw results: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    multiprocessing.set_start_method("spawn", force=True)
    sys.exit(main())
