"""dlq.reader.DlqReader: a consumer error between records loses none of them, and a replay
commits only past records it replayed (fake consumer, no Kafka)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
from confluent_kafka import KafkaError

from dlq.reader import DlqReader, PartitionRange
from dlq.replay import Outcome, Replayer, ReplayOptions
from sink.envelope import to_dlq_record
from sink.errors import RetryableError
from sink.retry import RetryPolicy
from sink.types import Rejection, SourceRecord
from tests.fakes import ListOutbox

DLQ = "in.dlq"


@dataclass
class FakeMessage:
    """What DlqReader reads of a confluent_kafka.Message: a record, or an error (no record)."""

    part: int
    off: int
    err: KafkaError | None = None
    val: bytes | None = b"{}"
    hdrs: tuple[tuple[str, bytes | None], ...] = ()

    def error(self) -> KafkaError | None:
        return self.err

    def partition(self) -> int:
        return self.part

    def offset(self) -> int:
        return self.off

    def topic(self) -> str:
        return DLQ

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes | None:
        return self.val

    def headers(self) -> list[tuple[str, bytes | None]]:
        return list(self.hdrs)

    def timestamp(self) -> tuple[int, int]:
        return 1, 1_700_000_000_000


def rec(part: int, off: int) -> FakeMessage:
    """A DLQ record as the sink makes one, with a value the current validation accepts."""
    value = json.dumps({"timestamp": 1_700_000_000 + off, "mac_address": "dev", "value": off}).encode()
    env = to_dlq_record(Rejection(SourceRecord("in", 0, off, b"k", value, (), 1), "write", "CheckViolation", "no"))
    return FakeMessage(part, off, val=env.value, hdrs=env.headers)


def broken(code: int = KafkaError._TRANSPORT) -> FakeMessage:
    # librdkafka's error messages carry no record: offset -1001 (OFFSET_INVALID).
    return FakeMessage(0, -1001, err=KafkaError(code, "broker transport failure"))


def eof(part: int, off: int) -> FakeMessage:
    return FakeMessage(part, off, err=KafkaError(KafkaError._PARTITION_EOF))


class ListConsumer:
    """consume() hands out the given lists, one per call, then []."""

    def __init__(self, batches: list[list[FakeMessage]]) -> None:
        self.batches = list(batches)

    def assign(self, _tps: Any) -> None:
        pass

    def pause(self, _tps: Any) -> None:
        pass

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
        return self.batches.pop(0) if self.batches else []


def test_an_error_between_records_loses_none_of_them_and_positions_move_past_each() -> None:
    plan = {0: PartitionRange(0, 0, 3), 1: PartitionRange(1, 0, 1)}
    reader = DlqReader(ListConsumer([[rec(0, 0), broken(), rec(1, 0), rec(0, 1)]]), DLQ, plan)
    got = reader.read(10)
    assert [(r.partition, r.offset) for r in got] == [(0, 0), (1, 0), (0, 1)]
    assert reader.passed == 3 and not reader.done  # partition 0 has offset 2 still to read


def test_an_error_alone_raises_retryable_and_moves_nothing() -> None:
    reader = DlqReader(ListConsumer([[broken()]]), DLQ, {0: PartitionRange(0, 0, 2)})
    with pytest.raises(RetryableError, match="_TRANSPORT"):
        reader.read(10)
    assert reader.passed == 0


def test_a_replay_commits_only_past_records_it_replayed_when_an_error_comes_between_them() -> None:
    consumer = ListConsumer([[rec(0, 0), broken(), rec(0, 1)], [rec(0, 2), eof(0, 3)]])
    reader = DlqReader(consumer, DLQ, {0: PartitionRange(0, 0, 3)})
    outbox = ListOutbox()
    opts = ReplayOptions(dlq_topic=DLQ, to_topic="in", retry=RetryPolicy(attempts=3, initial_backoff=0.01,
                                                                          max_backoff=0.01))
    result = Replayer(opts, reader, None, outbox, sleep=lambda _s: None).run()
    assert result.outcome is Outcome.COMPLETED
    assert result.counts.republished == 3 and len(outbox.outputs) == 3
    assert outbox.offsets == {(DLQ, 0): 3}
