"""A node's HTTP endpoint: /metrics with the supervisor's own figures, and the JSON API.

Worker processes may record Prometheus metrics of their own (a job's items
per second, say). They run with PROMETHEUS_MULTIPROC_DIR set to a directory
of this node, so prometheus_client keeps their values in files there, and
/metrics merges those files into its output.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from makeway.observe.metrics import NodeStateCollector, PressureCollector, StoreCollector
from makeway.policy import BACKGROUND_POOL
from makeway.store import open_store
from makeway.web.server import HttpServer, parse_listen, resolve_token

if TYPE_CHECKING:
    from makeway.node.supervisor import Supervisor

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class NodeEndpoint:
    """The metrics registries of a node, and its HTTP server when `http.listen` is set."""

    def __init__(self, supervisor: Supervisor):
        self._supervisor = supervisor
        self._store = None
        self._server: HttpServer | None = None
        self.token: str | None = None
        self.url: str | None = None
        registry = supervisor.metrics.registry
        registry.register(NodeStateCollector(self._node_state))
        registry.register(StoreCollector(self._store_figures))
        registry.register(PressureCollector())
        # Set before any worker starts, so that workers inherit it; the
        # supervisor's own prometheus_client was imported without it and keeps
        # its values in memory.
        self.multiproc_dir = Path(tempfile.mkdtemp(prefix="makeway-metrics-"))
        os.environ[MULTIPROC_ENV] = str(self.multiproc_dir)
        listen = supervisor.settings.http.listen
        if listen:
            host, port = parse_listen(listen)
            # Checked before the node starts anything: a refused address fails fast.
            self.token, self._generated = resolve_token(host, supervisor.settings.http.token)
            self._host, self._port = host, port

    def start(self) -> None:
        """Start the HTTP server, if one is configured, once the node is ready."""
        if self.token is None:
            return
        from makeway.web.api import create_api

        supervisor = self._supervisor
        self._store = open_store(supervisor.app.store_url, create=False)
        api = create_api(self._store, supervisor.settings, self.token, registries=self.registries, app=supervisor.app)
        self._server = HttpServer(api, self._host, self._port)
        self._server.start()
        self.url = f"http://{self._host}:{self._server.port}"
        logger.info("HTTP endpoint at %s (/metrics, /api, /docs)", self.url)
        if self._generated:
            # Printed once, and not logged: log files outlive the process.
            print(f"makeway: token for requests that change state: {self.token}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
        if self._store is not None:
            self._store.close()
        shutil.rmtree(self.multiproc_dir, ignore_errors=True)

    def registries(self) -> list[CollectorRegistry]:
        """Return the node's registry and, when workers recorded metrics, a registry that merges theirs."""
        registries = [self._supervisor.metrics.registry]
        if any(self.multiproc_dir.glob("*.db")):
            workers = CollectorRegistry()
            MultiProcessCollector(workers, path=str(self.multiproc_dir))
            registries.append(workers)
        return registries

    def _node_state(self) -> tuple[dict[str, int], dict[str, int], int, int]:
        running, suspended = Counter(), Counter()
        stopped = 0
        for worker in list(self._supervisor.workers):
            job = worker.assignment
            if job is None or worker.dead:
                continue
            if worker.held_stopped or worker.parked:
                suspended[job.tier] += 1
                if worker.pool == BACKGROUND_POOL and not worker.parked:
                    stopped += 1
            else:
                running[job.tier] += 1
        slots = self._supervisor.settings.node.resolved_background_workers()
        return dict(running), dict(suspended), slots, stopped

    def _store_figures(self) -> tuple[dict[tuple[str, str], int], dict[str, int], dict[str, int]]:
        store = self._store or self._supervisor.store
        return store.counts(), store.backlog(time.time()), store.submitted_totals()
