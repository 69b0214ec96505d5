"""Bad input through the Python API, as a table: each case is a clear error naming the value and the fix,
and nothing already stored changes."""

from __future__ import annotations

import datetime
import math

import pytest

from makeway import App, ConfigError, MakewayError, StoreError, UnknownJobError, UsageError
from makeway.errors import PayloadError
from makeway.policy import settings_from_mapping
from tests.apps import basic


def _options(**options):
    return lambda: basic.add.options(**options).submit(1, 2)


# (case, call, expected error, texts the message must contain)
CASES = [
    ("unknown job name", lambda: basic.app.function("tests.apps.basic:nope"), UnknownJobError, ["nope", "registered"]),
    ("object argument", lambda: basic.add.submit(object(), 2), PayloadError, ["arguments of", "JSON"]),
    ("set inside kwargs", lambda: basic.add.submit(1, b={"x": {1, 2}}), PayloadError, ["JSON"]),
    ("NaN argument", lambda: basic.add.submit(math.nan, 1), PayloadError, ["JSON"]),
    ("missing argument", lambda: basic.add.submit(1), UsageError, ["arguments do not match", "missing"]),
    ("extra argument", lambda: basic.add.submit(1, 2, 3), UsageError, ["arguments do not match"]),
    ("unexpected keyword", lambda: basic.add.submit(1, 2, c=3), UsageError, ["'c'"]),
    ("ctx passed by caller", lambda: basic.context_fields.submit(ctx=1), UsageError, ["ctx is provided by the runtime"]),
    ("oversized payload", lambda: basic.add.submit("x" * 2_000_000, 1), PayloadError, ["payload_limit_bytes"]),
    ("unknown tier", _options(tier="nope"), UsageError, ["'nope'", "makeway.toml"]),
    ("priority of wrong type", _options(priority="high"), UsageError, ["'high'", "integer"]),
    ("priority out of range", _options(priority=10**9), UsageError, ["1000000000", "range"]),
    ("boolean priority", _options(priority=True), UsageError, ["True", "integer"]),
    ("negative max_retries", _options(max_retries=-1), UsageError, ["-1", ">= 0"]),
    ("negative delay", _options(delay_s=-5), UsageError, ["-5", ">= 0"]),
    ("infinite delay", _options(delay_s=math.inf), UsageError, ["inf", "finite"]),
    ("negative timeout", _options(timeout=-1), UsageError, ["-1", "> 0"]),
    ("zero timeout", _options(timeout=0), UsageError, ["0", "> 0"]),
    ("infinite timeout", _options(timeout=math.inf), UsageError, ["inf", "finite"]),
    ("naive datetime deadline", _options(deadline=datetime.datetime(2030, 1, 1)), UsageError, ["time zone"]),
    ("text deadline", _options(deadline="tomorrow"), UsageError, ["'tomorrow'", "epoch seconds"]),
    ("unknown option", _options(colour="red"), UsageError, ["colour"]),
    ("metadata not a dict", _options(metadata=[1]), UsageError, ["[1]", "dict"]),
    ("metadata not JSON", _options(metadata={"when": object()}), PayloadError, ["metadata", "JSON"]),
    ("empty job id", _options(job_id=""), UsageError, ["''", "non-empty"]),
    ("duplicate job id", _options(job_id="kept"), UsageError, ["'kept'", "already in the store"]),
    ("idempotency key with other arguments", lambda: basic.add.options(idempotency_key="kept-key").submit(5, 5),
     UsageError, ["'kept-key'", "other arguments"]),
    ("negative result timeout", lambda: basic.app.handle("kept").result(timeout=-1), UsageError, ["-1"]),
    ("negative cancel wait", lambda: basic.app.handle("kept").cancel(wait=-1), UsageError, ["-1"]),
    ("unknown job id", lambda: basic.app.handle("missing-id").status(), UnknownJobError, ["'missing-id'"]),
    ("zero slots", lambda: settings_from_mapping({"node": {"slots": 0}}), ConfigError, ["node.slots", "0"]),
    ("slots of wrong type", lambda: settings_from_mapping({"node": {"slots": "many"}}), ConfigError,
     ["node.slots", "'many'"]),
    ("bad tier name", lambda: settings_from_mapping({"tiers": {"Bad Name": {"rank": 1}}}), ConfigError,
     ["'Bad Name'", "lowercase"]),
    ("new tier without rank", lambda: settings_from_mapping({"tiers": {"nightly": {}}}), ConfigError,
     ["nightly", "rank"]),
    ("unknown suspend policy", lambda: settings_from_mapping({"policy": {"suspend": "sometimes"}}), ConfigError,
     ["policy.suspend", "'sometimes'"]),
    ("heartbeat above half the lease", lambda: settings_from_mapping({"node": {"heartbeat_s": 20, "lease_s": 30}}),
     ConfigError, ["heartbeat_s", "lease_s"]),
    ("default tier unknown", lambda: settings_from_mapping({"jobs": {"default_tier": "nope"}}), ConfigError,
     ["'nope'", "default_tier"]),
    ("preemption mode twice", lambda: settings_from_mapping({"tiers": {"bulk": {"preemption": ["yield", "yield"]}}}),
     ConfigError, ["twice"]),
    ("unknown preemption mode", lambda: settings_from_mapping({"tiers": {"bulk": {"preemption": ["pray"]}}}),
     ConfigError, ["'pray'"]),
    ("node nice out of range", lambda: settings_from_mapping({"policy": {"node_nice": -21}}), ConfigError,
     ["policy.node_nice", "-21", "-20 to 19", "'inherit'"]),
    ("node nice as text", lambda: settings_from_mapping({"policy": {"node_nice": "high"}}), ConfigError,
     ["policy.node_nice", "'high'", "'inherit'"]),
    ("negative retry spread", lambda: settings_from_mapping({"jobs": {"retry_jitter_s": -1}}), ConfigError,
     ["jobs.retry_jitter_s", "-1"]),
    ("negative worker losses", lambda: settings_from_mapping({"jobs": {"max_worker_losses": -2}}), ConfigError,
     ["jobs.max_worker_losses", "-2"]),
    ("unknown store scheme", lambda: App("mysql://localhost/jobs").store, UsageError, ["mysql://", "sqlite:///"]),
]


