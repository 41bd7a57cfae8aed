"""The sink as a real process against the real local Kafka broker and PostgreSQL."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import psycopg
import pytest

from dev import services, testkit
from sink.envelope import H_CLASS, H_OFFSET, H_PARTITION, H_STAGE, H_TOPIC, parse_headers

pytestmark = [pytest.mark.integration, pytest.mark.both_servers]


def measurement(i: int, device: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"timestamp": 1_700_000_000 + i, "mac_address": device or f"dev-{i % 7}", "mode": "analog",
            "data_point_label": "temperature", "pin": i % 4, "value": i / 10, "unit": "C",
            "original_topic": "devices/x", **extra}


def wait_committed(group: str, topic: str, want: dict[int, int], timeout: float = 60) -> None:
    want = {p: o for p, o in want.items() if o > 0}
    testkit.wait_for(lambda: testkit.committed_offsets(group, topic) == want, timeout,
                     what=f"committed offsets {want}")


def test_valid_messages_land_exactly_once_and_offsets_reach_the_end(sinks: Any, schema: str, topic: str,
                                                                    group: str) -> None:
    msgs = [measurement(i) for i in range(900)]
    for p in range(3):
        testkit.produce(topic, msgs[p::3], partition=p)
    sink = sinks()
    wait_committed(group, topic, testkit.end_offsets(topic))
    rows = testkit.rows(schema, order="timestamp")
    assert len(rows) == 900
    first = rows[0]
    assert first[1:] == ("dev-0", "analog", "temperature", "0", 0.0, "C", "devices/x")
    assert [r[5] for r in rows] == [i / 10 for i in range(900)]
    assert sink.stop() == 0
    assert testkit.read_all(f"{topic}.dlq") == []


def test_same_messages_again_insert_nothing_new(sinks: Any, schema: str, topic: str, group: str) -> None:
    testkit.produce(topic, [measurement(i) for i in range(300)])
    testkit.produce(topic, [measurement(i) for i in range(300)])  # delivered twice
    sink = sinks()
    wait_committed(group, topic, testkit.end_offsets(topic))
    assert testkit.row_count(schema) == 300
    assert sink.stop() == 0
    second = sinks(kafka_group_id=group + "-again")
    wait_committed(group + "-again", topic, testkit.end_offsets(topic))
    assert testkit.row_count(schema) == 300
    assert second.stop() == 0
    written = [e for s in (sink, second) for e in s.events() if e["event"] == "batch_written"]
    assert sum(e["inserted"] for e in written) == 300
    assert sum(e["duplicates"] for e in written) == 900
    # Each batch's INSERT is a part of its write.
    assert all(0 <= e["insert_ms"] <= e["latency_ms"] for e in written) and sum(e["insert_ms"] for e in written) > 0


BAD = {
    "tombstone": None,
    "empty": b"",
    "not_utf8": b"\xff\xfe\x00garbage",
    "not_json": b"{nope",
    "not_object": b"[1, 2]",
    "missing_device": json.dumps({"timestamp": 1_700_000_000}).encode(),
    "bad_timestamp": json.dumps({"timestamp": "yesterday", "mac_address": "a"}).encode(),
    "nan_value": json.dumps({"timestamp": 1_700_000_000, "mac_address": "a", "value": "NaN"}).encode(),
    "too_long": json.dumps({"timestamp": 1_700_000_000, "mac_address": "a" * 51}).encode(),
    "nul_char": json.dumps({"timestamp": 1_700_000_000, "mac_address": "a\u0000b"}).encode(),
    "year_10000": json.dumps({"timestamp": "10000-01-01T00:00:00Z", "mac_address": "a"}).encode(),
}


def test_each_bad_kind_goes_to_dlq_with_original_bytes_and_headers(sinks: Any, schema: str, topic: str,
                                                                   group: str) -> None:
    values: list[bytes | None] = []
    for i, v in enumerate(BAD.values()):
        values += [json.dumps(measurement(i)).encode(), v]
    keys = [f"k{i}".encode() for i in range(len(values))]
    sent = testkit.produce(topic, values, partition=1, keys=keys, headers=[("trace-id", b"abc")])
    sink = sinks()
    wait_committed(group, topic, testkit.end_offsets(topic))
    assert testkit.row_count(schema) == len(BAD)
    dlq = testkit.read_all(f"{topic}.dlq")
    assert len(dlq) == len(BAD)
    by_offset = {int(d.headers[H_OFFSET]): d for d in dlq}
    for s in sent:
        if s.offset % 2 == 0:
            continue
        d = by_offset[s.offset]
        assert d.value == s.value and d.key == s.key
        assert d.headers["trace-id"] == b"abc"
        assert d.headers[H_TOPIC] == topic.encode() and d.headers[H_PARTITION] == b"1"
        assert d.headers[H_STAGE] in (b"decode", b"validate")
        info = parse_headers(list(d.headers.items()))
        assert info.failed_at is not None and info.attempt == 1 and info.error_class
    classes = sorted(d.headers[H_CLASS].decode() for d in dlq)
    assert classes.count("EmptyValue") == 2 and "InvalidUtf8" in classes and "NotAnObject" in classes
    assert sink.alive()
    assert sink.stop() == 0


def test_row_violating_an_added_constraint_goes_alone_to_dlq(sinks: Any, schema: str, topic: str,
                                                             group: str) -> None:
    sink = sinks()
    testkit.wait_table(schema, 30)
    with testkit.connect(schema) as conn:
        conn.execute("ALTER TABLE iot_measurements ADD CONSTRAINT value_below_1000 CHECK (value < 1000)")
    msgs = [measurement(i) for i in range(200)]
    msgs[123]["value"] = 5000
    testkit.produce(topic, msgs, partition=0)
    wait_committed(group, topic, testkit.end_offsets(topic))
    assert testkit.row_count(schema) == 199
    dlq = testkit.read_all(f"{topic}.dlq")
    assert len(dlq) == 1
    d = dlq[0]
    assert d.headers[H_OFFSET] == b"123" and d.headers[H_STAGE] == b"write"
    assert d.headers[H_CLASS] == b"CheckViolation"
    assert parse_headers(list(d.headers.items())).sqlstate == "23514"
    assert json.loads(d.value or b"")["value"] == 5000
    assert sink.stop() == 0


def test_postgres_down_no_commit_no_dlq_then_every_row_lands(sinks: Any, schema: str, topic: str,
                                                             group: str) -> None:
    sink = sinks()
    testkit.produce(topic, [measurement(i) for i in range(300)], partition=0)
    wait_committed(group, topic, testkit.end_offsets(topic))
    before = testkit.committed_offsets(group, topic)
    services.stop_postgres("fast")
    try:
        testkit.produce(topic, [measurement(i) for i in range(300, 600)], partition=0)
        # Several batch timeouts (0.3 s each) and retries pass while it is down.
        for _ in range(8):
            time.sleep(0.5)
            assert testkit.committed_offsets(group, topic) == before
        assert sink.alive()
    finally:
        services.start_postgres()
    wait_committed(group, topic, testkit.end_offsets(topic))
    assert testkit.row_count(schema) == 600
    assert testkit.read_all(f"{topic}.dlq") == []
    events = [e["event"] for e in sink.events()]
    assert "retrying" in events and "recovered" in events
    # The retried failures are named by psycopg's own classes (OperationalError, AdminShutdown, ...).
    classes = {e["error_class"] for e in sink.events() if e["event"] == "retrying"}
    assert classes <= set(dir(psycopg)) | set(dir(psycopg.errors)), classes
    assert sink.stop() == 0


def test_sigterm_mid_stream_exits_0_and_restart_finishes_without_loss(sinks: Any, schema: str, topic: str,
                                                                      group: str) -> None:
    total = 30_000  # 600 batches of 50 for the first sink: it cannot be done when SIGTERM lands
    sink = sinks(batch_size=50)
    testkit.produce(topic, [measurement(i) for i in range(total)])
    testkit.wait_for(lambda: any(e["event"] == "batch_written" for e in sink.events()), 30,
                     what="a first written batch")
    sink.signal(signal.SIGTERM)
    assert sink.wait(30) == 0
    assert "sink_stopped" in [e["event"] for e in sink.events()]
    # What was written before the stop is committed, and the stop came mid-stream.
    committed = testkit.committed_offsets(group, topic)
    assert 0 < sum(committed.values()) < total
    second = sinks(batch_size=500)
    wait_committed(group, topic, testkit.end_offsets(topic))
    assert testkit.row_count(schema) == total
    assert second.stop() == 0


def test_invalid_configuration_fails_fast_naming_the_variable(sinks: Any) -> None:
    sink = sinks(batch_size="lots", timescale_password="s3cret-pw")
    assert sink.wait(30) == 2
    text = sink.log_text()
    assert "BATCH_SIZE" in text
    assert "s3cret-pw" not in text
