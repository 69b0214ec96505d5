"""Interactive latency and bulk throughput under several preemption policies, side by side.

For each bulk kind (lzma "compress" jobs, memory-bound "stream_memory" jobs)
and each repeat, this script runs these phases on the demo's jobs, each on a
fresh node and store:

    interactive alone   the interactive client without bulk load (latency baseline)
    bulk alone          bulk load without the client (throughput baseline)
    default             bulk load and client, tiers, suspend all, background under SCHED_IDLE at nice 19,
                        supervisor and interactive workers at nice -5
    as-needed           bulk load and client, --suspend as-needed
    nice only           bulk load and client, --suspend off, node at nice 0 (OS priority of
                        the background alone)
    plain pool          bulk load and client, --scheduling fifo (one worker per core,
                        no tiers, no preemption, no OS priority)

and reports, for each loaded phase, the interactive p99 as a ratio to the
interactive-alone p99 of the same kind and repeat, and the bulk throughput as
a fraction of the bulk-alone throughput of the same kind and repeat. Each
repeat also measures the submit-to-start latency of interactive jobs on an
idle node.

The Markdown table goes to stdout and, with the raw JSON, under --out.
Progress goes to stderr. See benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path

from makeway.bench.phases import BulkLoad, PhaseSpec, measure_start_latency, run_phase
from makeway.bench.stats import percentile, summarize_ms
from makeway.bench.timeline import Timeline, bulk_progress, interactive_window, preemption_delays, queue_waits_s
from makeway.demo.corpus import interactive_inputs, stdlib_sources
from makeway.demo.jobs import compress, stream_memory
from makeway.store import open_store

KINDS = ("compress", "stream_memory")
# Name shown in the report, and the node options that select the policy. The
# options are spelled out even where they are the defaults, so a makeway.toml
# cannot change what a phase measures.
# "nice only" keeps the node at the priority it inherits (nice 0), as when an
# application runs its bulk work under plain `nice`.
POLICIES: dict[str, tuple[str, list[str]]] = {
    "default": ("default", ["--scheduling", "tiers", "--suspend", "all", "--node-nice=-5"]),
    "as-needed": ("as-needed", ["--scheduling", "tiers", "--suspend", "as-needed", "--node-nice=-5"]),
    "nice-only": ("nice only", ["--scheduling", "tiers", "--suspend", "off", "--node-nice=inherit"]),
    "plain-pool": ("plain pool", ["--scheduling", "fifo"]),
}
BASELINE_NODE_ARGS = POLICIES["default"][1]
INTERACTIVE_ALONE = "interactive alone"
BULK_ALONE = "bulk alone"
START_LATENCY_TARGET_MS = 5.0
LZMA_PRESET = 9  # the demo's compress job adds PRESET_EXTREME
# Seconds per phase beyond its measured window: node start, 1 s of bulk
# warm-up, drain and node stop. Used only for the run time estimate.
PHASE_OVERHEAD_S = 6.0
START_LATENCY_S_PER_JOB = 0.01


# -- workload -----------------------------------------------------------------

def mixed_order(sources: list[Path]) -> list[Path]:
    """Return the files in a fixed pseudo-random order, so that every batch mixes small and large files."""
    return sorted(sources, key=lambda path: zlib.crc32(path.name.encode() + str(path.stat().st_size).encode()))


def mixed_batches(sources: list[Path], batch_bytes: int) -> list[list[str]]:
    """Group the files into batches of about `batch_bytes`, in mixed order. The short remainder is dropped."""
    batches, current, size = [], [], 0
    for path in mixed_order(sources):
        current.append(str(path))
        size += path.stat().st_size
        if size >= batch_bytes:
            batches.append(current)
            current, size = [], 0
    return batches


def _fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Return the least-squares intercept and slope of y over x."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - slope * mean_x, slope


def _cpu_seconds(call) -> float:
    started = time.process_time()
    call()
    return time.process_time() - started


def calibrate_compress(sources: list[Path], job_s: float) -> dict:
    """Pick the batch size that takes about `job_s` of CPU to compress, from a fit over a few sizes."""
    points = []
    for size in (250_000, 1_000_000, 250_000, 1_000_000):
        batch = mixed_batches(sources, size)[len(points)]
        data_bytes = sum(os.path.getsize(path) for path in batch)
        points.append((data_bytes, _cpu_seconds(lambda: compress(batch, LZMA_PRESET))))
    fixed_s, s_per_byte = _fit_line(points)
    batch_bytes = int(max(100_000, (job_s - max(fixed_s, 0.0)) / s_per_byte))
    batches = mixed_batches(sources, batch_bytes)
    return {"batch_bytes": batch_bytes, "batches": len(batches), "fixed_s": fixed_s,
            "mb_per_cpu_s": 1e-6 / s_per_byte, "expected_job_s": max(fixed_s, 0.0) + batch_bytes * s_per_byte,
            "points": points, "_batches": batches}


def calibrate_stream(buffer_mb: int, job_s: float) -> dict:
    """Pick the number of passes over a `buffer_mb` buffer that takes about `job_s` of CPU."""
    # One unmeasured call first, then the fastest of three runs per point. A
    # slow 2-pass point flattens the fitted slope: a least-squares fit over
    # single runs once gave jobs of 24 s instead of 0.7 s.
    stream_memory(buffer_mb, 1)
    points = [(passes, _cpu_seconds(lambda: stream_memory(buffer_mb, passes))) for passes in (2, 12, 2, 12, 2, 12)]
    fixed_s, s_per_pass = _fit_fastest(points)
    passes = max(1, round((job_s - max(fixed_s, 0.0)) / s_per_pass))
    return {"buffer_mb": buffer_mb, "passes": passes, "fixed_s": fixed_s,
            "mb_per_cpu_s": 2 * buffer_mb * 1.048576 / s_per_pass,
            "expected_job_s": max(fixed_s, 0.0) + passes * s_per_pass, "points": points}


def _fit_fastest(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Return the intercept and slope through the fastest y at each of two x values.

    The fastest of repeated runs is the least disturbed by other work. A
    slope that is not positive means the measurements are unusable.
    """
    fastest: dict[float, float] = {}
    for x, y in points:
        fastest[x] = min(y, fastest.get(x, math.inf))
    (x0, y0), (x1, y1) = sorted(fastest.items())
    slope = (y1 - y0) / (x1 - x0)
    if slope <= 0:
        raise SystemExit(f"calibration failed: CPU time did not grow with the work ({points}); run again on a quieter machine")
    return y0 - slope * x0, slope


