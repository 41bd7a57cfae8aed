"""deploy/grafana/dashboards/: the dashboard's JSON is one Grafana provisions (ids, layout,
data source, one query per target), it shows what an operator needs, and its queries use only
series the sink exports or the rules record.  tests/test_monitoring_live.py runs each query
against a real Prometheus."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.test_alert_rules import all_rules, exported_metric_names, metric_names

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "kafka-timescale-sink.json"
PANEL_TYPES = {"timeseries", "stat", "gauge", "table", "state-timeline", "bargauge"}


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def panels() -> list[dict[str, Any]]:
    return list(dashboard()["panels"])


def queries() -> list[str]:
    """Every panel target's PromQL, Grafana's variables replaced as Grafana would."""
    return [grafana_to_promql(t["expr"]) for p in panels() for t in p["targets"]]


def grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$__range", "1h")


def test_dashboard_has_a_stable_uid_a_datasource_variable_and_panels() -> None:
    d = dashboard()
    assert d["uid"] == "kafka-timescale-sink" and d["title"]
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    (var,) = d["templating"]["list"]
    assert var["type"] == "datasource" and var["query"] == "prometheus"
    assert len(panels()) >= 10


def test_panels_have_unique_ids_and_tile_a_24_column_grid_without_overlap() -> None:
    ids = [p["id"] for p in panels()]
    assert len(set(ids)) == len(ids)
    cells: set[tuple[int, int]] = set()
    for p in panels():
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"{p['title']} overlaps another panel"
        cells |= area


def test_every_panel_queries_the_datasource_variable() -> None:
    for p in panels():
        assert p["type"] in PANEL_TYPES, p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["expr"].strip(), p["title"]


def test_the_dashboard_shows_what_an_operator_needs() -> None:
    by_title = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels()}
    needs = {
        "Throughput in and out": ["sink:records_consumed:rate1m", "sink_batch_rows_sum"],
        "Lag per partition": ["sink:consumer_lag_partition:max"],
        "Batch write latency": ["sink:batch_write_seconds:p50", "sink:batch_write_seconds:p99"],
        "Rows inserted vs duplicates": ["sink:rows_inserted:rate1m", "sink:rows_duplicate:rate1m"],
        "DLQ by error class and stage": ["sink:records_dlq:rate5m", "error_class", "stage"],
        "Retries by cause": ["sink:retries:rate5m", "cause"],
        "Commit age": ["sink_seconds_since_last_commit"],
        "Connectivity": ["sink_db_connected", "sink_kafka_connected"],
        "Memory": ["process_resident_memory_bytes", "sink_memory_limit_bytes"],
    }
    for title, names in needs.items():
        assert title in by_title, title
        for name in names:
            assert name in by_title[title], f"{title}: {name}"


def test_dashboard_queries_use_only_exported_or_recorded_series(monkeypatch: pytest.MonkeyPatch) -> None:
    known = exported_metric_names(monkeypatch) | {"up"}
    known |= {rule["record"] for rule in all_rules() if "record" in rule}
    unknown = {name for expr in queries() for name in metric_names(expr)} - known
    assert not unknown


def test_every_recording_rule_is_used_by_an_alert_or_the_dashboard() -> None:
    recorded = {rule["record"] for rule in all_rules() if "record" in rule}
    text = " ".join(rule["expr"] for rule in all_rules()) + DASHBOARD.read_text()
    unused = {name for name in recorded if not re.search(re.escape(name) + r"(?![A-Za-z0-9_:])", text)}
    assert not unused
