"""Prometheus metrics of a node.

Each node process has its own registry, so several nodes started in one test
process never share counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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
        self.running = Gauge("makeway_running_jobs", "Jobs running or suspended on this node", ["tier"], registry=self.registry)