def bulk_load(kind: str, calibration: dict) -> BulkLoad:
    if kind == "compress":
        return BulkLoad("compress", batches=calibration["_batches"])
    return BulkLoad("stream_memory", buffer_mb=calibration["buffer_mb"], passes=calibration["passes"])


# -- one phase ----------------------------------------------------------------

def _summary_ms(values_s: list[float]) -> dict:
    return {key: (None if math.isnan(value) else value) for key, value in summarize_ms(values_s).items()}


def analyse_phase(result, spec: PhaseSpec) -> dict:
    """Read the phase's store and compute its figures."""
    store = open_store(result.store_url)
    try:
        timeline = Timeline.from_store(store)
    finally:
        store.close()
    record: dict = {
        "phase": spec.name,
        "node_args": list(spec.node_args),
        "samples": len(result.latencies_s),
        "failed": result.failed,
        "latency_ms": _summary_ms(result.latencies_s) if spec.interactive else None,
        "queue_wait_ms": _summary_ms(queue_waits_s(timeline)) if spec.interactive else None,
        "suspends": result.suspends,
        "latencies_s": result.latencies_s,
    }
    window = interactive_window(timeline) if spec.interactive else (result.started_at, result.ended_at)
    if spec.bulk is not None and window is not None:
        progress = bulk_progress(timeline, window)
        record["bulk"] = {
            "window_s": progress.window_s,
            "mb_per_s": progress.mb_per_s,
            "credited_bytes": progress.credited_bytes,
            "completed_jobs": progress.completed_jobs,
            "completed_bytes": progress.completed_bytes,
            "completed_mb_per_s": progress.completed_bytes / 1e6 / progress.window_s,
            "partial_jobs": progress.partial_jobs,
            "unfinished_jobs": progress.unfinished_jobs,
            "job_run_s_p50": statistics.median(progress.job_run_s) if progress.job_run_s else None,
        }
    if spec.bulk is not None and spec.interactive:
        delays = preemption_delays(timeline)
        record["preemption"] = {
            "arrivals_with_bulk_running": delays.arrivals_with_background_running,
            "arrivals_without_preemption": delays.arrivals_without_preemption,
            "measured": len(delays.delays_s),
            "stop_recorded_fraction": (len(delays.delays_s) / delays.arrivals_with_background_running
                                       if delays.arrivals_with_background_running else None),
            "delay_ms": {
                "p50": percentile(delays.delays_s, 0.50) * 1000 if delays.delays_s else None,
                "p99": percentile(delays.delays_s, 0.99) * 1000 if delays.delays_s else None,
                "max": max(delays.delays_s) * 1000 if delays.delays_s else None,
            },
        }
    return record


