"""WRITE_MODE=update: corrections overwrite, redeliveries change nothing, older records never
overwrite newer ones; the rule without a database, the writer and the real sink with one."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from dev import services, testkit
from sink.errors import FatalError
from sink.migrations import migrate
from sink.types import SourceRecord
from sink.upsert import VERSION_COLUMN, WriteMode, latest_per_key, versioned
from sink.writer import PgWriter

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def row(device: str, value: float, pin: str = "1") -> tuple[Any, ...]:
    return (T0, device, "analog", "temperature", pin, value, "C", "devices/x")


def src(partition: int, offset: int, ts: int | None = None) -> SourceRecord:
    return SourceRecord("t", partition, offset, None, b"", (), ts)


# --------------------------------------------------------------------------- the rule, pure

def test_the_last_record_of_a_key_in_a_partition_wins() -> None:
    rows = [row("a", 1), row("b", 1), row("a", 2), row("a", 3)]
    assert latest_per_key(rows, [src(0, 10), src(0, 11), src(0, 12), src(0, 13)]) == [1, 3]


def test_between_partitions_the_newer_timestamp_of_each_partition_s_last_record_wins() -> None:
    rows = [row("a", 1), row("a", 2), row("a", 3)]
    # Partition 0's last record (offset 2, ts 100) against partition 1's (ts 300): partition 1.
    # Partition 0's first record has the newest timestamp of all, but a later offset replaced it.
    assert latest_per_key(rows, [src(0, 1, 500), src(1, 7, 300), src(0, 2, 100)]) == [1]
    # Equal timestamps: the higher partition, whatever the order in the batch.
    assert latest_per_key(rows[:2], [src(1, 1, 100), src(0, 2, 100)]) == [0]
    assert latest_per_key(rows[:2], [src(0, 2, 100), src(1, 1, 100)]) == [1]


def test_the_version_goes_last_and_the_mode_follows_the_settings() -> None:
    assert versioned([row("a", 1)], [123]) == [(*row("a", 1), 123)]
    assert WriteMode.of("update", "kafka_timestamp") == WriteMode(update=True, versioned=True)
    assert WriteMode.of("update", "none") == WriteMode(update=True, versioned=False)
    assert WriteMode.of("ignore", "kafka_timestamp") == WriteMode()


# --------------------------------------------------------------------------- the writer, real database

def writer(schema: str, mode: WriteMode) -> PgWriter:
    settings = testkit.db_settings(schema)
    migrate(settings)
    return PgWriter(settings.conninfo(), schema, mode=mode)


def values(schema: str) -> dict[tuple[str, datetime], tuple[Any, ...]]:
    """(device, timestamp) -> value, version and (plain PostgreSQL) xmin: a rewritten row has a
    new xmin.  TimescaleDB reads compressed chunks (its policy compresses old rows) without xmin."""
    xmin = "NULL" if services.TIMESCALEDB else "xmin::text"
    with testkit.connect(schema) as conn:
        return {(r[0], r[1]): r[2:] for r in conn.execute(
            f"SELECT device_id, timestamp, value, {VERSION_COLUMN}, {xmin} FROM iot_measurements").fetchall()}


@pytest.mark.integration
@pytest.mark.both_servers
def test_the_writer_updates_what_differs_and_counts_each_outcome(schema: str) -> None:
    w = writer(schema, WriteMode(update=True))
    try:
        first = w.write([row("a", 1), row("b", 1)])
        assert (first.inserted, first.updated, first.duplicates) == (2, 0, 0)
        before = values(schema)
        again = w.write([row("a", 1), row("b", 2), row("c", 1)])  # a: same; b: corrected; c: new
        assert (again.inserted, again.updated, again.duplicates) == (1, 1, 1)
        assert again.duplicate_indexes == (0,) and again.updated_indexes == (1,)
        after = values(schema)
        assert after["a", T0] == before["a", T0]  # same xmin: the identical row was not rewritten
        assert after["b", T0][0] == 2.0 and after["c", T0][0] == 1.0
    finally:
        w.close()


@pytest.mark.integration
@pytest.mark.both_servers
def test_an_older_version_never_overwrites_a_newer_one(schema: str) -> None:
    w = writer(schema, WriteMode(update=True, versioned=True))
    try:
        w.write([(*row("a", 1), 100)])
        assert w.write([(*row("a", 2), 300)]).updated == 1  # a correction
        old = w.write([(*row("a", 1), 100)])  # the first record again, re-applied late
        assert (old.inserted, old.updated, old.duplicates) == (0, 0, 1)
        assert w.write([(*row("a", 2), 300)]).duplicates == 1  # the correction redelivered
        assert w.write([(*row("a", 3), 300)]).updated == 1  # same timestamp, later in Kafka's order
        assert values(schema)["a", T0][:2] == (3.0, 300)
    finally:
        w.close()


@pytest.mark.integration
@pytest.mark.both_servers
def test_without_the_version_column_a_versioned_writer_says_which_migration_is_missing(schema: str) -> None:
    w = writer(schema, WriteMode(update=True, versioned=True))
    with testkit.connect(schema) as conn:
        conn.execute(f"ALTER TABLE iot_measurements DROP COLUMN {VERSION_COLUMN}")
    with pytest.raises(FatalError, match=r"source_version.*migration"):
        w.connect()
    w.close()


# --------------------------------------------------------------------------- the sink, real broker

def measurement(i: int, value: float, device: str = "dev-1") -> dict[str, Any]:
    return {"timestamp": 1_700_000_000 + i, "mac_address": device, "mode": "analog",
            "data_point_label": "temperature", "pin": 1, "value": value, "unit": "C", "original_topic": "devices/x"}


def table(schema: str) -> dict[int, float]:
    with testkit.connect(schema) as conn:
        return {int(ts.timestamp()) - 1_700_000_000: v for ts, v in conn.execute(
            "SELECT timestamp, value FROM iot_measurements").fetchall()}


def batch_lines(sink: testkit.SinkProcess) -> list[dict[str, Any]]:
    return [e for e in sink.events() if e.get("event") == "batch_written"]


@pytest.mark.integration
@pytest.mark.both_servers
def test_corrections_overwrite_and_three_of_a_key_in_one_batch_leave_the_last(
        sinks: Any, schema: str, topic: str, group: str) -> None:
    testkit.produce(topic, [measurement(i, 1.0) for i in range(5)], partition=0)
    sink = sinks(write_mode="update", batch_size=1000, batch_timeout=1)
    testkit.wait_drained(group, topic)
    # Corrections of records 0 and 1, and record 2 three times in what becomes one batch.
    testkit.produce(topic, [measurement(0, 10.0), measurement(1, 11.0), measurement(2, 20.0),
                            measurement(2, 21.0), measurement(2, 22.0)], partition=0)
    testkit.wait_drained(group, topic)
    assert table(schema) == {0: 10.0, 1: 11.0, 2: 22.0, 3: 1.0, 4: 1.0}
    lines = batch_lines(sink)
    assert sum(e["inserted"] for e in lines) == 5
    assert sum(e["updated"] for e in lines) == 3  # 0, 1 and 2 (its last record)
    assert sum(e["duplicates"] for e in lines) == 2  # record 2's first two, superseded in the batch
    assert sink.stop() == 0


@pytest.mark.integration
@pytest.mark.both_servers
def test_a_redelivered_batch_changes_nothing(sinks: Any, schema: str, topic: str, group: str) -> None:
    testkit.produce(topic, [measurement(i, float(i)) for i in range(50)], partition=0)
    sink = sinks(write_mode="update")
    testkit.wait_drained(group, topic)
    assert sink.stop() == 0
    before = values(schema)
    # Every record again, as after a crash before the commit: a new group starts at the beginning.
    again = f"{group}-again"
    sink = sinks(write_mode="update", kafka_group_id=again)
    testkit.wait_drained(again, topic)
    assert values(schema) == before  # the same versions, and not one row rewritten (same xmin)
    lines = batch_lines(sink)
    assert sum(e["updated"] for e in lines) == 0 and sum(e["duplicates"] for e in lines) == 50
    assert sink.stop() == 0


@pytest.mark.integration
@pytest.mark.both_servers
def test_a_replayed_old_record_does_not_overwrite_a_newer_correction(
        sinks: Any, schema: str, topic: str, group: str) -> None:
    sink = sinks(write_mode="update", dlq_breaker_enabled="false")
    testkit.wait_table(schema)
    with testkit.connect(schema) as conn:
        conn.execute("ALTER TABLE iot_measurements ADD CONSTRAINT not_too_hot CHECK (value < 1000)")
    # Record 0 is refused (to the DLQ); its correction, later, is written; record 1 likewise
    # refused, with no correction.
    testkit.produce(topic, [measurement(0, 5000.0), measurement(1, 6000.0)], partition=0)
    testkit.wait_drained(group, topic)
    time.sleep(0.01)
    testkit.produce(topic, [measurement(0, 50.0)], partition=0)
    testkit.wait_drained(group, topic)
    assert sink.stop() == 0
    assert table(schema) == {0: 50.0}
    with testkit.connect(schema) as conn:
        conn.execute("ALTER TABLE iot_measurements DROP CONSTRAINT not_too_hot")
    env = testkit.sink_env(schema, topic, group, write_mode="update")
    p = subprocess.run([sys.executable, "-m", "dlq", "replay", "--json"], env=env, cwd=testkit.ROOT,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-4000:]
    counts = json.loads(p.stdout)["counts"]
    assert table(schema) == {0: 50.0, 1: 6000.0}  # the correction stays; record 1 goes in
    assert (counts["inserted"], counts["updated"], counts["already_present"]) == (1, 0, 1)
