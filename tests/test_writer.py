"""PgWriter against the real database: which rows of a batch were new and which were
duplicates, when the batch repeats keys of its own and of earlier batches; and a write waiting
for the batch before it keeps its session."""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dev import testkit
from sink import writer as writer_module
from sink.batcher import Batch, Batcher
from sink.errors import RetryableError
from sink.migrations import migrate
from sink.model import COLUMNS, PRIMARY_KEY
from sink.types import SourceRecord
from sink.write_stage import InFlight, Turn, WriteStage
from sink.writer import PgWriter

pytestmark = [pytest.mark.integration, pytest.mark.both_servers]

PK = tuple(COLUMNS.index(c) for c in PRIMARY_KEY)
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def writer(schema: str) -> PgWriter:
    st = testkit.db_settings(schema)
    migrate(st)
    return PgWriter(st.conninfo(), schema)


def row(rnd: random.Random, i: int) -> tuple[Any, ...]:
    # Text of very different lengths, so COPY fills the stage's pages out of order (the case
    # where a plain scan of the stage returns rows out of batch order).
    device = f"dev-{rnd.randrange(40)}"
    return (T0 + timedelta(seconds=rnd.randrange(60)), device, "m", "c", str(rnd.randrange(3)), float(i), "u",
            "t" * rnd.choice([1, 5, 200, 255]))


def test_duplicates_are_the_rows_whose_key_existed_or_came_earlier_in_the_batch(schema: str) -> None:
    rnd = random.Random(7)
    w = writer(schema)
    existing: set[tuple[Any, ...]] = set()
    first_value: dict[tuple[Any, ...], float] = {}
    total = 0
    for _batch in range(4):
        rows = [row(rnd, total + i) for i in range(3000)]
        total += len(rows)
        expected = []
        for i, r in enumerate(rows):
            k = tuple(r[j] for j in PK)
            if k in existing:
                expected.append(i)
            else:
                existing.add(k)
                first_value[k] = r[5]
        t0 = time.perf_counter()
        result = w.write(rows)
        elapsed = time.perf_counter() - t0
        assert 0 < result.insert_s < elapsed  # the INSERT's part of the write
        assert result.duplicate_indexes == tuple(expected)
        assert (result.inserted, result.duplicates) == (len(rows) - len(expected), len(expected))
    w.close()
    with testkit.connect(schema) as conn:
        stored = conn.execute("SELECT timestamp, device_id, connector_mode, component_type, pin_position, value "
                              "FROM iot_measurements").fetchall()
    # Of two rows with one key, the first in the batch is the one stored.
    assert {tuple(r[:5]): r[5] for r in stored} == first_value


def test_a_batch_of_new_rows_is_counted_without_matching_keys_and_a_repeat_still_is(schema: str) -> None:
    # All rows new: write() answers from the returned row count, without fetching the keys.
    w = writer(schema)
    rows = [(T0 + timedelta(milliseconds=i), f"dev-{i % 7}", "m", "c", "1", float(i), "u", "t") for i in range(2500)]
    result = w.write(rows)
    assert (result.inserted, result.duplicates, result.duplicate_indexes) == (2500, 0, ())
    assert result.insert_s > 0
    # Some of the same rows again around one new row: all but the new one are duplicates.
    extra = (T0 - timedelta(seconds=1), "dev-x", "m", "c", "1", 0.0, "u", "t")
    again = w.write([*rows[:10], extra, *rows[10:20]])
    assert (again.inserted, again.duplicates) == (1, 20)
    assert again.duplicate_indexes == (*range(10), *range(11, 21))
    w.close()
    with testkit.connect(schema) as conn:
        assert conn.execute("SELECT count(*) FROM iot_measurements").fetchone() == (2501,)


def test_a_write_waiting_for_the_previous_batch_keeps_its_session(schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Between its COPY and its INSERT a batch waits for the batch before it, idle in a
    # transaction; the server ends such a session after idle_in_transaction_session_timeout
    # (20 s; 1 s here), so the pipeline's wait sends keepalives (every 5 s; 0.3 s here).
    monkeypatch.setitem(writer_module.SESSION_SETTINGS, "idle_in_transaction_session_timeout", "1s")
    w = writer(schema)
    rows = [row(random.Random(1), i) for i in range(10)]

    def previous_batch_in_after(seconds: float) -> threading.Event:
        done = threading.Event()
        threading.Timer(seconds, done.set).start()
        return done

    turn = Turn([previous_batch_in_after(2.5)], every=0.3)
    assert w.write(rows, turn).inserted == len(set(
        tuple(r[j] for j in PK) for r in rows))
    # Without the keepalives the server ends the session: a retryable error, the batch retried.
    turn = Turn([previous_batch_in_after(2.5)], every=60.0)
    with pytest.raises(RetryableError):
        w.write(rows, turn)
    w.close()


def test_statements_are_never_prepared_on_the_server(schema: str) -> None:
    # psycopg prepares a statement on its 6th run on a connection, in a round trip of its own;
    # the writer sends each INSERT whole instead (sink/writer.py, connect).
    w = writer(schema)
    rnd = random.Random(3)
    for i in range(8):
        w.write([row(rnd, 10 * i + j) for j in range(10)])
    conn = w._conn
    assert conn is not None
    assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)
    conn.rollback()
    w.close()


def overlapping(round_: int, n: int, partition: int, reverse: bool) -> Batch:
    """n rows whose keys the other partition's batch has too, in the opposite order."""
    batcher = Batcher(n, 60.0)
    order = range(n - 1, -1, -1) if reverse else range(n)
    for k, i in enumerate(order):
        key_row = (T0 + timedelta(days=round_, seconds=i), f"dev-{i % 7}", "m", "c", "1", float(partition), "u", "t")
        batcher.add(SourceRecord("t", partition, k, None, b"{}"), key_row)
    return batcher.take()


def test_two_writers_on_overlapping_keys_never_deadlock(schema: str) -> None:
    # Two batches of different partitions (they insert side by side) holding the same 3,000 keys,
    # one in the reverse order of the other.  Each goes in primary-key order, so one INSERT waits
    # for the other on the first shared key and neither waits on the other: no deadlock (40P01).
    writers = [writer(schema), writer(schema)]
    stage = WriteStage(writers, "t", max_splits=8)

    def first_attempt_only(attempt: Any) -> Any:
        return attempt()  # a deadlock would be a RetryableError here

    try:
        for round_ in range(5):
            stage.submit(InFlight(overlapping(round_, 3000, 0, reverse=False)))
            stage.submit(InFlight(overlapping(round_, 3000, 1, reverse=True)))
            a, b = stage.result(first_attempt_only), stage.result(first_attempt_only)
            assert a.result.inserted + b.result.inserted == 3000
            assert a.result.duplicates + b.result.duplicates == 3000
    finally:
        stage.close()
        for w in writers:
            w.close()
    assert testkit.row_count(schema) == 5 * 3000
