"""The benchmark's input (sink.demo's realistic records) and what a correct sink makes of it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Producer
from pydantic import ValidationError

from dev import services
from sink.demo import records
from sink.model import IotMeasurement, Row, as_row, row_key
from sink.produce import produce_waiting

DEVICES = 1000
INVALID_SHARE = 0.01
DUPLICATE_SHARE = 0.05
PARTITIONS = 3



@dataclass(frozen=True)
class Dataset:
    """N Kafka values and the oracle: which are invalid, which rows must land."""

    values: list[bytes]
    invalid_indexes: tuple[int, ...]  # positions in `values` of the records the model rejects
    valid_rows: list[Row]  # every valid record's row, in input order, repeats included
    expected: dict[tuple[Any, ...], frozenset[Row]]  # primary key -> the rows that may hold it

    @property
    def invalid(self) -> int:
        return len(self.invalid_indexes)

    @property
    def distinct_rows(self) -> list[Row]:
        """One row per primary key, first occurrence first: what the ceiling COPY writes."""
        seen: set[tuple[Any, ...]] = set()
        out: list[Row] = []
        for row in self.valid_rows:
            key = row_key(row)
            if key not in seen:
                seen.add(key)
                out.append(row)
        return out

    def describe(self) -> dict[str, Any]:
        return {"records": len(self.values), "invalid": self.invalid, "valid": len(self.valid_rows),
                "distinct_rows": len(self.expected), "devices": DEVICES, "partitions": PARTITIONS,
                "bytes": sum(map(len, self.values))}


def make_dataset(count: int, seed: int = 8, duplicate_share: float = DUPLICATE_SHARE,
                 correction_share: float = 0.0) -> Dataset:
    """Realistic records (mixed timestamp formats, ~1% invalid, ~5% repeats unless told, and
    `correction_share` corrections of earlier keys) and their oracle: a key may hold any of its
    records' rows (which one is the write mode's business, tested in tests/test_upserts.py).

    The oracle validates each value with the model on its own (the reference path), so a sink
    that batches or short-cuts validation is checked against the plain per-record rules.
    """
    values = list(records(count, seed=seed, devices=DEVICES, invalid_share=INVALID_SHARE,
                          duplicate_share=duplicate_share, correction_share=correction_share,
                          start=time.time() - count / 1000))
    validate = IotMeasurement.__pydantic_validator__.validate_json
    rows: list[Row] = []
    invalid: list[int] = []
    expected: dict[tuple[Any, ...], set[Row]] = {}
    for i, v in enumerate(values):
        try:
            row: Row = as_row(validate(v))
        except ValidationError:
            invalid.append(i)
            continue
        rows.append(row)
        expected.setdefault(row_key(row), set()).add(row)
    return Dataset(values, tuple(invalid), rows, {k: frozenset(v) for k, v in expected.items()})


def preload(topic: str, values: Sequence[bytes]) -> dict[int, int]:
    """Produce every value (keyless, round robin over the partitions so that each gets a third)
    and wait for all acks.  Returns the number of records that landed per partition."""
    p = Producer({"bootstrap.servers": services.KAFKA_BOOTSTRAP, "linger.ms": 50, "batch.size": 1_000_000,
                  "enable.idempotence": True, "queue.buffering.max.messages": 200_000})
    landed: dict[int, int] = {}
    errors: list[Any] = []

    def on_ack(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(err)
        else:
            landed[msg.partition()] = landed.get(msg.partition(), 0) + 1

    for i, v in enumerate(values):
        produce_waiting(p, topic, 0.05, value=v, partition=i % PARTITIONS, on_delivery=on_ack)
        p.poll(0)
    left = p.flush(120)
    if left or errors:
        raise RuntimeError(f"preload of {topic} failed: {left} unacknowledged, errors={errors[:3]}")
    return landed
