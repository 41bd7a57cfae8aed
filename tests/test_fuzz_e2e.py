"""The sink, as a real process, fed a seeded mix of hostile records over several partitions: every
input offset ends in exactly one place (its row, or one DLQ record with its original value, key
and headers and its true origin), no duplicate rows, offsets committed to the end, exit 0 on
SIGTERM, no traceback.  FUZZ_SEED reproduces a run (the seed is printed); FUZZ_RECORDS runs more."""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition

from dev import services, testkit
from sink.decode import decode
from sink.envelope import H_UNREADABLE, original_headers, parse_headers
from sink.produce import produce_waiting
from sink.types import Rejection, SourceRecord
from tests.hostile import Hostile, generate
from tests.raw_produce import produce_raw

pytestmark = [pytest.mark.integration]

RULED = {"EmptyValue", "InvalidUtf8", "InvalidJson", "NotAnObject", "ValidationError"}


def read_exact(topic: str) -> list[Any]:
    """Every record of `topic` with its headers as a list, in order (duplicates and all)."""
    ends = {p: o for p, o in testkit.end_offsets(topic).items() if o > 0}
    c = Consumer({"bootstrap.servers": services.KAFKA_BOOTSTRAP, "group.id": testkit.unique_name("r"),
                  "enable.auto.commit": False, "isolation.level": "read_committed", "enable.partition.eof": True})
    out: list[Any] = []
    try:
        c.assign([TopicPartition(topic, p, 0) for p in ends])
        done: set[int] = set()
        deadline = time.monotonic() + 60
        while len(done) < len(ends) and time.monotonic() < deadline:
            for m in c.consume(500, 0.5):
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        done.add(m.partition())
                        continue
                    raise AssertionError(f"reading {topic}: {err}")
                out.append(m)
                if m.offset() >= ends[m.partition()] - 1:
                    done.add(m.partition())
    finally:
        c.close()
    return [(m.partition(), m.offset(), m.key(), m.value(), tuple(m.headers() or ())) for m in out]


def produce_all(topic: str, records: list[Hostile], partitions: int,
                rng: random.Random) -> dict[tuple[int, int], Hostile]:
    """Each record to a random partition; where each landed.  Records the Python client cannot
    send go by hand, after what was produced before them has been acknowledged (order kept)."""
    p = testkit.producer(**{"message.max.bytes": 2_000_000})
    where: dict[tuple[int, int], Hostile] = {}
    errors: list[Any] = []

    def acked(rec: Hostile) -> Any:
        def on_ack(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(err)
            else:
                where[(msg.partition(), msg.offset())] = rec
        return on_ack

    for rec in records:
        partition = rng.randrange(partitions)
        if rec.raw:
            p.flush(60)
            headers = [(n if isinstance(n, bytes) else n.encode(), v) for n, v in rec.headers]
            offset = produce_raw(services.KAFKA_BOOTSTRAP, topic, partition, [(rec.key, rec.value, headers)])
            where[(partition, offset)] = rec
            continue
        kw: dict[str, Any] = {"key": rec.key, "value": rec.value, "partition": partition, "on_delivery": acked(rec)}
        if rec.headers:
            kw["headers"] = list(rec.headers)
        produce_waiting(p, topic, **kw)
        p.poll(0)
    assert p.flush(60) == 0 and not errors, errors[:3]
    assert len(where) == len(records)
    return where


def headers_as_read(rec: Hostile) -> tuple[Any, ...]:
    """The record's headers as the sink's Kafka client hands them over (names cut at a NUL)."""
    return tuple((str(n).split("\x00")[0], v) for n, v in rec.headers)


def test_every_hostile_record_ends_in_exactly_one_place(schema: str, topic: str, group: str, logdir: Path) -> None:
    seed = int(os.environ.get("FUZZ_SEED") or random.randrange(2**32))
    count = int(os.environ.get("FUZZ_RECORDS", "2000"))
    print(f"fuzz: FUZZ_SEED={seed} FUZZ_RECORDS={count}")
    records = generate(seed, count, topic)
    started = time.monotonic()
    where = produce_all(topic, records, 3, random.Random(seed))
    sink = testkit.SinkProcess(testkit.sink_env(schema, topic, group, DLQ_BREAKER_ENABLED="false", BATCH_SIZE="300"),
                               logdir / "sink.log").start()
    try:
        ends = {p: o for p, o in testkit.end_offsets(topic).items() if o > 0}
        sink.stop_once_committed(group, topic, ends, timeout=180)
    finally:
        if sink.alive():
            sink.kill()
    elapsed = time.monotonic() - started
    kinds = Counter(r.kind for r in records)
    print(f"fuzz: {count} records of {len(kinds)} kinds in {elapsed:.1f} s: {dict(sorted(kinds.items()))}")

    log = sink.log_text()
    assert "Traceback" not in log, f"seed {seed}: a traceback in the sink's log"
    assert not [e for e in sink.events() if e.get("event") == "record_fault"], f"seed {seed}: the safety net caught one"

    dlq = read_exact(f"{topic}.dlq")
    by_origin: dict[tuple[int, int], Any] = {}
    for _, _, key, value, headers in dlq:
        info = parse_headers(headers)
        assert info.topic == topic and info.attempt == 1, (seed, info)
        origin = (info.partition, info.offset)
        assert origin not in by_origin, f"seed {seed}: two DLQ records for {origin}"
        by_origin[origin] = (key, value, headers, info)  # type: ignore[assignment]

    with testkit.connect(schema) as conn:
        table = {(r[0], r[1], r[2], r[3], r[4]): r for r in conn.execute(
            "SELECT timestamp, device_id, connector_mode, component_type, pin_position, value, unit, topic "
            "FROM iot_measurements").fetchall()}
    expected_rows: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for (partition, offset), rec in sorted(where.items()):
        out = decode(SourceRecord(topic, partition, offset, rec.key, rec.value))
        here = f"seed {seed}, {rec.kind} at {partition}/{offset}"
        if isinstance(out, Rejection):
            assert (partition, offset) in by_origin, f"{here}: rejected ({out.error_class}) but not in the DLQ"
            key, value, headers, info = by_origin.pop((partition, offset))
            assert (key, value) == (rec.key, rec.value), here
            assert info.error_class == out.error_class and info.error_class in RULED, (here, info)
            if rec.raw:
                assert original_headers(headers) == () and any(k == H_UNREADABLE for k, _ in headers), here
            else:
                assert original_headers(headers) == headers_as_read(rec), here
        else:
            assert (partition, offset) not in by_origin, f"{here}: a valid record in the DLQ"
            assert table.get(out[:5]) == out, f"{here}: its row is missing or differs"
            expected_rows[out[:5]] = out
    assert not by_origin, f"seed {seed}: DLQ records with no input: {sorted(by_origin)[:5]}"
    assert len(table) == len(expected_rows), f"seed {seed}: rows the input does not explain"
    assert testkit.committed_offsets(group, topic) == ends
