"""The cost of the node's Prometheus metrics: one observation, and the interactive p99 with metrics on and off.

Part 1 times single calls on the supervisor's own metric objects (a
histogram observation with its label lookup, a counter increment) and the
same calls with `node.metrics = false`.

Part 2 runs the demo's interactive client against a node under bulk load
(the default policy, lzma bulk jobs as in interactive_latency.py). Phases
with `node.metrics` on and off alternate within one run. The report gives
the p99 of each setting over all its samples, and their ratio.

Progress goes to stderr; the Markdown report goes to stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from makeway.bench.phases import PhaseSpec, run_phase
from makeway.bench.stats import percentile
from makeway.demo.corpus import interactive_inputs, stdlib_sources
from makeway.observe.metrics import NodeMetrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
import interactive_latency  # noqa: E402 - the bulk load and its calibration are shared with that benchmark

CALLS = 200_000
ROUNDS = 5


def ns_per_call(call) -> float:
    """Return the median over ROUNDS of the nanoseconds per call of `call`, run CALLS times per round."""
    rounds = []
    for _ in range(ROUNDS):
        started = time.perf_counter_ns()
        for _ in range(CALLS):
            call()
        rounds.append((time.perf_counter_ns() - started) / CALLS)
    return statistics.median(rounds)


def microbenchmark() -> list[tuple[str, float, float]]:
    on, off = NodeMetrics(enabled=True), NodeMetrics(enabled=False)
    cases = [
        ("histogram observe (labels + observe)", lambda m: m.latency.labels("interactive").observe(0.0021)),
        ("counter increment (labels + inc)", lambda m: m.jobs_finished.labels("interactive", "succeeded").inc()),
    ]
    rows = []
    for name, call in cases:
        rows.append((name, ns_per_call(lambda: call(on)), ns_per_call(lambda: call(off))))
    empty = ns_per_call(lambda: None)
    rows.append(("empty call, for reference", empty, empty))
    return rows


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=500, help="interactive samples per phase")
    parser.add_argument("--repeats", type=int, default=3, help="phases per setting, alternating on and off")
    parser.add_argument("--rate", type=float, default=10.0, help="interactive jobs submitted per second")
    args = parser.parse_args()
    if args.samples < 100 or args.repeats < 1:
        parser.error("--samples must be at least 100 and --repeats at least 1")

    log("part 1: single calls")
    micro = microbenchmark()

    sources = stdlib_sources()
    inputs = interactive_inputs(sources)
    calibration = interactive_latency.calibrate_compress(sources, 0.7)
    bulk = interactive_latency.bulk_load("compress", calibration)
    window_s = (args.samples + 0.5) / args.rate
    latencies: dict[str, list[float]] = {"on": [], "off": []}
    per_phase: dict[str, list[float]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory(prefix="makeway-metrics-bench-") as temporary:
        root = Path(temporary)
        configs = {}
        for setting in ("on", "off"):
            configs[setting] = root / f"metrics-{setting}.toml"
            configs[setting].write_text(f"[node]\nmetrics = {'true' if setting == 'on' else 'false'}\n")
        for repeat in range(args.repeats):
            order = ("on", "off") if repeat % 2 == 0 else ("off", "on")
            for setting in order:
                log(f"part 2: repeat {repeat + 1}/{args.repeats}, metrics {setting}")
                workdir = root / f"{repeat}-{setting}"
                workdir.mkdir()
                spec = PhaseSpec(f"metrics {setting}", bulk=bulk,
                                 node_args=[*interactive_latency.BASELINE_NODE_ARGS, "--config", str(configs[setting])])
                result = run_phase(spec, workdir, args.rate, window_s, inputs, slots=2)
                latencies[setting].extend(result.latencies_s)
                per_phase[setting].append(percentile(result.latencies_s, 0.99) * 1000)
                log(f"  p99 {per_phase[setting][-1]:.2f} ms of {len(result.latencies_s)} samples")

    p99 = {setting: percentile(values, 0.99) * 1000 for setting, values in latencies.items()}
    p50 = {setting: percentile(values, 0.50) * 1000 for setting, values in latencies.items()}
    print("# Metrics overhead\n")
    print(f"Command: `python benchmarks/metrics_overhead.py --samples {args.samples} --repeats {args.repeats}`\n")
    print("| call | metrics on, ns | metrics off, ns |")
    print("| --- | ---: | ---: |")
    for name, on_ns, off_ns in micro:
        print(f"| {name} | {on_ns:.0f} | {off_ns:.0f} |")
    print()
    print(f"Interactive latency under bulk load, {args.repeats} phase(s) of {args.samples} samples per setting:\n")
    print("| metrics | p50 ms | p99 ms (pooled) | p99 ms per phase |")
    print("| --- | ---: | ---: | --- |")
    for setting in ("on", "off"):
        phases = ", ".join(f"{value:.2f}" for value in per_phase[setting])
        print(f"| {setting} | {p50[setting]:.2f} | {p99[setting]:.2f} | {phases} |")
    print(f"\np99 with metrics on / off: {p99['on'] / p99['off']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
