"""Bad input through the command line: a clear error, exit code 2, and nothing stored lost."""

from __future__ import annotations

import subprocess
import sys

from makeway import JobState
from tests.apps import basic
from tests.conftest import REPO_ROOT


def makeway(*args: str, cwd=REPO_ROOT, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "makeway", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def test_node_rejects_malformed_config(app, tmp_path, store_url):
    kept = basic.add.submit(1, 2)
    config = tmp_path / "makeway.toml"
    config.write_text("[policy]\nsuspend = 'sometimes'\n")

    result = makeway("node", "--app", "tests.apps.basic:app", "--store", store_url, "--config", str(config))

    assert result.returncode == 2
    assert "policy.suspend = 'sometimes'" in result.stderr
    assert app.handle(kept.id).status() is JobState.QUEUED


def test_node_rejects_invalid_toml(tmp_path, store_url):
    config = tmp_path / "makeway.toml"
    config.write_text("[node\nslots = 2\n")

    result = makeway("node", "--app", "tests.apps.basic:app", "--store", store_url, "--config", str(config))

    assert result.returncode == 2
    assert "is not valid TOML" in result.stderr
    assert str(config) in result.stderr


def test_node_rejects_unknown_app(store_url):
    result = makeway("node", "--app", "tests.apps.missing:app", "--store", store_url)

    assert result.returncode == 2
    assert "'tests.apps.missing'" in result.stderr
    assert "PYTHONPATH" in result.stderr


def test_submit_rejects_unknown_job_name(app, store_url):
    result = makeway("submit", "tests.apps.basic:nope", "1", "--app", "tests.apps.basic:app", "--store", store_url)

    assert result.returncode == 2
    assert "'tests.apps.basic:nope' is not registered" in result.stderr
    assert app.store.jobs() == []


def test_submit_rejects_non_json_argument(app, store_url):
    result = makeway("submit", "tests.apps.basic:add", "1", "two", "--app", "tests.apps.basic:app", "--store", store_url)

    assert result.returncode == 2
    assert "argument 2 'two' is not JSON" in result.stderr
    assert app.store.jobs() == []


def test_submit_rejects_unknown_tier(app, store_url):
    result = makeway("submit", "tests.apps.basic:add", "1", "2", "--tier", "urgent", "--app", "tests.apps.basic:app",
                     "--store", store_url)

    assert result.returncode == 2
    assert "tier 'urgent' is unknown" in result.stderr
    assert app.store.jobs() == []


def test_submit_rejects_negative_timeout(app, store_url):
    result = makeway("submit", "tests.apps.basic:add", "1", "2", "--app", "tests.apps.basic:app", "--store", store_url,
                     "--wait", "--timeout", "-1")

    assert result.returncode == 2
    assert "--timeout -1.0 is invalid" in result.stderr
    assert app.store.jobs() == []


def test_status_rejects_bad_store_url():
    result = makeway("status", "--store", "mysql://localhost/jobs")

    assert result.returncode == 2
    assert "'mysql://localhost/jobs' has an unknown scheme" in result.stderr


def test_submit_timeout_without_wait_rejected(app, store_url):
    result = makeway("submit", "tests.apps.basic:add", "1", "2", "--app", "tests.apps.basic:app", "--store", store_url,
                     "--timeout", "5")

    assert result.returncode == 2
    assert "--timeout 5.0 has no effect without --wait" in result.stderr
    assert app.store.jobs() == []


def test_submit_rejects_non_json_kwargs(app, store_url):
    result = makeway("submit", "tests.apps.basic:add", "--kwargs", "{a: 1}", "--app", "tests.apps.basic:app",
                     "--store", store_url)

    assert result.returncode == 2
    assert "--kwargs '{a: 1}' is not JSON" in result.stderr
    assert '{"limit": 10}' in result.stderr


def test_status_rejects_missing_store(tmp_path):
    missing = tmp_path / "typo.db"

    result = makeway("status", "--store", f"sqlite:///{missing}")

    assert result.returncode == 2
    assert "does not exist" in result.stderr
    assert not missing.exists()


def test_unknown_config_key_named(tmp_path, store_url):
    config = tmp_path / "makeway.toml"
    config.write_text("[node]\nslotz = 4\n")

    result = makeway("node", "--app", "tests.apps.basic:app", "--store", store_url, "--config", str(config))

    assert result.returncode == 2
    assert "node.slotz = 4: unknown key" in result.stderr


def test_check_command_reports_ok(app, store_url):
    from typer.testing import CliRunner

    from makeway.cli import cli

    app.store  # creates the store
    result = CliRunner().invoke(cli, ["check", "--full", "--store", store_url])

    assert result.exit_code == 0, result.output
    assert "integrity_check ok" in result.output
