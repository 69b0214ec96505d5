"""Job functions the node tests run in real worker processes."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from makeway import App

app = App()


@app.job(tier="interactive")
def add(a, b):
    return a + b


@app.job(tier="interactive")
def interactive_sleep(seconds):
    time.sleep(seconds)
    return os.getpid()


@app.job(tier="interactive")
async def async_add(a, b):
    await asyncio.sleep(0.01)
    return a + b


@app.job(tier="bulk")
def spin(seconds):
    """Burn CPU for `seconds` of CPU time; return the worker pid."""
    _burn_cpu(seconds)
    return os.getpid()


@app.job(tier="bulk")
def record_start(path, label, seconds=0.0):
    with open(path, "a") as out:
        out.write(f"{label} {time.time()}\n")
    time.sleep(seconds)
    return label


@app.job(tier="bulk", max_retries=0)
def explode(message):
    raise RuntimeError(message)


@app.job(tier="bulk", max_retries=2)
def kill_self_first_attempt(marker):
    """Die by SIGKILL on the first attempt, succeed afterwards."""
    marker = Path(marker)
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), 9)
    return "survived"


@app.job(tier="bulk")
def wait_for_file(path, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)
    return os.getpid()


@app.job(tier="interactive")
def interactive_compute(milliseconds):
    """Burn `milliseconds` of CPU time, as a short interactive request would."""
    _burn_cpu(milliseconds / 1000)
    return milliseconds


@app.job(tier="essential")
def essential_spin(seconds):
    _burn_cpu(seconds)
    return os.getpid()


def _burn_cpu(seconds):
    """Busy-loop until this process has used `seconds` of CPU time; suspended time does not count."""
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass


def _max_gap_while_busy(seconds):
    """Busy-loop for `seconds` of wall time; return the longest gap between two clock reads."""
    end = time.monotonic() + seconds
    last = time.monotonic()
    max_gap = 0.0
    while last < end:
        now = time.monotonic()
        max_gap = max(max_gap, now - last)
        last = now
    return max_gap


@app.job(tier="bulk")
def critical_probe(rounds, section_s, ctx):
    """Alternate critical and plain stretches; return the longest stall seen in each kind."""
    inside = outside = 0.0
    for _ in range(rounds):
        with ctx.critical():
            inside = max(inside, _max_gap_while_busy(section_s))
        outside = max(outside, _max_gap_while_busy(section_s))
    return {"inside": inside, "outside": outside}


@app.job(tier="interactive")
def context_fields(ctx):
    return {"job_id": ctx.job_id, "attempt": ctx.attempt, "tier": ctx.tier, "metadata": ctx.metadata}