# -- aggregation and report ---------------------------------------------------

def _spread(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _pooled_p99_ratio(phases: list[dict], alone_phases: list[dict]) -> float | None:
    """Return the p99 of all repeats' samples of a phase over the p99 of all interactive-alone samples.

    One p99 of 1000 samples rests on its 10 slowest samples. Pooling the
    repeats puts it on 10 times the repeat count, so one bad minute of the machine
    moves it less than it moves the per-repeat ratios.
    """
    loaded = [value for phase in phases if phase["latency_ms"] for value in phase["latencies_s"]]
    alone = [value for phase in alone_phases for value in phase["latencies_s"]]
    if not loaded or not alone:
        return None
    return percentile(loaded, 0.99) / percentile(alone, 0.99)


def aggregate(phases: list[dict], kinds: list[str], policy_names: list[str]) -> dict:
    """Compute per kind and phase the ratios of each repeat, then their median and min..max over repeats."""
    by_key = {(p["repeat"], p["kind"], p["phase"]): p for p in phases}
    repeats = sorted({p["repeat"] for p in phases})
    summary: dict = {}
    for kind in kinds:
        rows = {}
        for name in [INTERACTIVE_ALONE, BULK_ALONE, *policy_names]:
            per_repeat = [by_key[(r, kind, name)] for r in repeats if (r, kind, name) in by_key]
            alone_phases = [by_key[(r, kind, INTERACTIVE_ALONE)] for r in repeats
                            if (r, kind, INTERACTIVE_ALONE) in by_key]
            if not per_repeat:
                continue
            p99_ratios, fractions = [], []
            for phase in per_repeat:
                alone = by_key.get((phase["repeat"], kind, INTERACTIVE_ALONE))
                bulk_alone = by_key.get((phase["repeat"], kind, BULK_ALONE))
                if phase["latency_ms"] and alone and alone["latency_ms"] and alone["latency_ms"]["p99"]:
                    p99_ratios.append(phase["latency_ms"]["p99"] / alone["latency_ms"]["p99"])
                if phase.get("bulk") and bulk_alone and bulk_alone.get("bulk") and bulk_alone["bulk"]["mb_per_s"]:
                    fractions.append(phase["bulk"]["mb_per_s"] / bulk_alone["bulk"]["mb_per_s"])
            rows[name] = {
                "repeats": len(per_repeat),
                "p99_ratio": _spread(p99_ratios),
                "pooled_p99_ratio": _pooled_p99_ratio(per_repeat, alone_phases),
                "bulk_fraction": _spread(fractions),
                "latency_ms": {key: _spread([p["latency_ms"][key] for p in per_repeat if p["latency_ms"]])
                               for key in ("p50", "p95", "p99", "max")},
                "bulk_mb_per_s": _spread([p["bulk"]["mb_per_s"] for p in per_repeat if p.get("bulk")]),
                "bulk_job_s": _spread([p["bulk"]["job_run_s_p50"] for p in per_repeat if p.get("bulk")]),
                "suspends": _spread([p["suspends"] for p in per_repeat]),
                "preemption_delay_ms": {
                    key: _spread([p["preemption"]["delay_ms"][key] for p in per_repeat if p.get("preemption")])
                    for key in ("p50", "p99")
                },
                "stop_recorded_fraction": _spread([p["preemption"]["stop_recorded_fraction"] for p in per_repeat
                                                   if p.get("preemption")]),
            }
        summary[kind] = rows
    return summary


def _fmt(spread: dict | None, pattern: str, percent: bool = False, show_range: bool = True) -> str:
    if spread is None:
        return "-"
    scale = 100 if percent else 1
    unit = "%" if percent else ""
    text = f"{spread['median'] * scale:{pattern}}{unit}"
    if show_range and spread["n"] > 1:
        text += f" ({spread['min'] * scale:{pattern}}..{spread['max'] * scale:{pattern}}{unit})"
    return text


def _fmt_value(value: float | None, pattern: str) -> str:
    return "-" if value is None else f"{value:{pattern}}"


def markdown_report(data: dict) -> str:
    config, summary = data["config"], data["summary"]
    lines = [
        "# Interactive latency under bulk load",
        "",
        f"Command: `{config['command']}`",
        "",
        f"Machine: {config['machine']['cores']} cores, {config['machine']['cpu']}, {config['machine']['platform']}, "
        f"Python {config['machine']['python']}. Started {config['started']}, took {data['elapsed_s'] / 60:.1f} min; "
        f"load average {config['machine']['loadavg_start'][0]:.2f} at the start, "
        f"{data['loadavg_end'][0]:.2f} at the end.",
        "",
        f"Interactive client: {config['rate']:g} jobs/s for {config['window_s']:g} s per phase "
        f"({config['samples']} samples), {config['repeats']} repeat(s). Figures are medians over repeats, "
        "with the spread (min..max) when there are several. Latency is from submission to result as the client "
        "sees it. \"p99 / alone\" divides by the interactive-alone p99 of the same kind and repeat; "
        "\"pooled p99 / alone\" divides the p99 of all repeats' samples together by that of all interactive-alone "
        "samples; "
        "\"bulk / alone\" divides bulk throughput by the bulk-alone throughput of the same kind and repeat.",
        "",
    ]
    for kind, rows in summary.items():
        calibration = config["calibration"][kind]
        if kind == "compress":
            detail = (f"lzma preset {LZMA_PRESET}e on mixed standard-library files, batches of about "
                      f"{calibration['batch_bytes'] / 1e6:.2f} MB, calibrated to {calibration['expected_job_s']:.2f} s "
                      "of CPU each")
        else:
            detail = (f"{calibration['passes']} passes over a {calibration['buffer_mb']} MB buffer, calibrated to "
                      f"{calibration['expected_job_s']:.2f} s of CPU each")
        lines += [
            f"## Bulk kind: {kind}",
            "",
            f"{detail}.",
            "",
            "| phase | p99 / alone | pooled p99 / alone | p50 ms | p95 ms | p99 ms | max ms | bulk / alone | bulk MB/s "
            "| bulk job s | preempted after p50 / p99 ms | arrivals that preempted | suspends |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, row in rows.items():
            latency = row["latency_ms"]
            delay = row["preemption_delay_ms"]
            stopped = "-" if delay["p50"] is None else f"{_fmt(delay['p50'], '.2f', show_range=False)} / {_fmt(delay['p99'], '.2f')}"
            lines.append(
                f"| {name} | {_fmt(row['p99_ratio'], '.2f')} | {_fmt_value(row.get('pooled_p99_ratio'), '.2f')} "
                f"| {_fmt(latency['p50'], '.1f', show_range=False)} "
                f"| {_fmt(latency['p95'], '.1f', show_range=False)} | {_fmt(latency['p99'], '.1f')} "
                f"| {_fmt(latency['max'], '.0f', show_range=False)} | {_fmt(row['bulk_fraction'], '.0f', percent=True)} "
                f"| {_fmt(row['bulk_mb_per_s'], '.2f', show_range=False)} | {_fmt(row['bulk_job_s'], '.2f', show_range=False)} "
                f"| {stopped} | {_fmt(row['stop_recorded_fraction'], '.0f', percent=True, show_range=False)} "
                f"| {_fmt(row['suspends'], '.0f', show_range=False)} |"
            )
        lines.append("")
    start = data["start_latency_summary"]
    if start:
        met = start["p99_ms"]["median"] < START_LATENCY_TARGET_MS
        lines += [
            "## Submit-to-start latency on an idle node",
            "",
            f"jobs.started_at - jobs.submitted_at of {config['start_samples']} interactive jobs submitted one at a "
            f"time, each after the previous result, per repeat (after {config['start_warmup']} warm-up jobs).",
            "",
            "| p50 ms | p99 ms | max ms | round trip p50 ms | target p99 |",
            "| --- | --- | --- | --- | --- |",
            f"| {_fmt(start['p50_ms'], '.2f')} | {_fmt(start['p99_ms'], '.2f')} | {_fmt(start['max_ms'], '.1f')} "
            f"| {_fmt(start['round_trip_p50_ms'], '.2f')} | < {START_LATENCY_TARGET_MS:g} ms: {'met' if met else 'not met'} |",
            "",
        ]
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------

def _csv_choices(values: list[str], allowed: tuple[str, ...], option: str) -> list[str]:
    chosen = []
    for value in values:
        for item in value.replace(",", " ").split():
            item = item.replace("_", "-") if option == "--policies" else item.replace("-", "_")
            if item not in allowed:
                raise SystemExit(f"{option}: {item!r} is unknown; choose from {', '.join(allowed)}")
            if item not in chosen:
                chosen.append(item)
    return chosen


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults in --help, except for options without one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure interactive latency and bulk throughput of the demo's jobs under several "
                    "preemption policies, side by side, and report ratios to the unloaded baselines.",
        formatter_class=_HelpFormatter,
    )

    parser.add_argument("--samples", type=int, default=2000, help="interactive samples per phase")
    parser.add_argument("--rate", type=float, default=10.0, help="interactive jobs submitted per second")
    parser.add_argument("--repeats", type=int, default=3, help="times to run the whole set of phases")
    parser.add_argument("--kinds", nargs="+", metavar="KIND",
                        help=f"bulk kinds, from: {', '.join(KINDS)}, space- or comma-separated (default: all)")
    parser.add_argument("--policies", nargs="+", metavar="POLICY",
                        help=f"policies under load, from: {', '.join(POLICIES)}, space- or comma-separated "
                             "(default: all)")

    parser.add_argument("--out", default="benchmarks/results", help="directory for the JSON results and the Markdown table")
    parser.add_argument("--job-seconds", type=float, default=0.7, help="CPU seconds per bulk job the calibration aims at")
    parser.add_argument("--stream-buffer-mb", type=int, default=64, help="buffer size of the stream_memory jobs")
    parser.add_argument("--start-samples", type=int, default=1000,
                        help="interactive jobs per repeat for the idle submit-to-start latency (0 skips it)")
    parser.add_argument("--drain-s", type=float, default=30.0,
                        help="seconds to let bulk jobs that straddle the end of a window finish, so they are credited")
    parser.add_argument("--workdir", help="keep stores and node logs here (default: a temporary directory)")
    parser.add_argument("--from-json", metavar="FILE",
                        help="run nothing: print the table of an earlier run's JSON (also of a run that was cut short)")

    args = parser.parse_args(argv)
    args.kinds = _csv_choices(args.kinds or list(KINDS), KINDS, "--kinds")
    args.policies = _csv_choices(args.policies or list(POLICIES), tuple(POLICIES), "--policies")

    if args.samples < 10:
        parser.error("--samples must be at least 10")
    if not 0 < args.rate <= 200:
        parser.error("--rate must be above 0 and at most 200 jobs per second")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if not 0.05 <= args.job_seconds <= 10:
        parser.error("--job-seconds must be from 0.05 to 10")
    if 0 < args.start_samples < 1000:
        print(f"note: --start-samples {args.start_samples} is below 1000; the p99 rests on few jobs", file=sys.stderr)
    return args


def estimate_s(args: argparse.Namespace) -> float:
    window_s = args.samples / args.rate
    phases = len(args.kinds) * (2 + len(args.policies))
    start = (args.start_samples * START_LATENCY_S_PER_JOB + PHASE_OVERHEAD_S) if args.start_samples else 0.0
    return args.repeats * (phases * (window_s + PHASE_OVERHEAD_S) + start)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def summarize(data: dict) -> None:
    """Add the summaries over repeats to `data`, computed from its phases and start latency entries."""
    config = data["config"]
    data["summary"] = aggregate(data["phases"], config["kinds"], [POLICIES[key][0] for key in config["policies"]])
    data["start_latency_summary"] = {
        "p50_ms": _spread([s["start_ms"]["p50"] for s in data["start_latency"]]),
        "p99_ms": _spread([s["start_ms"]["p99"] for s in data["start_latency"]]),
        "max_ms": _spread([s["start_ms"]["max"] for s in data["start_latency"]]),
        "round_trip_p50_ms": _spread([s["round_trip_ms"]["p50"] for s in data["start_latency"]]),
    } if data["start_latency"] else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        summarize(data)
        if not data.get("complete"):
            print("<!-- from a run that did not complete: some phases or repeats are missing -->")
        print(markdown_report(data))
        return 0
    for name in ("MAKEWAY_CONFIG", "MAKEWAY_STORE"):
        if os.environ.get(name):
            log(f"warning: ${name} is set; the nodes read it, so figures may not reflect the defaults")
    if Path("makeway.toml").is_file():
        log("warning: ./makeway.toml exists; the nodes read it, so figures may not reflect the defaults")

    cores = os.cpu_count() or 1
    window_s = args.samples / args.rate
    # The client submits int(duration * rate) jobs; half an interval more keeps
    # rounding from losing the last one.
    client_s = (args.samples + 0.5) / args.rate
    sources = stdlib_sources()
    inputs = interactive_inputs(sources)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path, md_path = out_dir / f"interactive-latency-{stamp}.json", out_dir / f"interactive-latency-{stamp}.md"
    log(f"{len(args.kinds)} kind(s) x {2 + len(args.policies)} phases x {args.repeats} repeat(s), "
        f"{window_s:g} s per phase; expect about {estimate_s(args) / 60:.0f} min")

    log("calibrating bulk jobs")
    calibration = {}
    if "compress" in args.kinds:
        calibration["compress"] = calibrate_compress(sources, args.job_seconds)
    if "stream_memory" in args.kinds:
        calibration["stream_memory"] = calibrate_stream(args.stream_buffer_mb, args.job_seconds)
    for kind, values in calibration.items():
        log(f"  {kind}: {', '.join(f'{k}={v:.3g}' for k, v in values.items() if isinstance(v, (int, float)))}")

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU") \
        if Path("/proc/cpuinfo").is_file() else (platform.processor() or "unknown CPU")
    config = {
        "command": shlex.join(["python", "benchmarks/interactive_latency.py", *(sys.argv[1:] if argv is None else argv)]),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "samples": args.samples, "rate": args.rate, "window_s": window_s, "repeats": args.repeats,
        "kinds": args.kinds, "policies": args.policies, "slots": cores,
        "start_samples": args.start_samples, "start_warmup": 20,
        "calibration": {kind: {k: v for k, v in values.items() if not k.startswith("_")}
                        for kind, values in calibration.items()},
        "policy_node_args": {POLICIES[key][0]: POLICIES[key][1] for key in args.policies},
        "machine": {"cores": cores, "cpu": cpu, "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_start": list(os.getloadavg())},
    }
    data: dict = {"config": config, "phases": [], "start_latency": [], "complete": False}
    began = time.monotonic()

    def save() -> None:
        data["elapsed_s"] = time.monotonic() - began
        data["loadavg_end"] = list(os.getloadavg())
        json_path.write_text(json.dumps(data, indent=1))

    with tempfile.TemporaryDirectory(prefix="makeway-bench-") as temporary:
        root = Path(args.workdir) if args.workdir else Path(temporary)
        for repeat in range(args.repeats):
            repeat_dir = root / f"repeat-{repeat + 1}"
            repeat_dir.mkdir(parents=True, exist_ok=True)
            if args.start_samples:
                log(f"repeat {repeat + 1}/{args.repeats}: submit-to-start latency, {args.start_samples} jobs on an idle node")
                start = measure_start_latency(repeat_dir, inputs, args.start_samples, BASELINE_NODE_ARGS,
                                              warmup=config["start_warmup"])
                entry = {"repeat": repeat + 1, "failed": start.failed,
                         "start_ms": _summary_ms(start.start_latencies_s),
                         "round_trip_ms": _summary_ms(start.round_trips_s),
                         "start_latencies_s": start.start_latencies_s}
                data["start_latency"].append(entry)
                log(f"  p50 {entry['start_ms']['p50']:.2f} ms, p99 {entry['start_ms']['p99']:.2f} ms")
                save()
            # Rotate the loaded phases from one repeat to the next, so a slow
            # drift of the machine does not always hit the same policy.
            shift = repeat % len(args.policies)
            rotated = args.policies[shift:] + args.policies[:shift]
            for kind in args.kinds:
                kind_dir = repeat_dir / kind
                kind_dir.mkdir(exist_ok=True)
                bulk = bulk_load(kind, calibration[kind])
                specs = [PhaseSpec(INTERACTIVE_ALONE, node_args=BASELINE_NODE_ARGS),
                         PhaseSpec(BULK_ALONE, node_args=BASELINE_NODE_ARGS, bulk=bulk, interactive=False)]
                specs += [PhaseSpec(POLICIES[key][0], node_args=POLICIES[key][1], bulk=bulk) for key in rotated]
                for spec in specs:
                    log(f"repeat {repeat + 1}/{args.repeats}, {kind}: {spec.name}")
                    phase_began = time.monotonic()
                    result = run_phase(spec, kind_dir, args.rate, client_s, inputs, slots=cores,
                                       drain_bulk_s=args.drain_s)
                    record = {"repeat": repeat + 1, "kind": kind, **analyse_phase(result, spec),
                              "phase_s": time.monotonic() - phase_began}
                    data["phases"].append(record)
                    save()
                    parts = []
                    if record["latency_ms"]:
                        parts.append(f"p99 {record['latency_ms']['p99']:.1f} ms of {record['samples']} samples"
                                     + (f" ({record['failed']} failed)" if record["failed"] else ""))
                    if record.get("bulk"):
                        parts.append(f"bulk {record['bulk']['mb_per_s']:.2f} MB/s over {record['bulk']['completed_jobs']} jobs")
                    if record.get("preemption", {}).get("measured"):
                        parts.append(f"preempted after p99 {record['preemption']['delay_ms']['p99']:.2f} ms")
                    log(f"  {', '.join(parts)} ({record['phase_s']:.0f} s)")
        if args.workdir:
            log(f"stores and node logs are in {root}")

    summarize(data)
    data["complete"] = True
    save()
    report = markdown_report(data)
    md_path.write_text(report + "\n")
    print(report)
    log(f"wrote {md_path} and {json_path} in {data['elapsed_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
