"""deploy/prometheus/: the rules pass promtool's checks and unit tests, use only metrics the sink
exports, and each alert has its annotations, a unit test that fires it and a runbook section."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from sink import metrics as sink_metrics
from sink.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "sink-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "sink-rules.test.yml"
OPERATIONS = ROOT / "docs" / "operations.md"

# Words of PromQL and of the rules' label names that are not metric names.
_PROMQL_WORDS = {
    "sum", "max", "min", "by", "on", "and", "or", "unless", "rate", "deriv", "changes", "absent",
    "max_over_time", "histogram_quantile", "le", "job", "instance", "topic", "partition", "cause",
    "error_class", "stage", "without", "ignoring", "increase", "avg", "count", "vector", "ALERTS",
    "alertname", "alertstate",
}


def promtool() -> str:
    """The promtool binary; missing is a failure (dev/bootstrap.sh installs it), never a skip."""
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not installed: run dev/bootstrap.sh (Debian package `prometheus`)")
    return found


def rule_groups(path: Path = RULES) -> list[dict[str, Any]]:
    data = yaml.safe_load(path.read_text())
    return list(data["groups"])


def all_rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in all_rules() if "alert" in rule]


def metric_names(expr: str) -> set[str]:
    """Names of the series an expression selects (identifiers that are not PromQL words, strings,
    durations or label names inside braces)."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\((?:job|instance|topic|partition|cause|error_class|stage|le|,|\s)+\)", "", expr)
    names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return {n for n in names if n not in _PROMQL_WORDS}


def exported_metric_names(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    # The memory limit is exported only under a limit: pretend a container's 1 GiB.
    monkeypatch.setattr(sink_metrics, "memory_limit_bytes", lambda: 1 << 30)
    m = Metrics()
    # Labelled metrics have samples only once a label set is used.
    m.set_lag("t", {0: 1})
    m.dlq.labels(error_class="ValidationError", stage="validate").inc()
    m.retries.labels(cause="db_write").inc()
    registry = m.registry
    return {sample.name for family in registry.collect() for sample in family.samples}


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_rules() -> None:
    res = run_promtool("check", "rules", str(RULES))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(all_rules())} rules found" in res.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    res = run_promtool("test", "rules", str(RULE_TESTS))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_the_unit_tests_catch_an_alert_that_fires_too_early(tmp_path: Path) -> None:
    # The same tests against rules where SinkDown waits 1 minute instead of 2 must fail.
    mutated = RULES.read_text().replace("expr: up{job=\"kafka-timescale-sink\"} == 0\n        for: 2m",
                                        "expr: up{job=\"kafka-timescale-sink\"} == 0\n        for: 1m")
    assert mutated != RULES.read_text()
    (tmp_path / "sink-rules.yml").write_text(mutated)
    shutil.copy(RULE_TESTS, tmp_path / "sink-rules.test.yml")
    res = run_promtool("test", "rules", str(tmp_path / "sink-rules.test.yml"))
    assert res.returncode != 0
    assert "alertname: SinkDown, time: 2m" in res.stdout + res.stderr


def test_rules_use_only_metrics_the_sink_exports(monkeypatch: pytest.MonkeyPatch) -> None:
    exported = exported_metric_names(monkeypatch) | {"up"}
    recorded = {rule["record"] for rule in all_rules() if "record" in rule}
    used: dict[str, set[str]] = {}
    for rule in all_rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(rule.get("alert") or rule["record"])
    unknown = {name: sorted(where) for name, where in used.items() if name not in exported | recorded}
    assert not unknown, f"metrics the sink does not export: {unknown}"
    # The check itself sees the names (an empty `used` would pass anything).
    assert {"sink_consumer_lag", "sink_db_connected", "process_resident_memory_bytes"} <= set(used)


def test_every_alert_has_summary_description_severity_and_runbook_section() -> None:
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in OPERATIONS.read_text().splitlines() if line.startswith("#")
    }
    for rule in alerts():
        name = rule["alert"]
        notes = rule.get("annotations", {})
        assert notes.get("summary") and notes.get("description"), name
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, name
        assert notes.get("runbook") == f"docs/operations.md#{name.lower()}", name
        assert name.lower() in headings, f"{name}: no section in docs/operations.md"


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {t["alertname"] for case in cases for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    silent = {t["alertname"] for case in cases for t in case.get("alert_rule_test", []) if not t.get("exp_alerts")}
    names = {rule["alert"] for rule in alerts()}
    assert names - fired == set(), "alerts no test fires"
    assert names - silent == set(), "alerts no test checks for silence"
