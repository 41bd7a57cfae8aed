"""The alert rules against a real Prometheus (Debian's binary) scraping a real sink: the series
arrive, every rule evaluates without error, and stopping PostgreSQL takes the database alert
through pending to firing and back to nothing."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dev import services, testkit
from dev.prometheus import PrometheusError, PrometheusServer, rules_with_short_for
from tests import test_dashboard as dashboard

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "sink-rules.yml"
JOB = "kafka-timescale-sink"
# Seconds instead of minutes; long enough that a 0.2 s poll sees the alert pending first.
SHORT_FOR = "4s"
PRODUCED = 60


class Live:
    def __init__(self, sink: testkit.SinkProcess, metrics_port: int, prom: PrometheusServer, topic: str) -> None:
        self.sink, self.metrics_port, self.prom, self.topic = sink, metrics_port, prom, topic


def value(prom: PrometheusServer, expr: str) -> float | None:
    result = prom.query(expr)
    return float(result[0]["value"][1]) if len(result) == 1 else None


@pytest.fixture(scope="module")
def live(infra: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A sink with METRICS_PORT, fed a few records, and Prometheus scraping it every second."""
    workdir = tmp_path_factory.mktemp("monitoring")
    schema, topic, group = testkit.unique_name("s"), testkit.unique_name("t"), testkit.unique_name("g")
    testkit.create_schema(schema)
    testkit.create_topic(topic, partitions=3)
    testkit.create_topic(f"{topic}.dlq", partitions=3)
    port = testkit.closed_port()
    sink = testkit.SinkProcess(testkit.sink_env(schema, topic, group, metrics_port=port, metrics_host="127.0.0.1"),
                               workdir / "sink.log").start()
    prom = PrometheusServer(workdir / "prometheus", job=JOB, targets=[f"127.0.0.1:{port}"],
                            rules_text=rules_with_short_for(RULES, SHORT_FOR))
    try:
        prom.start()
        # Produce only once Prometheus has scraped the idle sink: rate() needs the counters' zeros.
        testkit.wait_for(lambda: value(prom, f'sink_records_consumed_total{{job="{JOB}"}}') == 0, 60,
                         what="a scrape of the idle sink")
        records: list[Any] = [{"timestamp": 1_700_000_000 + i, "mac_address": f"m{i % 3}", "value": i}
                              for i in range(PRODUCED)]
        for partition in range(3):  # every partition has a position, hence a lag series
            testkit.produce(topic, records[partition::3], partition=partition)
        testkit.produce(topic, [b"{broken"], partition=0)
        yield Live(sink, port, prom, topic)
    finally:
        prom.stop()
        if sink.alive():
            sink.kill()
        services.start_postgres()  # a no-op unless a test left it down
        testkit.delete_topics([topic, f"{topic}.dlq"])
        testkit.drop_schema(schema)


def test_the_sinks_series_arrive_in_prometheus(live: Live) -> None:
    prom = live.prom
    testkit.wait_for(lambda: value(prom, f'sum(sink_rows_inserted_total{{job="{JOB}"}})') == PRODUCED
                     and value(prom, "sum(sink_records_dlq_total)") == 1, 60,
                     what=f"{PRODUCED} inserted rows and 1 DLQ record in Prometheus")
    assert value(prom, f'up{{job="{JOB}"}}') == 1
    dlq = prom.query("sink_records_dlq_total")
    assert [(s["metric"]["error_class"], s["metric"]["stage"], s["value"][1]) for s in dlq] == [
        ("InvalidJson", "decode", "1")]
    testkit.wait_for(lambda: value(prom, "sink_ready") == 1, 30, what="sink_ready 1")
    assert value(prom, "sink_db_connected") == 1 and value(prom, "sink_kafka_connected") == 1
    assert {s["metric"]["partition"] for s in prom.query(f'sink_consumer_lag{{topic="{live.topic}"}}')} == {
        "0", "1", "2"}
    assert (value(prom, "process_resident_memory_bytes") or 0) > 10_000_000
    # The recording rules produce series from them.
    testkit.wait_for(lambda: value(prom, "sink:records_consumed:rate1m") not in (None, 0.0), 30,
                     what="sink:records_consumed:rate1m > 0")
    assert value(prom, f'sink:consumer_lag:sum{{topic="{live.topic}"}}') is not None


