"""Fixtures that start real nodes on temporary SQLite stores."""

from __future__ import annotations

import faulthandler
import os
import sys
import time
from pathlib import Path

import psutil
import pytest

from makeway.node.launch import NodeProcess, store_url_for

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_APP = "tests.apps.basic:app"

# A hung test dumps every thread's stack before pytest-timeout ends it.
faulthandler.enable(file=sys.stderr, all_threads=True)


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return store_url_for(tmp_path / "jobs.db")


@pytest.fixture
def app(store_url: str):
    """The test app, pointed at this test's store."""
    from tests.apps.basic import app as test_app

    test_app.use_store(store_url)
    yield test_app
    test_app.close()


@pytest.fixture
def start_node(tmp_path: Path, store_url: str):
    """Return a function that starts a node with the given makeway.toml text and waits until it serves."""
    nodes: list[NodeProcess] = []

    def start(config: str = "", *args: str, app_spec: str = TEST_APP) -> NodeProcess:
        index = len(nodes)
        config_file = tmp_path / f"node-{index}.toml"
        config_file.write_text(config)
        log = open(tmp_path / f"node-{index}.log", "w")
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        node = NodeProcess(app_spec, store_url, ["--config", str(config_file), *args], log=log, env=env, cwd=REPO_ROOT)
        nodes.append(node)
        node.wait_ready()
        return node

    yield start
    for node in nodes:
        node.stop(timeout_s=20)


def node_log(tmp_path: Path, index: int = 0) -> str:
    return (tmp_path / f"node-{index}.log").read_text()


def wait_until(predicate, timeout_s: float = 20.0, interval_s: float = 0.01, message: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {message}")


def worker_pids(node: NodeProcess) -> list[int]:
    """The node's live worker processes (children that are not multiprocessing helpers)."""
    children = psutil.Process(node.pid).children()
    return [child.pid for child in children if "resource_tracker" not in " ".join(child.cmdline())]


def kill_node(node: NodeProcess) -> None:
    """SIGKILL a node's supervisor and its workers at once, as a crash or an OOM kill of the machine would."""
    processes = [psutil.Process(node.pid)] + [psutil.Process(pid) for pid in worker_pids(node)]
    for process in processes:
        process.kill()
    psutil.wait_procs(processes, timeout=10)


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system
