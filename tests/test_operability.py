"""On-call questions against the real sink: metrics match what was produced, /readyz follows the
database, and the log search finds each record's fate."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dev import services, testkit

pytestmark = pytest.mark.integration


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def scrape(port: int) -> dict[str, float]:
    """Sample name (with sorted labels) -> value."""
    _, text = get(f"http://127.0.0.1:{port}/metrics")
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


@pytest.fixture
def sink(schema: str, topic: str, group: str, logdir: Path) -> Iterator[tuple[testkit.SinkProcess, int]]:
    port = testkit.closed_port()
    s = testkit.SinkProcess(testkit.sink_env(schema, topic, group, metrics_port=port, metrics_host="127.0.0.1"),
                            logdir / "sink.log").start()
    testkit.wait_for(lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200, 30, what="/healthz")
    yield s, port
    if s.alive():
        s.kill()


def record(i: int) -> dict[str, Any]:
    return {"timestamp": 1_700_000_000 + i, "mac_address": f"m{i % 5}", "value": i}


def test_metrics_match_what_was_produced(sink: tuple[testkit.SinkProcess, int], topic: str, group: str) -> None:
    proc, port = sink
    values: list[Any] = [record(i) for i in range(200)]
    values += [record(i) for i in range(20)]  # 20 duplicates
    values += [b"{broken", b"", b'{"timestamp": 1}']  # 3 invalid
    testkit.produce(topic, values, partition=0)
    ends = testkit.end_offsets(topic)
    testkit.wait_for(lambda: testkit.committed_offsets(group, topic) == {0: ends[0]}, 60, what="commit")
    m = testkit.wait_for(lambda: (lambda x: x if x.get("sink_records_consumed_total") == 223 else None)(scrape(port)),
                         10, what="consumed counter")
    assert m["sink_rows_inserted_total"] == 200
    assert m["sink_rows_duplicate_total"] == 20
    dlq = {k: v for k, v in m.items() if k.startswith("sink_records_dlq_total{")}
    assert sum(dlq.values()) == 3
    assert dlq["sink_records_dlq_total{error_class=InvalidJson,stage=decode}"] == 1
    assert dlq["sink_records_dlq_total{error_class=EmptyValue,stage=decode}"] == 1
    assert dlq["sink_records_dlq_total{error_class=ValidationError,stage=validate}"] == 1
    assert m["sink_batches_written_total"] >= 1
    # Each of the 223 records was in exactly one written batch (the histogram observes records
    # per batch, rejected ones included, as batch_written's `rows` field does).
    written = [e for e in proc.events() if e.get("event") == "batch_written"]
    assert len(written) == m["sink_batches_written_total"]
    assert m["sink_batch_rows_sum"] == sum(e["rows"] for e in written) == 223
    assert m["sink_db_connected"] == 1
    assert m["sink_dlq_breaker_tripped"] == 0
    assert m["sink_seconds_since_last_commit"] < 60
    # Lag comes from librdkafka's statistics (every 5 s): caught up means 0 on the partition.
    lag_key = f"sink_consumer_lag{{partition=0,topic={topic}}}"
    testkit.wait_for(lambda: scrape(port).get(lag_key) == 0, 20, what="consumer lag 0")
    assert proc.stop() == 0


def test_readyz_turns_unhealthy_while_postgres_is_down_and_back(sink: tuple[testkit.SinkProcess, int]) -> None:
    proc, port = sink
    ready = f"http://127.0.0.1:{port}/readyz"
    testkit.wait_for(lambda: get(ready)[0] == 200, 30, what="/readyz 200")
    services.stop_postgres("fast")
    try:
        _status, body = testkit.wait_for(lambda: (lambda r: r if r[0] == 503 else None)(get(ready)), 30,
                                        what="/readyz 503")
        assert json.loads(body)["db"] is False
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200  # alive, just not ready
    finally:
        services.start_postgres()
    testkit.wait_for(lambda: get(ready)[0] == 200, 60, what="/readyz 200 again")
    assert proc.stop() == 0


def test_log_search_tells_each_records_fate(sink: tuple[testkit.SinkProcess, int], topic: str,
                                            group: str) -> None:
    proc, _ = sink
    sent = testkit.produce(topic, [record(1), record(2), record(1), b"{broken"], partition=2)
    testkit.wait_for(lambda: testkit.committed_offsets(group, topic) == {2: 4}, 60, what="commit")
    assert proc.stop() == 0

    def verdict(offset: int) -> list[list[str]]:
        """The verdict block's lines (after `--- verdict for ...`), each split into words: the
        matching log lines printed above it mention "inserted", "duplicates" and "dlq" for
        every record of the batch, so only the verdict says what happened to this one."""
        res = subprocess.run([sys.executable, "-m", "sink", "logs", "search", str(proc.log_path), "--record",
                              f"{topic}:2:{offset}"], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        _, sep, block = res.stdout.partition(f"--- verdict for {topic}:2:{offset}\n")
        assert sep, res.stdout
        return [line.split() for line in block.splitlines()]

    def kinds(lines: list[list[str]]) -> list[str]:
        return [words[0] for words in lines]

    assert [s.offset for s in sent] == [0, 1, 2, 3]
    first = verdict(0)
    assert kinds(first) == ["inserted", "committed"], first
    assert first[0][2].startswith("batch_id=") and len(first[0]) == 3  # no "(...)" note: inserted, nothing else
    dup = verdict(2)
    assert kinds(dup) == ["duplicate", "committed"], dup
    assert " ".join(dup[0][3:]) == "(already present in the table)"
    bad = verdict(3)
    # The verdict is chronological: the pipeline logs batch_written, then the batch's record_rejected lines.
    assert kinds(bad) == ["written", "DLQ'd", "committed"], bad
    written, rejected = bad[0], bad[1]
    assert rejected[2:4] == ["stage=decode", "error_class=InvalidJson"], rejected
    assert " ".join(written[3:]) == "(its batch; this record itself went to the DLQ)", written


def test_tune_gc_freezes_the_startup_objects_and_collects_young_objects_less_often() -> None:
    # In a child process: freezing the test runner's own objects would outlive this test.
    code = ("import gc, sink.cli as c; before = gc.get_freeze_count(); c.tune_gc(); "
            "print(before, gc.get_freeze_count(), gc.get_threshold()[0] == c.GC_GEN0_THRESHOLD > 700)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    before, after, raised = out.stdout.split()
    assert int(before) == 0 and int(after) > 10_000, out.stdout
    assert raised == "True"


def test_startup_retries_show_in_metrics_while_the_database_is_unreachable(schema: str, topic: str, group: str,
                                                                             logdir: Path) -> None:
    port = testkit.closed_port()
    s = testkit.SinkProcess(testkit.sink_env(schema, topic, group, metrics_port=port, metrics_host="127.0.0.1",
                                             TIMESCALE_PORT=testkit.closed_port(), TIMESCALE_CONNECT_TIMEOUT=1,
                                             RETRY_INITIAL_BACKOFF=0.1, RETRY_MAX_BACKOFF=0.2),
                            logdir / "sink.log").start()
    try:
        testkit.wait_for(lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200, 30, what="/healthz")
        # Stuck at the migrations' connection: /metrics says so, not only the log.
        testkit.wait_for(lambda: scrape(port).get("sink_retries_total{cause=migrate}", 0) >= 2, 30,
                         what="startup retries counted in /metrics")
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200  # alive: migrating
        assert get(f"http://127.0.0.1:{port}/readyz")[0] == 503
        logged = [e for e in s.events() if e["event"] == "retrying"]
        assert logged and {e["cause"] for e in logged} == {"migrate"}
        assert s.stop() == 0
    finally:
        if s.alive():
            s.kill()
