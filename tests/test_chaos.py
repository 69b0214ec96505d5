"""The chaos run, short: jobs of every tier under random worker kills, suspensions and supervisor kills."""

from __future__ import annotations

import pytest

from makeway.chaos import run_chaos

pytestmark = pytest.mark.timeout(600)


def test_chaos_loses_and_duplicates_nothing(tmp_path):
    report = run_chaos(duration_s=12.0, jobs=300, workdir=tmp_path, seed=7)

    print(f"chaos: {report}")
    assert report.jobs == 300
    assert report.worker_kills > 0
    assert report.supervisor_kills > 0
    assert report.not_final == []
    assert report.final_states == {"succeeded": 300}
    assert report.wrong_results == []
    assert report.missing_rows == 0
    assert report.duplicate_rows == 0
    assert report.leftover_workers == []
