"""Job functions for benchmarks/preemption_modes.py, run by a real node."""

from __future__ import annotations

import time

from makeway import App

app = App()


@app.job(tier="bulk", name="bench.checkpoints")
def checkpoints(count: int, state_bytes: int, ctx) -> list[float]:
    """Checkpoint `count` times; return each call's latency in milliseconds."""
    filler = "x" * state_bytes
    latencies = []
    for index in range(count):
        started = time.perf_counter()
        ctx.checkpoint({"cursor": index, "filler": filler})
        latencies.append(1000 * (time.perf_counter() - started))
    return latencies


@app.job(tier="bulk", name="bench.iterate")
def iterate(total: int, ctx) -> int:
    """Walk a range with yield points, doing a little work per item."""
    state = {"sum": 0}
    for item in ctx.iterate(range(total), state=state, seconds=5.0):
        state["sum"] += item * item % 7
    return state["sum"]


@app.job(tier="bulk", name="bench.spin")
def spin(seconds: float) -> float:
    """Busy-loop for `seconds` of wall time without a yield point."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return seconds


@app.job(tier="essential", name="bench.short")
def short() -> int:
    return 1
