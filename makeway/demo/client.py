"""Interactive load generator: submits jobs at a steady rate from its own process.

Each job's latency is measured from just before submission to the moment the
result is back in this process, as an application would see it. Submissions
follow a fixed schedule (open loop), so a slow job never delays the next one.

Usage: python -m makeway.demo.client STORE_URL RATE DURATION_S OUT_JSON [INPUTS_JSON]
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from makeway.demo.jobs import app, file_statistic

MAX_OUTSTANDING = 64


def measure(path: str, timeout_s: float) -> tuple[float, float, bool]:
    started = time.perf_counter()
    submitted_at = time.time()
    handle = file_statistic.submit(path)
    try:
        handle.result(timeout=timeout_s)
        ok = True
    except Exception:
        ok = False
    return submitted_at, time.perf_counter() - started, ok


def run(store_url: str, rate_per_s: float, duration_s: float, inputs: list[str]) -> dict:
    app.use_store(store_url)
    app.store  # open before the clock starts
    interval_s = 1.0 / rate_per_s
    count = max(1, int(duration_s * rate_per_s))
    futures = []
    with ThreadPoolExecutor(max_workers=MAX_OUTSTANDING) as pool:
        start = time.perf_counter()
        for index in range(count):
            due = start + index * interval_s
            delay_s = due - time.perf_counter()
            if delay_s > 0:
                time.sleep(delay_s)
            futures.append(pool.submit(measure, inputs[index % len(inputs)], 120.0))
        samples = [future.result() for future in futures]
    return {
        "submitted_at": [sample[0] for sample in samples],
        "latency_s": [sample[1] for sample in samples if sample[2]],
        "failed": sum(1 for sample in samples if not sample[2]),
    }


def main(argv: list[str]) -> None:
    store_url, rate, duration, out = argv[0], float(argv[1]), float(argv[2]), argv[3]
    inputs = json.loads(open(argv[4]).read()) if len(argv) > 4 else [__file__]
    with open(out, "w") as handle:
        json.dump(run(store_url, rate, duration, inputs), handle)


if __name__ == "__main__":
    main(sys.argv[1:])
