"""The web dashboard in a real headless Chromium, and the API against its own OpenAPI spec."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from makeway import JobState
from makeway.web.server import free_port
from tests.apps import basic
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(180)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As root, Chromium needs --no-sandbox; the other flags keep it from
# reaching out to the network at start.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TOKEN = "test-token-for-changes"


@pytest.fixture
def browser_page():
    from playwright.sync_api import sync_playwright

    if not shutil.which("chromium") and not shutil.os.path.exists(CHROMIUM):
        pytest.fail("Debian's chromium package is missing; .ci/run installs it with apt")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page()
        problems: list[str] = []
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        yield page, problems
        browser.close()


def test_dashboard_draws_and_cancels(app, start_node, browser_page):
    page, problems = browser_page
    port = free_port()
    start_node(f"[node]\nslots = 2\n\n[http]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\n")
    long_job = basic.slow_progress.submit(600, 0.05)
    wait_until(lambda: long_job.status() is JobState.RUNNING, message="long job running")
    for value in range(5):
        assert basic.add.submit(value, 1).result(timeout=30) == value + 1

    page.goto(f"http://127.0.0.1:{port}/")
    page.wait_for_function("Number(document.body.dataset.updates || 0) >= 3", timeout=30_000)

    # Charts draw the node's figures: the interactive p99 and the running bulk job.
    assert page.locator("#chart-latency canvas").count() == 1
    assert page.evaluate("charts.latency.data[1].some(value => value !== null && value > 0)")
    assert page.evaluate("charts.backlog.data[0].length") >= 3
    row = page.locator(f'tr[data-job="{long_job.id}"]')
    assert "running" in row.inner_text() or "suspended" in row.inner_text()

    # Without the token the page's request is refused and the job keeps running.
    row.locator('button[data-action="cancel"]').click()
    page.wait_for_function("document.getElementById('status').className === 'error'", timeout=10_000)
    assert "token" in page.locator("#status").inner_text()
    time.sleep(0.5)
    assert not long_job.status().is_final

    page.fill("#token", TOKEN)
    page.locator(f'tr[data-job="{long_job.id}"] button[data-action="cancel"]').click()
    wait_until(lambda: long_job.status() is JobState.CANCELLED, message="job cancelled from the page")
    # The 401 above is the only error the page logged.
    assert [text for text in problems if "401" not in text] == []


def test_dashboard_command_serves_page(store_url, app, browser_page):
    page, problems = browser_page
    basic.add.submit(1, 2)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "makeway", "dashboard", "--listen", f"127.0.0.1:{port}",
                               "--store", store_url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = server.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_function("Number(document.body.dataset.updates || 0) >= 1", timeout=30_000)
        assert page.locator('tr[data-tier="bulk"]').count() == 1
        assert page.locator("#jobs tbody tr").count() == 1
        assert problems == []
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_api_passes_schemathesis(app, start_node, tmp_path):
    port = free_port()
    start_node(f"[http]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\n")
    basic.add.submit(1, 2).result(timeout=30)
    result = subprocess.run(
        # positive_data_acceptance is left out: POST /api/jobs checks the
        # arguments against the job function's signature, which no JSON
        # schema can state, so schema-valid arguments may get a 422.
        [sys.executable, "-m", "schemathesis.cli", "run", f"http://127.0.0.1:{port}/openapi.json",
         "--checks", "all", "--exclude-checks", "positive_data_acceptance", "--max-examples", "25", "--seed", "7",
         "--header", f"Authorization: Bearer {TOKEN}"],
        capture_output=True, text=True, timeout=150, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
