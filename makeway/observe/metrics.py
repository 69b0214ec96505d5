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
        self.running = Gauge("makeway_running_jobs", "Jobs running or suspended on this node", ["tier"], registry=self.registry)
