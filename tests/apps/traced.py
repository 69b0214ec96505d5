"""An app whose processes export OpenTelemetry spans as JSON lines to the file named by $MAKEWAY_TEST_SPANS."""

from __future__ import annotations

import json
import os
import time

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from makeway import App

SPANS_ENV = "MAKEWAY_TEST_SPANS"


class JsonLinesExporter(SpanExporter):
    """Append each finished span to the file named by $MAKEWAY_TEST_SPANS, read when it exports."""

    def export(self, spans) -> SpanExportResult:
        path = os.environ.get(SPANS_ENV)
        if path:
            with open(path, "a") as out:
                for span in spans:
                    parent = span.parent.span_id if span.parent is not None else None
                    out.write(json.dumps({
                        "name": span.name, "trace_id": span.context.trace_id, "span_id": span.context.span_id,
                        "parent_id": parent, "start": span.start_time / 1e9, "end": span.end_time / 1e9,
                        "attributes": dict(span.attributes or {}), "pid": os.getpid(),
                    }) + "\n")
        return SpanExportResult.SUCCESS


provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter()))
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("tests.apps.traced")

app = App()


@app.job(tier="bulk", max_retries=0)
def traced_work(seconds, ctx):
    """Make a span of its own, checkpoint once, and keep running `seconds` so it can be suspended."""
    with tracer.start_as_current_span("inner work"):
        time.sleep(0.1)
    ctx.checkpoint({"step": 1})
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)
    return "traced"


@app.job(tier="interactive")
def quick(value):
    time.sleep(0.2)
    return value