@pytest.fixture
def stored(app):
    """A job already in the store, whose record must survive every bad call."""
    handle = basic.add.options(job_id="kept", idempotency_key="kept-key").submit(1, 2)
    return app.store.get(handle.id)


@pytest.mark.parametrize("case, call, error, texts", CASES, ids=[case[0] for case in CASES])
def test_bad_input_rejected_and_nothing_changed(app, stored, case, call, error, texts):
    jobs_before = len(app.store.jobs())

    with pytest.raises(error) as raised:
        call()

    message = str(raised.value)
    for text in texts:
        assert text in message, f"{case}: {text!r} missing from {message!r}"
    assert isinstance(raised.value, MakewayError)
    assert len(app.store.jobs()) == jobs_before
    assert app.store.get("kept") == stored


def test_bad_input_table_has_enough_cases():
    assert len(CASES) >= 25


def test_store_under_a_regular_file_names_the_path(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where a directory should be")
    url = f"sqlite:///{blocker}/jobs.db"

    with pytest.raises(StoreError, match="not-a-directory") as raised:
        App(url).store

    assert "permissions" in str(raised.value)


class _Custom:
    pass


@pytest.mark.parametrize("argument", [
    b"raw bytes",
    datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
    __import__("decimal").Decimal("1.10"),
    _Custom(),
    "x" * (10 * 1024 * 1024),
    lambda: None,
], ids=["bytes", "datetime", "decimal", "custom class", "10 MB blob", "function"])
def test_unencodable_argument_rejected_at_submit(app, argument):
    with pytest.raises(PayloadError):
        basic.add.submit(argument, 1)

    assert app.store.jobs() == []
