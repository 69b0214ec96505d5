"""Unit tests of the public API with a real SQLite store and no node."""

from __future__ import annotations

import datetime
import decimal
import pickle
import sqlite3
from dataclasses import dataclass

import pytest

from makeway import App
from makeway.errors import JobCancelled, PayloadError, UnknownJobError, UsageError
from makeway.jobs import JobHandle
from makeway.policy import Settings, settings_from_mapping
from makeway.serialization import decode
from makeway.store import JobState, NewJob


def module_level_job(a, b):
    return a + b


@dataclass(frozen=True)
class Point:
    x: int
    y: int


class Opaque:
    """An object that JSON cannot encode."""


class WritesMarker:
    """Unpickling an instance opens (and so creates) `marker` for writing."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def app(tmp_path):
    created = App("sqlite:///" + str(tmp_path / "api.db"), settings=Settings())
    yield created
    created.close()


@pytest.fixture
def add(app):
    @app.job(tier="interactive", name="tests:add")
    def add(a, b=0):
        return a + b

    return add


def stored_jobs(app):
    return app.store.jobs()


# -- registration ---------------------------------------------------------


def test_job_default_name(app):
    registered = app.job(module_level_job)

    assert registered.name == f"{__name__}:module_level_job"
    assert app.registry[registered.name] is registered


def test_job_default_tier_and_retries(app):
    registered = app.job(module_level_job)

    assert registered.tier == "bulk"
    assert registered.priority == 0
    assert registered.max_retries == app.settings.jobs.max_retries


def test_job_decorator_with_options(app):
    @app.job(tier="essential", priority=5, max_retries=0, name="tests:opts")
    def work():
        return 1

    assert work.tier == "essential"
    assert work.priority == 5
    assert work.max_retries == 0
    assert work() == 1


def test_job_main_module_rejected(app):
    def work():
        return 1

    work.__module__ = "__main__"

    with pytest.raises(UsageError, match="__main__"):
        app.job(work)
    assert app.registry == {}


def test_job_main_module_with_name(app):
    def work():
        return 1

    work.__module__ = "__main__"

    registered = app.job(name="scripts:work")(work)

    assert registered.name == "scripts:work"
    assert "scripts:work" in app.registry


def test_job_duplicate_name_rejected(app):
    app.job(module_level_job)

    with pytest.raises(UsageError, match="already registered"):
        app.job(module_level_job)


def test_job_duplicate_explicit_name_rejected(app):
    app.job(name="tests:same")(lambda: 1)

    with pytest.raises(UsageError, match="tests:same"):
        app.job(name="tests:same")(lambda: 2)


def test_job_unknown_tier_rejected(app):
    with pytest.raises(UsageError, match="nightly"):
        app.job(tier="nightly", name="tests:x")(lambda: 1)
    assert app.registry == {}


@pytest.mark.parametrize("priority", [True, 1.5, 10**9])
def test_job_bad_priority_rejected(app, priority):
    with pytest.raises(UsageError, match="priority"):
        app.job(priority=priority, name="tests:x")(lambda: 1)
    assert app.registry == {}


@pytest.mark.parametrize("max_retries", [-1, True, 1.0])
def test_job_bad_max_retries_rejected(app, max_retries):
    with pytest.raises(UsageError, match="max_retries"):
        app.job(max_retries=max_retries, name="tests:x")(lambda: 1)


def test_unknown_serializer_rejected(tmp_path):
    with pytest.raises(UsageError, match="serializer"):
        App("sqlite:///" + str(tmp_path / "x.db"), settings=Settings(), serializer="yaml")


def test_function_unknown_name(app):
    with pytest.raises(UnknownJobError, match="tests:missing"):
        app.function("tests:missing")


# -- options --------------------------------------------------------------


def test_options_unknown_name_rejected(add):
    with pytest.raises(UsageError, match="colour"):
        add.options(colour="red")


@pytest.mark.parametrize(
    ("options", "word"),
    [
        ({"tier": "nightly"}, "nightly"),
        ({"priority": True}, "priority"),
        ({"priority": 1.5}, "priority"),
        ({"priority": 10**9}, "priority"),
        ({"max_retries": -1}, "max_retries"),
        ({"delay_s": -1.0}, "delay_s"),
        ({"delay_s": "soon"}, "delay_s"),
        ({"metadata": ["not", "a", "dict"]}, "metadata"),
        ({"job_id": 17}, "job_id"),
    ],
)
def test_options_bad_value_rejected(app, add, options, word):
    with pytest.raises(UsageError, match=word):
        add.options(**options).submit(1, 2)
    assert stored_jobs(app) == []


def test_options_nan_delay_rejected(app, add):
    with pytest.raises(UsageError, match="delay_s"):
        add.options(delay_s=float("nan")).submit(1, 2)


def test_options_applied_to_job(app, add):
    handle = add.options(tier="bulk", priority=7, max_retries=1, delay_s=60.0,
                         metadata={"user": "ana"}, job_id="job-1").submit(1, 2)
    record = app.store.get(handle.id)

    assert handle.id == "job-1"
    assert record.tier == "bulk"
    assert record.tier_rank == app.settings.tier("bulk").rank
    assert record.priority == 7
    assert record.max_retries == 1
    assert record.metadata == {"user": "ana"}
    assert record.not_before > record.submitted_at + 59.0


def test_options_idempotency_key(app, add):
    first = add.options(idempotency_key="k-1").submit(1, 2)
    second = add.options(idempotency_key="k-1").submit(1, 2)

    assert second.id == first.id
    assert len(stored_jobs(app)) == 1


def test_idempotency_key_with_other_arguments_rejected(app, add):
    first = add.options(idempotency_key="k-1").submit(1, 2)

    with pytest.raises(UsageError, match="other arguments") as raised:
        add.options(idempotency_key="k-1").submit(3, 4)

    assert first.id in str(raised.value)
    assert len(stored_jobs(app)) == 1


def test_options_duplicate_job_id_rejected(app, add):
    add.options(job_id="job-1").submit(1, 2)

    with pytest.raises(UsageError, match="job-1"):
        add.options(job_id="job-1").submit(3, 4)


# -- arguments ------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((), {}),
        ((1, 2, 3), {}),
        ((1,), {"c": 2}),
        ((1,), {"a": 2}),
        ((1,), {"ctx": None}),
    ],
)
def test_submit_signature_mismatch_rejected(app, add, args, kwargs):
    with pytest.raises(UsageError, match="arguments do not match"):
        add.submit(*args, **kwargs)
    assert stored_jobs(app) == []


def test_submit_ctx_not_passed(app):
    @app.job(name="tests:with_ctx")
    def with_ctx(ctx, value):
        return value

    handle = with_ctx.submit(5)

    assert app.store.get(handle.id).state is JobState.QUEUED
    assert with_ctx.takes_context is True


@pytest.mark.parametrize(
    ("value", "label"),
    [
        (b"raw", "bytes"),
        (datetime.datetime(2024, 1, 2, 3, 4, 5), "datetime"),
        (decimal.Decimal("1.10"), "Decimal"),
        (Opaque(), "object"),
        ({1, 2}, "set"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
    ],
)
def test_submit_non_json_argument_rejected(app, add, value, label):
    with pytest.raises(PayloadError) as caught:
        add.submit(1, value)

    assert "arguments of tests:add['args'][1]" in str(caught.value), label
    assert stored_jobs(app) == []


def test_submit_non_json_keyword_path(app, add):
    with pytest.raises(PayloadError, match=r"\['kwargs'\]\['b'\]"):
        add.submit(1, b=b"raw")


def test_submit_non_json_nested_path(app, add):
    with pytest.raises(PayloadError, match=r"\['args'\]\[0\]\['items'\]\[2\]"):
        add.submit({"items": [1, 2, {3}]})


def test_submit_non_string_key_path(app, add):
    with pytest.raises(PayloadError, match="key 1"):
        add.submit({1: "one"})


def test_submit_circular_argument_rejected(app, add):
    loop = []
    loop.append(loop)

    with pytest.raises(PayloadError):
        add.submit(loop)


def test_submit_json_values_accepted(app, add):
    handle = add.submit({"n": None, "t": True, "f": 1.5, "s": "x", "l": [1, (2, 3)]}, b=-7)
    record = app.store.get(handle.id)

    assert decode(record.payload, record.serializer, allow_pickle=False) == {
        "args": [{"n": None, "t": True, "f": 1.5, "s": "x", "l": [1, [2, 3]]}],
        "kwargs": {"b": -7},
    }


def test_submit_over_payload_limit(tmp_path):
    settings = settings_from_mapping({"jobs": {"payload_limit_bytes": 64}})
    small_app = App("sqlite:///" + str(tmp_path / "small.db"), settings=settings)
    try:
        @small_app.job(name="tests:echo")
        def echo(text):
            return text

        with pytest.raises(PayloadError, match="payload limit of 64 bytes"):
            echo.submit("x" * 100)
        assert small_app.store.jobs() == []
        assert echo.submit("x").id
    finally:
        small_app.close()


# -- submit_many ----------------------------------------------------------


def test_submit_many_stores_batch(app, add):
    handles = app.submit_many([add.prepare(index, 1) for index in range(3)])

    assert len(handles) == 3
    assert [handle.status() for handle in handles] == [JobState.QUEUED] * 3
    assert {record.id for record in stored_jobs(app)} == {handle.id for handle in handles}


def test_submit_many_invalid_prepare_stores_nothing(app, add):
    with pytest.raises(PayloadError):
        app.submit_many([add.prepare(1, 2), add.prepare(1, b"raw"), add.prepare(3, 4)])

    assert stored_jobs(app) == []


def test_submit_many_non_request_stores_nothing(app, add):
    with pytest.raises(UsageError, match="JobRequest"):
        app.submit_many([add.prepare(1, 2), "not a request"])

    assert stored_jobs(app) == []


def test_submit_many_empty(app):
    assert app.submit_many([]) == []


def test_prepare_does_not_store(app, add):
    request = add.prepare(1, 2)

    assert request.new_job.name == "tests:add"
    assert stored_jobs(app) == []


# -- JobHandle ------------------------------------------------------------


@pytest.mark.parametrize("timeout", [-1, "x", True])
def test_result_bad_timeout_rejected(add, timeout):
    handle = add.submit(1, 2)

    with pytest.raises(UsageError, match="timeout"):
        handle.result(timeout=timeout)


def test_result_timeout_on_queued_job(add):
    handle = add.submit(1, 2)

    with pytest.raises(TimeoutError):
        handle.result(timeout=0.05)
    assert handle.status() is JobState.QUEUED


def test_result_of_completed_job(app, add):
    handle = add.submit(1, 2)
    claim = app.store.claim(handle.id, "node-a", 1, 2e9, 1e9)
    app.store.complete(handle.id, claim.attempt, b"3", "node-a", 1e9 + 1)

    assert handle.result(timeout=0) == 3


def test_cancel_queued_job(add):
    handle = add.submit(1, 2)

    assert handle.cancel() is JobState.CANCELLED
    assert handle.status() is JobState.CANCELLED
    with pytest.raises(JobCancelled):
        handle.result(timeout=0)


def test_cancel_twice_keeps_cancelled(app, add):
    handle = add.submit(1, 2)
    handle.cancel()

    assert handle.cancel() is JobState.CANCELLED
    assert [event.reason for event in app.store.events(handle.id)].count("cancelled_by_user") == 1


def test_cancel_running_job_reports_running_until_its_node_stops_it(app, add):
    handle = add.submit(1, 2)
    app.store.claim(handle.id, "node-a", 1, 2e9, 1e9)

    assert handle.cancel() is JobState.RUNNING
    assert handle.status() is JobState.RUNNING
    assert handle.cancel_requested
    assert app.store.cancel_requests("node-a") == [(handle.id, 1, "cancelled_by_user")]


def test_cancel_completed_job_keeps_its_result(app, add):
    handle = add.submit(1, 2)
    app.store.claim(handle.id, "node-a", 1, 2e9, 1e9)
    app.store.complete(handle.id, 1, b"3", "node-a", 1e9 + 1)

    assert handle.cancel() is JobState.SUCCEEDED
    assert handle.result(timeout=0) == 3


def test_handle_unknown_status_raises(app):
    with pytest.raises(UnknownJobError, match="missing"):
        app.handle("missing").status()


def test_handle_unknown_cancel_raises(app):
    with pytest.raises(UnknownJobError):
        app.handle("missing").cancel()


def test_handle_equality(app):
    assert app.handle("a") == JobHandle(app, "a")
    assert app.handle("a") != app.handle("b")


# -- serializers ----------------------------------------------------------


def plant_pickle_job(app, marker):
    payload = pickle.dumps({"args": [WritesMarker(str(marker))], "kwargs": {}})
    app.store.submit([NewJob(
        id="planted", name="tests:add", tier="interactive", tier_rank=0, priority=0,
        payload=payload, serializer="pickle", max_retries=0, not_before=0.0,
    )])
    return app.store.get("planted")


def test_planted_pickle_payload_not_decoded(app, tmp_path):
    marker = tmp_path / "marker"
    record = plant_pickle_job(app, marker)

    with pytest.raises(PayloadError, match="invalid payload"):
        decode(record.payload, record.serializer, allow_pickle=app.allows_pickle)
    assert not marker.exists()


def test_planted_pickle_result_not_decoded(app, tmp_path):
    marker = tmp_path / "marker"
    plant_pickle_job(app, marker)
    claim = app.store.claim("planted", "node-a", 1, 2e9, 1e9)
    app.store.complete("planted", claim.attempt, pickle.dumps(WritesMarker(str(marker))), "node-a", 1e9 + 1)

    with pytest.raises(PayloadError, match="invalid payload"):
        app.handle("planted").result(timeout=0)
    assert not marker.exists()


def test_planted_pickle_marker_works(tmp_path):
    # Shows that the crafted payload does create the marker when unpickled,
    # so the two tests above would notice a decode.
    marker = tmp_path / "marker"

    pickle.loads(pickle.dumps(WritesMarker(str(marker)))).close()

    assert marker.exists()


def test_unknown_serializer_payload_rejected():
    with pytest.raises(PayloadError, match="invalid payload"):
        decode(b"x", "yaml", allow_pickle=True)


def test_invalid_json_payload_rejected():
    with pytest.raises(PayloadError, match="invalid payload"):
        decode(b"{not json", "json", allow_pickle=False)


def test_pickle_serializer_round_trip(tmp_path):
    pickle_app = App("sqlite:///" + str(tmp_path / "pickle.db"), settings=Settings(), serializer="pickle")
    try:
        @pickle_app.job(name="tests:anything")
        def anything(*values, **named):
            return values

        values = (b"raw", datetime.date(2024, 5, 6), decimal.Decimal("1.10"), {1, 2}, Point(1, 2))
        handle = anything.submit(*values, when=datetime.datetime(2024, 1, 1))
        record = pickle_app.store.get(handle.id)
        decoded = decode(record.payload, record.serializer, allow_pickle=pickle_app.allows_pickle)

        assert record.serializer == "pickle"
        assert decoded == {"args": list(values), "kwargs": {"when": datetime.datetime(2024, 1, 1)}}
    finally:
        pickle_app.close()


def test_pickle_serializer_result_round_trip(tmp_path):
    pickle_app = App("sqlite:///" + str(tmp_path / "pickle.db"), settings=Settings(), serializer="pickle")
    try:
        @pickle_app.job(name="tests:point")
        def make_point():
            return Point(3, 4)

        handle = make_point.submit()
        claim = pickle_app.store.claim(handle.id, "node-a", 1, 2e9, 1e9)
        pickle_app.store.complete(handle.id, claim.attempt, pickle.dumps(Point(3, 4)), "node-a", 1e9 + 1)

        assert handle.result(timeout=0) == Point(3, 4)
    finally:
        pickle_app.close()
