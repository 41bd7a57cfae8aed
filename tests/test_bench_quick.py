"""The benchmark's quick mode: the real sink drains a small realistic topic correctly.

Correctness only (no timing asserts: the machine is shared): every valid distinct row lands,
every invalid record is in the DLQ exactly once, and the group's offsets reach the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bench.run
from bench.run import main
from dev import testkit

pytestmark = pytest.mark.integration


def leftovers() -> tuple[set[str], set[str]]:
    """The benchmark's schemas and topics that exist now."""
    with testkit.connect() as conn:
        schemas = {r[0] for r in conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bench%'")}
    topics = {t for t in testkit.admin().list_topics(timeout=10).topics if t.startswith("bench")}
    return schemas, topics


def test_quick_benchmark_drains_a_small_topic_correctly(infra: None, tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    before = leftovers()
    assert main(["--quick", "--json", str(out), "--logdir", str(tmp_path / "logs")]) == 0
    assert leftovers() == before
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


def test_a_run_failing_half_way_leaves_no_schema_or_topic_behind(infra: None, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def reference_breaks(schema: str, values: object) -> None:
        with testkit.connect() as conn:
            if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone():
                seen.append(schema)  # its fresh copy of the table exists, to be cleaned up
        raise RuntimeError("the reference design broke")

    monkeypatch.setattr(bench.run, "reference", reference_breaks)
    before = leftovers()

    with pytest.raises(RuntimeError, match="the reference design broke"):
        main(["--quick", "--records", "300", "--logdir", str(tmp_path / "logs")])
    assert len(seen) == 1 and seen[0].startswith("bench_ref")
    assert leftovers() == before
