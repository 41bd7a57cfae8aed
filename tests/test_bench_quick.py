"""The benchmark's quick mode: the real sink drains a small realistic topic correctly.

Correctness only (no timing asserts: the machine is shared): every valid distinct row lands,
every invalid record is in the DLQ exactly once, and the group's offsets reach the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.run import main

pytestmark = pytest.mark.integration


def test_quick_benchmark_drains_a_small_topic_correctly(infra: None, tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    assert main(["--quick", "--json", str(out), "--logdir", str(tmp_path / "logs")]) == 0
    result = json.loads(out.read_text())
    data = result["dataset"]
    assert data["invalid"] > 0 and data["distinct_rows"] < data["valid"], "the data must have bad and repeated records"
    [run] = result["runs"]
    verdict = run["verdicts"]["sink"]
    assert verdict["rows_found"] == verdict["rows_expected"] == data["distinct_rows"]
    assert verdict["rows_missing"] == 0 and verdict["rows_unexpected"] == 0
    assert verdict["dlq_found"] == verdict["dlq_expected"] == data["invalid"]
    # Each invalid record's own (partition, offset), named by the DLQ headers, exactly once.
    assert verdict["dlq_missing"] == verdict["dlq_repeated"] == verdict["dlq_unexpected"] == 0
    assert verdict["offsets_committed"] == verdict["offsets_end"]
    assert sum(verdict["offsets_end"].values()) == data["records"]
    assert run["sinks"]["sink"]["records"] == data["records"]
    assert run["reference"]["rows"] == run["ceiling"]["rows"] == data["distinct_rows"]
