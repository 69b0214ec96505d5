"""Prometheus metrics of a node.

Each node process has its own registry, so several nodes started in one test
process never share counters. Counters and histograms count what this node
did. Figures of the whole store (backlog, submissions) and of the machine
(pressure) are read when the registry is collected, by `StoreCollector` and
`PressureCollector`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

# Bucket bounds in seconds: 0.25 ms steps up to 3 ms, so that a p99 near 2 ms
# falls between two close bounds, then coarser up to the hour that a bulk job
# may run.
LATENCY_BUCKETS_S = (
    0.0005, 0.00075, 0.001, 0.00125, 0.0015, 0.00175, 0.002, 0.00225, 0.0025, 0.00275, 0.003,
    0.004, 0.005, 0.006, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
)


class _Disabled:
    """A metric that records nothing, for `node.metrics = false`."""

    def labels(self, *values: str) -> _Disabled:
        return self

    def inc(self, amount: float = 1.0) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


class NodeMetrics:
    """The counters and histograms of one node; with `enabled` False each one records nothing."""

    def __init__(self, enabled: bool = True) -> None:
        self.registry = CollectorRegistry()
        self.enabled = enabled
        self.preemptions = Counter(
            "makeway_preemptions", "Preemptions applied, by mode and preempted tier", ["mode", "tier"], registry=self.registry
        )
        self.resumes = Counter("makeway_resumes", "Suspended jobs resumed, by tier", ["tier"], registry=self.registry)
        self.suspends_deferred = Counter(
            "makeway_suspends_deferred", "Suspensions put off because the job was in a critical section", ["tier"],
            registry=self.registry,
        )
        self.suspends_cancelled = Counter(
            "makeway_suspends_cancelled", "Suspensions withdrawn before the stop took effect", ["tier"],
            registry=self.registry,
        )
        self.jobs_finished = Counter(
            "makeway_jobs_finished", "Attempts that ended, by tier and outcome", ["tier", "outcome"], registry=self.registry
        )
        self.workers_lost = Counter("makeway_workers_lost", "Worker processes that died", ["pool"], registry=self.registry)
        self.dispatch_wakeups = Counter(
            "makeway_dispatch_wakeups", "Dispatch rounds, by what woke them: notify (a wake-up datagram), poll (the "
            "fallback timer) or node (an event inside the node)", ["path"], registry=self.registry,
        )
        self.attempts = Counter("makeway_attempts", "Attempts started, by tier", ["tier"], registry=self.registry)
        self.checkpoints = Counter("makeway_checkpoints", "Checkpoints stored, by tier", ["tier"], registry=self.registry)
        self.cancellations = Counter(
            "makeway_cancellations", "Running jobs stopped for good, by tier and reason", ["tier", "reason"],
            registry=self.registry,
        )
        self.cpu_seconds = Counter(
            "makeway_job_cpu_seconds", "CPU time used by job attempts, by tier", ["tier"], registry=self.registry
        )
        self.wasted_cpu_seconds = Counter(
            "makeway_job_wasted_cpu_seconds",
            "CPU time of interrupted attempts after their last checkpoint, which a later attempt redoes, by tier",
            ["tier"], registry=self.registry,
        )
        self.requeues = Counter(
            "makeway_requeues", "Jobs queued again without a failure, by tier and reason (yielded, requeued, shutdown, "
            "worker_lost)", ["tier", "reason"], registry=self.registry,
        )
        self.queue_wait = Histogram(
            "makeway_queue_wait_seconds", "Time from entering the queue to the claim, per attempt, by tier", ["tier"],
            buckets=LATENCY_BUCKETS_S, registry=self.registry,
        )
        self.run_time = Histogram(
            "makeway_run_seconds", "Run time of attempts that ended on this node, suspended time excluded, by tier",
            ["tier"], buckets=LATENCY_BUCKETS_S, registry=self.registry,
        )
        self.latency = Histogram(
            "makeway_latency_seconds", "Time from submission to success of jobs completed on this node, by tier",
            ["tier"], buckets=LATENCY_BUCKETS_S, registry=self.registry,
        )

        if not enabled:
            for name, value in list(vars(self).items()):
                if isinstance(value, (Counter, Histogram)):
                    self.registry.unregister(value)
                    setattr(self, name, _Disabled())

def _family(kind, name: str, documentation: str, values: dict[tuple[str, ...], float], labels: list[str]):
    """Build a metric family of `kind` with one sample per label tuple in `values`, in sorted order."""
    family = kind(name, documentation, labels=labels)
    for label_values, value in sorted(values.items()):
        family.add_metric(list(label_values), value)
    return family


class NodeStateCollector(Collector):
    """Collect this node's jobs per tier and its background budget at scrape time, from `read()`.

    `read` returns (running per tier, suspended or parked per tier,
    background slots, background slots whose job is suspended now).
    """

    def __init__(self, read: Callable[[], tuple[dict[str, int], dict[str, int], int, int]]):
        self._read = read

    def collect(self) -> Iterable:
        running, suspended, slots, stopped = self._read()
        yield _family(GaugeMetricFamily, "makeway_running_jobs", "Jobs running (not suspended) on this node, by tier",
                      {(tier,): count for tier, count in running.items()}, ["tier"])
        yield _family(GaugeMetricFamily, "makeway_suspended_jobs", "Jobs suspended or parked on this node, by tier",
                      {(tier,): count for tier, count in suspended.items()}, ["tier"])
        yield GaugeMetricFamily("makeway_background_slots",
                                "Background slots of this node: the budget of the background tiers", value=slots)
        yield GaugeMetricFamily("makeway_background_slots_stopped",
                                "Background slots whose job is suspended for interactive work now", value=stopped)


class StoreCollector(Collector):
    """Collect store-wide figures at scrape time: jobs per tier and state, backlog, and submissions.

    Every node of a store reports the same values; aggregate them with max,
    not sum.
    """

    def __init__(self, read: Callable[[], tuple[dict[tuple[str, str], int], dict[str, int], dict[str, int]]]):
        self._read = read

    def collect(self) -> Iterable:
        try:
            states, backlog, submitted = self._read()
        except Exception as exc:  # noqa: BLE001 - a failed scrape must not take the endpoint down
            logger.warning("Reading store figures for /metrics failed: %s", exc)
            return
        yield _family(GaugeMetricFamily, "makeway_store_jobs", "Jobs in the store, by tier and state", states,
                      ["tier", "state"])
        yield _family(GaugeMetricFamily, "makeway_backlog", "Queued jobs that are due now (not delayed), by tier",
                      {(tier,): count for tier, count in backlog.items()}, ["tier"])
        yield _family(CounterMetricFamily, "makeway_store_submitted", "Jobs ever submitted to the store, by tier",
                      {(tier,): count for tier, count in submitted.items()}, ["tier"])


PRESSURE_DIR = Path("/proc/pressure")


class PressureCollector(Collector):
    """Collect the kernel's pressure stall information (PSI): the share of the last 10 s in which tasks waited.

    Linux 4.20 and later expose it in /proc/pressure. Elsewhere the metric is
    absent.
    """

    def collect(self) -> Iterable:
        family = GaugeMetricFamily(
            "makeway_pressure_ratio", "Share of the last 10 s in which some (or all) runnable tasks stalled on the "
            "resource, from /proc/pressure", labels=["resource", "kind"],
        )
        found = False
        for resource in ("cpu", "memory", "io"):
            try:
                lines = (PRESSURE_DIR / resource).read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                kind, *fields = line.split()
                values = dict(field.split("=", 1) for field in fields)
                family.add_metric([resource, kind], float(values["avg10"]) / 100.0)
                found = True
        if found:
            yield family


def read_pressure() -> dict[str, float]:
    """Return the 10 s "some" pressure of cpu, memory and io as shares (0 to 1); empty without PSI."""
    pressure = {}
    for sample in PressureCollector().collect():
        for item in sample.samples:
            if item.labels["kind"] == "some":
                pressure[item.labels["resource"]] = item.value
    return pressure
