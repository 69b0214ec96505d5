"""OpenTelemetry traces of job attempts, exported by real node and worker processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(120)


def _spans(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_attempt_span_nests_in_submitter_trace(start_node, store_url, tmp_path, monkeypatch):
    spans_file = tmp_path / "spans.jsonl"
    monkeypatch.setenv("MAKEWAY_TEST_SPANS", str(spans_file))
    from tests.apps import traced

    traced.app.use_store(store_url)
    try:
        start_node("[node]\nslots = 2\n", app_spec="tests.apps.traced:app")
        with traced.tracer.start_as_current_span("web request") as request_span:
            handle = traced.traced_work.submit(1.5)
        wait_until(lambda: any(span["name"] == "makeway.checkpoint" for span in _spans(spans_file)),
                   message="checkpoint span exported")
        # An interactive job suspends the traced bulk job for a while.
        assert traced.quick.submit(7).result(timeout=30) == 7
        assert handle.result(timeout=30) == "traced"
        wait_until(lambda: any(span["name"] == "job tests.apps.traced:traced_work" for span in _spans(spans_file)),
                   message="attempt span exported")
    finally:
        traced.app.close()

    spans = _spans(spans_file)
    by_name = {}
    for span in spans:
        by_name.setdefault(span["name"], []).append(span)
    request = by_name["web request"][0]
    attempt = by_name["job tests.apps.traced:traced_work"][0]
    assert request["span_id"] == request_span.get_span_context().span_id
    # The attempt is a child of the submitter's span, in its trace.
    assert attempt["trace_id"] == request["trace_id"]
    assert attempt["parent_id"] == request["span_id"]
    assert attempt["attributes"]["makeway.job_id"] == handle.id
    assert attempt["attributes"]["makeway.outcome"] == "succeeded"
    for name in ("makeway.queue_wait", "makeway.checkpoint", "makeway.suspended", "inner work"):
        children = [span for span in by_name.get(name, []) if span["trace_id"] == attempt["trace_id"]]
        assert children, f"no {name} span in the job's trace"
        assert children[0]["parent_id"] == attempt["span_id"], name
    # The job's own span came from the worker process, the others from the supervisor.
    assert by_name["inner work"][0]["pid"] != attempt["pid"]
    suspended = by_name["makeway.suspended"][0]
    assert attempt["start"] <= suspended["start"] < suspended["end"] <= attempt["end"]


def test_without_opentelemetry_nothing_is_imported(store_url, tmp_path):
    # Blocking the package stands for a machine without the extra.
    script = f"""
import sys
sys.modules["opentelemetry"] = None
from tests.apps import basic
basic.app.use_store({store_url!r})
handle = basic.add.options(metadata={{"request_id": "r-1"}}).submit(1, 2)
from makeway.observe import tracing
assert not tracing.AVAILABLE
assert basic.app.store.get(handle.id).metadata == {{"request_id": "r-1"}}
assert not [name for name in sys.modules if name.startswith("opentelemetry.")], "opentelemetry was imported"
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
