"""Metrics and the JSON API of a node, over real HTTP on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from makeway import JobFailed, JobState
from makeway.web.server import free_port
from tests.apps import basic
from tests.conftest import node_log, wait_until

pytestmark = pytest.mark.timeout(120)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _post(url: str, token: str | None, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(url, method="POST", data=data, headers={"Content-Type": "application/json"})
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """Parse Prometheus text exposition into {(sample name, sorted labels): value}."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_match_jobs_run(app, start_node):
    port = free_port()
    start_node(f"[http]\nlisten = \"127.0.0.1:{port}\"\n")
    interactive = [basic.add.submit(i, 1) for i in range(7)]
    bulk = [basic.long_sleep.submit(0.05) for _ in range(3)]
    failing = basic.explode.submit("on purpose")
    assert [h.result(timeout=30) for h in interactive] == list(range(1, 8))
    assert [h.result(timeout=30) for h in bulk] == [0.05] * 3
    with pytest.raises(JobFailed):
        failing.result(timeout=30)

    samples = _samples(_get(f"http://127.0.0.1:{port}/metrics"))

    def value(name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("makeway_jobs_finished_total", tier="interactive", outcome="succeeded") == 7
    assert value("makeway_jobs_finished_total", tier="bulk", outcome="succeeded") == 3
    assert value("makeway_jobs_finished_total", tier="bulk", outcome="failed") == 1
    assert value("makeway_latency_seconds_count", tier="interactive") == 7
    assert value("makeway_latency_seconds_count", tier="bulk") == 3
    assert value("makeway_queue_wait_seconds_count", tier="interactive") == 7
    assert value("makeway_run_seconds_count", tier="bulk") == 4
    assert value("makeway_store_submitted_total", tier="interactive") == 7
    assert value("makeway_store_submitted_total", tier="bulk") == 4
    assert value("makeway_store_jobs", tier="bulk", state="failed") == 1
    assert value("makeway_backlog", tier="bulk") == 0
    assert value("makeway_background_slots") >= 1
    # Buckets fine enough to read a 2 ms p99.
    bounds = {float(dict(labels)["le"]) for name, labels in samples
              if name == "makeway_latency_seconds_bucket" and dict(labels)["tier"] == "interactive"}
    assert {0.00175, 0.002, 0.00225} <= bounds
    assert value("makeway_latency_seconds_sum", tier="bulk") >= 3 * 0.05


def test_metrics_merge_worker_counters(app, start_node):
    port = free_port()
    start_node(f"[http]\nlisten = \"127.0.0.1:{port}\"\n")
    assert [basic.count_in_worker.submit(n).result(timeout=30) for n in (3, 4, 5)] == [3, 4, 5]

    samples = _samples(_get(f"http://127.0.0.1:{port}/metrics"))

    assert samples[("test_worker_items_total", ())] == 12


def test_api_lists_jobs_and_events(app, start_node):
    port = free_port()
    start_node(f"[http]\nlisten = \"127.0.0.1:{port}\"\n")
    handle = basic.add.submit(2, 3)
    assert handle.result(timeout=30) == 5

    job = json.loads(_get(f"http://127.0.0.1:{port}/api/jobs/{handle.id}"))
    events = json.loads(_get(f"http://127.0.0.1:{port}/api/events?job={handle.id}"))
    tiers = json.loads(_get(f"http://127.0.0.1:{port}/api/tiers"))
    listed = json.loads(_get(f"http://127.0.0.1:{port}/api/jobs?state=succeeded"))

    assert job["state"] == "succeeded"
    assert [event["reason"] for event in events] == ["submitted", "claimed", "completed"]
    assert next(tier for tier in tiers if tier["name"] == "interactive")["states"] == {"succeeded": 1}
    assert [item["id"] for item in listed] == [handle.id]


def test_state_changes_need_the_token(app, start_node, tmp_path):
    port = free_port()
    node = start_node(f"[http]\nlisten = \"127.0.0.1:{port}\"\n")
    printed = wait_until(lambda: [line for line in node_log(tmp_path).splitlines() if "token for requests" in line],
                         message="token printed")
    token = printed[0].rsplit(" ", 1)[1]
    running = basic.long_sleep.submit(60)
    wait_until(lambda: running.status() is JobState.RUNNING, message="job running")
    base = f"http://127.0.0.1:{port}/api"

    assert _post(f"{base}/jobs/{running.id}/cancel", None)[0] == 401
    assert _post(f"{base}/jobs/{running.id}/cancel", "wrong")[0] == 401
    assert running.status() is JobState.RUNNING
    status, body = _post(f"{base}/jobs/{running.id}/cancel", token)
    assert status == 200
    assert body["target"] == running.id
    wait_until(lambda: running.status() is JobState.CANCELLED, message="job cancelled through the API")
    assert _post(f"{base}/pause/bulk", token) == (200, {"target": "bulk", "state": "paused", "changed": True})
    assert _post(f"{base}/resume/bulk", token)[1]["changed"] is True
    assert _post(f"{base}/jobs/no-such-job/cancel", token)[0] == 404
    # The token is printed once, never logged.
    assert node_log(tmp_path).count(token) == 1


def test_non_loopback_without_token_refused(store_url, tmp_path):
    config = tmp_path / "open.toml"
    config.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "makeway", "node", "--app", "tests.apps.basic:app", "--store", store_url,
         "--config", str(config), "--http", "0.0.0.0:8377"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "refusing to serve HTTP on '0.0.0.0' without a token" in result.stderr
    assert "http.token" in result.stderr


def test_events_carry_decision_reasons(app, start_node, store_url):
    from typer.testing import CliRunner

    from makeway.cli import cli

    # Opportunistic jobs may only be asked to yield, so pausing one makes it
    # yield instead of parking it.
    start_node("[node]\nslots = 2\npoll_interval_s = 0.05\n\n[tiers.opportunistic]\npreemption = [\"yield\"]\n\n"
               "[tiers.essential]\npreemption = [\"requeue\"]\nrequeue_grace_s = 0.05\n")
    # Suspend and resume: an interactive job arrives while bulk work runs.
    spinning = basic.spin.submit(1.5)
    wait_until(lambda: spinning.status() is JobState.RUNNING, message="bulk job running")
    interactive = basic.interactive_sleep.submit(0.3)
    interactive.result(timeout=30)
    spinning.result(timeout=30)
    # Yield: a paused job with checkpoints leaves its slot at its next one.
    yielding = basic.burn_with_checkpoints.options(tier="opportunistic").submit(2.0, 0.05)
    wait_until(lambda: app.store.get(yielding.id).checkpoints >= 1, message="checkpointing job running")
    app.store.set_paused(job_id=yielding.id, paused=True, now=time.time())
    app._wake_nodes(control=True)
    wait_until(lambda: yielding.status() is JobState.QUEUED, message="job yielded")
    # Requeue: a paused essential job without yield points is terminated and queued again.
    requeued = basic.long_sleep.options(tier="essential").submit(60)
    wait_until(lambda: requeued.status() is JobState.RUNNING, message="job to requeue running")
    app.store.set_paused(job_id=requeued.id, paused=True, now=time.time())
    app._wake_nodes(control=True)
    wait_until(lambda: requeued.status() is JobState.QUEUED, message="job requeued")
    # Cancel: a running job without yield points.
    cancelled = basic.long_sleep.submit(60)
    wait_until(lambda: cancelled.status() is JobState.RUNNING, message="job to cancel running")
    cancelled.cancel(wait=10)

    def reasons(handle):
        return {event.reason: event.detail for event in app.store.events(handle.id)}

    suspended = reasons(spinning)
    assert f"for interactive job {interactive.id}" in suspended["preempted"]
    assert "slots" in suspended["preempted"]
    assert "no interactive work" in suspended["resumed"]
    assert "yielded" in reasons(yielding)
    assert "requeued" in reasons(requeued)
    assert "cancelled_by_user" in reasons(cancelled)

    listed = CliRunner().invoke(cli, ["events", "--job", spinning.id, "--store", store_url])
    assert listed.exit_code == 0, listed.output
    assert "running -> suspended" in listed.output
    assert f"preempted: for interactive job {interactive.id}" in listed.output
    as_json = CliRunner().invoke(cli, ["events", "--tier", "bulk", "--since", "5m", "--json", "--store", store_url])
    assert as_json.exit_code == 0, as_json.output
    parsed = [json.loads(line) for line in as_json.output.splitlines()]
    assert {spinning.id, cancelled.id} <= {event["job_id"] for event in parsed}
    assert yielding.id not in {event["job_id"] for event in parsed}
    assert interactive.id not in {event["job_id"] for event in parsed}


def test_events_since_rejects_bad_value(store_url, app):
    from typer.testing import CliRunner

    from makeway.cli import cli

    result = CliRunner().invoke(cli, ["events", "--since", "yesterday", "--store", store_url])

    assert result.exit_code != 0
    assert "'yesterday'" in str(result.exception)
    assert "5m" in str(result.exception)


def test_node_logs_json_lines(store_url, tmp_path):
    config = tmp_path / "empty.toml"
    config.write_text("")
    node = subprocess.Popen(
        [sys.executable, "-m", "makeway", "node", "--app", "tests.apps.basic:app", "--store", store_url,
         "--config", str(config), "--log-format", "json"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        first = json.loads(node.stderr.readline())
    finally:
        node.terminate()
        node.wait(timeout=30)

    assert first["level"] == "INFO"
    assert first["logger"].startswith("makeway")
    assert "message" in first


def test_top_shows_tiers_and_progress(app, start_node, store_url):
    from typer.testing import CliRunner

    from makeway.cli import cli
    from makeway.observe.top import take_snapshot

    start_node("[node]\nslots = 2\n")
    long_job = basic.slow_progress.submit(200, 0.05)
    wait_until(lambda: (app.store.get(long_job.id).progress_done or 0) >= 10, message="progress reported")
    for value in range(5):
        assert basic.add.submit(value, 1).result(timeout=30) == value + 1

    # The node stores a suspension with the resume that ends it, so the
    # last ones may land a moment after the results.
    def bulk_preempted() -> bool:
        rows = take_snapshot(app.store, app.settings).tiers
        return next(row for row in rows if row.name == "bulk").preemptions_per_s > 0

    wait_until(bulk_preempted, message="suspensions stored")
    snapshot = take_snapshot(app.store, app.settings)
    frame = CliRunner().invoke(cli, ["top", "--once", "--store", store_url])

    interactive = next(row for row in snapshot.tiers if row.name == "interactive")
    bulk = next(row for row in snapshot.tiers if row.name == "bulk")
    assert interactive.completed == 5
    assert 0 < interactive.p50_ms <= interactive.p99_ms
    assert bulk.running + bulk.suspended == 1
    # Each interactive job suspended the bulk job once.
    assert bulk.preemptions_per_s > 0
    assert [record.id for record in snapshot.running] == [long_job.id]
    assert frame.exit_code == 0, frame.output
    assert long_job.id in frame.output
    assert "step" in frame.output
    assert "%" in frame.output
    long_job.cancel(wait=10)


def test_api_submits_jobs_with_token(app, start_node):
    port = free_port()
    start_node(f"[http]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"secret\"\n")
    url = f"http://127.0.0.1:{port}/api/jobs"

    status, body = _post(url, "secret", {"name": "tests.apps.basic:add", "args": [2, 5]})
    assert status == 201
    assert app.handle(body["id"]).result(timeout=30) == 7
    status, body = _post(url, "secret", {"name": "tests.apps.basic:add", "args": [2], "priority": 3})
    assert status == 422
    assert "arguments do not match" in body["detail"]
    status, body = _post(url, "secret", {"name": "tests.apps.basic:add", "args": [1, 1], "tier": "nope"})
    assert status == 422
    assert "'nope'" in body["detail"]
    assert _post(url, "secret", {"name": "no.such:job"})[0] == 404
    assert _post(url, None, {"name": "tests.apps.basic:add", "args": [1, 1]})[0] == 401
    assert app.store.counts() == {("interactive", "succeeded"): 1}