def test_every_rule_evaluates_without_error(live: Live) -> None:
    prom = live.prom

    def evaluated() -> list[dict[str, Any]] | None:
        rules = prom.rules()
        return rules if all(r.get("lastEvaluation", "").startswith("2") and r["health"] != "unknown"
                            for r in rules) else None

    rules = testkit.wait_for(evaluated, 30, what="every rule evaluated once")
    assert len(rules) == sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    for rule in rules:
        prom.query(rule["query"])  # raises PrometheusError on a bad expression
    with pytest.raises(PrometheusError, match="bad_data"):
        prom.query("sum(")  # the API does report bad expressions


def test_every_dashboard_query_is_accepted_and_the_core_panels_show_data(live: Live) -> None:
    prom = live.prom
    testkit.wait_for(lambda: value(prom, "sum(sink:records_consumed:rate1m)") not in (None, 0.0)
                     and value(prom, "max(sink:dlq_ratio:rate5m)") is not None, 60,
                     what="recorded throughput and DLQ share")
    panels = dashboard.panels()
    assert panels
    empty = []
    for panel in panels:
        for target in panel["targets"]:
            expr = dashboard.grafana_to_promql(target["expr"])
            result = prom.query_range(expr, seconds=60)  # raises PrometheusError if refused
            if not result:
                empty.append(expr)
    # Only what this run cannot produce is empty: no retry yet, no container memory limit.
    assert all(re.search(r"retries|memory_limit", expr) for expr in empty), empty


def alert_states(prom: PrometheusServer, name: str) -> set[str]:
    return {a["state"] for a in prom.alerts() if a["labels"]["alertname"] == name}


def test_stopping_postgres_raises_the_database_alert_and_starting_it_clears_it(live: Live) -> None:
    prom = live.prom
    testkit.wait_for(lambda: value(prom, "sink_db_connected") == 1, 30, what="database connected")
    assert alert_states(prom, "SinkDatabaseDisconnected") == set()
    seen: list[tuple[float, frozenset[str]]] = []

    def firing() -> bool:
        states = alert_states(prom, "SinkDatabaseDisconnected")
        seen.append((time.monotonic(), frozenset(states)))
        return states == {"firing"}

    services.stop_postgres("fast")
    try:
        testkit.wait_for(firing, 90, interval=0.2, what="SinkDatabaseDisconnected firing")
    finally:
        services.start_postgres()
    # `for:` respected: pending first, for about SHORT_FOR, before firing.
    pending = [t for t, states in seen if states == {"pending"}]
    assert pending, f"never seen pending: {seen}"
    fired_at = seen[-1][0]
    assert fired_at - pending[0] >= 4 - 1.5  # scrape and evaluation each run every second
    alert = next(a for a in prom.alerts() if a["labels"]["alertname"] == "SinkDatabaseDisconnected")
    assert alert["labels"]["instance"] == f"127.0.0.1:{live.metrics_port}"
    assert alert["annotations"]["runbook"] == "docs/operations.md#sinkdatabasedisconnected"
    # The sink is alive all along: the outage is a retry, not a crash.
    assert live.sink.alive() and alert_states(prom, "SinkDown") == set()

    testkit.wait_for(lambda: alert_states(prom, "SinkDatabaseDisconnected") == set(), 90,
                     what="SinkDatabaseDisconnected cleared")
    assert value(prom, "sink_db_connected") == 1


def test_a_killed_sink_raises_sink_down(live: Live) -> None:
    # Last in the module: the sink does not come back.
    prom = live.prom
    assert alert_states(prom, "SinkDown") == set()
    live.sink.kill()
    testkit.wait_for(lambda: alert_states(prom, "SinkDown") == {"firing"}, 60, what="SinkDown firing")
    assert value(prom, f'up{{job="{JOB}"}}') == 0
