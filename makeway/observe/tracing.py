"""OpenTelemetry traces of job attempts, when the optional `otel` extra is installed.

At submission, the caller's current trace context goes into the job's
metadata as W3C `traceparent` and `tracestate` entries. The node starts one
span per attempt, a child of that context, with child spans for the time
the job waited in the queue, for each suspension and for each checkpoint.
The worker runs the job function inside the attempt span's context, so
spans the job makes itself nest under it too. A slow web request that
waited for a job therefore shows the job's time inside its own trace.

Spans go to the global tracer provider, which the application configures
(an SDK provider with an exporter, set up in the module that defines the
App, so the node and its workers get it too). Without the opentelemetry
package, nothing here imports it and every function returns at once.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from typing import Any, Iterator

# Metadata key under which the node passes the attempt span's context to the worker.
ATTEMPT_CONTEXT_KEY = "makeway.attempt_context"
TRACER_NAME = "makeway"


def _installed() -> bool:
    try:
        return importlib.util.find_spec("opentelemetry.trace") is not None
    except (ImportError, ValueError):
        # ValueError: sys.modules holds None for it, which blocks the import.
        return False


AVAILABLE = _installed()


def inject_context(metadata: dict[str, Any]) -> dict[str, Any]:
    """Return `metadata` with the caller's trace context added, unless it has one or there is no active span."""
    if not AVAILABLE or "traceparent" in metadata:
        return metadata
    from opentelemetry import propagate, trace

    if not trace.get_current_span().get_span_context().is_valid:
        return metadata
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return {**metadata, **carrier}


def _ns(epoch_s: float) -> int:
    return int(epoch_s * 1e9)


class AttemptSpans:
    """The spans of one attempt, made by the supervisor."""

    def __init__(self, tracer, span, carrier: dict[str, str]):
        self._tracer = tracer
        self.span = span
        self.carrier = carrier
        self._suspended = None

    def suspended(self, at: float) -> None:
        if self._suspended is None:
            self._suspended = self._child("makeway.suspended", at)

    def resumed(self, at: float) -> None:
        if self._suspended is not None:
            self._suspended.end(end_time=_ns(at))
            self._suspended = None

    def checkpoint(self, started: float, ended: float) -> None:
        self._child("makeway.checkpoint", started).end(end_time=_ns(ended))

    def end(self, at: float, outcome: str) -> None:
        self.resumed(at)
        self.span.set_attribute("makeway.outcome", outcome)
        if outcome in ("failed", "timed_out"):
            from opentelemetry.trace import Status, StatusCode

            self.span.set_status(Status(StatusCode.ERROR, outcome))
        self.span.end(end_time=_ns(at))

    def _child(self, name: str, at: float):
        from opentelemetry import trace

        context = trace.set_span_in_context(self.span)
        return self._tracer.start_span(name, context=context, start_time=_ns(at))


def start_attempt(job_id: str, name: str, tier: str, attempt: int, node_id: str, metadata: dict[str, Any],
                  queued_at: float | None, claimed_at: float) -> AttemptSpans | None:
    """Start the span of an attempt claimed at `claimed_at`, under the submitter's context in `metadata`.

    Return None when OpenTelemetry is not installed.
    """
    if not AVAILABLE:
        return None
    from opentelemetry import propagate, trace

    tracer = trace.get_tracer(TRACER_NAME)
    parent = propagate.extract({key: value for key, value in metadata.items() if isinstance(value, str)})
    span = tracer.start_span(
        f"job {name}", context=parent, kind=trace.SpanKind.CONSUMER, start_time=_ns(claimed_at),
        attributes={"makeway.job_id": job_id, "makeway.job_name": name, "makeway.tier": tier,
                    "makeway.attempt": attempt, "makeway.node_id": node_id},
    )
    spans = AttemptSpans(tracer, span, {})
    if queued_at is not None:
        spans._child("makeway.queue_wait", min(queued_at, claimed_at)).end(end_time=_ns(claimed_at))
    propagate.inject(spans.carrier, context=trace.set_span_in_context(span))
    return spans


@contextmanager
def attempt_context(metadata: dict[str, Any]) -> Iterator[None]:
    """Run the block (the job function, in the worker) inside the attempt span's context, if one was passed."""
    carrier = metadata.get(ATTEMPT_CONTEXT_KEY)
    if not AVAILABLE or not carrier:
        yield
        return
    from opentelemetry import context, propagate

    token = context.attach(propagate.extract(carrier))
    try:
        yield
    finally:
        context.detach(token)
