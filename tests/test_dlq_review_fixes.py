"""Review fixes in the DLQ tooling: no record lost to a mid-batch consumer error, failure times
without an offset, inspect with Kafka unreachable, and the non-transactional outbox's retries."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

import dlq.inspect
from dev import services, testkit
from dlq.cli import main
from dlq.filters import build_filter
from dlq.inspect import DlqStats
from dlq.outbox import Output, PlainOutbox
from dlq.reader import DlqReader, PartitionRange, capture_plan
from dlq.replay import Outcome, Replayer, ReplayOptions
from sink.envelope import H_FAILED_AT, DlqRecord, parse_headers, to_dlq_record
from sink.errors import RetryableError
from sink.retry import RetryPolicy
from sink.settings import Settings
from sink.types import Rejection, SourceRecord
from tests.fakes import ListOutbox

DLQ = "in.dlq"
TP = tuple[str, int]


# --------------------------------------------------------------------------- 1. reader


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


# --------------------------------------------------------------------------- 2. failure times


def failed_at(value: bytes) -> SourceRecord:
    """A DLQ record whose failure time header was written by another producer."""
    return SourceRecord(DLQ, 0, 0, b"k", b"{}", (("__connect.errors.topic", b"in"), (H_FAILED_AT, value)), 1)


def test_a_failure_time_without_offset_is_utc_for_since_and_until() -> None:
    naive = parse_headers(failed_at(b"2026-11-28T06:00:00").headers)
    assert naive.failed_at == datetime(2026, 11, 28, 6, 0, tzinfo=UTC)
    assert build_filter(since="2026-11-28T06:00:00Z").matches(naive)
    assert not build_filter(since="2026-11-28T06:00:01Z").matches(naive)
    assert not build_filter(until="2026-11-28T06:00:00Z").matches(naive)
    assert build_filter(since="2026-11-28T07:00:00+01:00", until="2026-11-28T06:00:01Z").matches(naive)


@pytest.mark.parametrize("value", [b"yesterday", b"", b"9999-12-31T23:59:59-05:00", b"0001-01-01T00:00:00+05:00"])
def test_an_unusable_failure_time_counts_as_missing(value: bytes) -> None:
    info = parse_headers(failed_at(value).headers)
    assert info.failed_at is None
    assert not build_filter(since="2000-01-01").matches(info)
    assert not build_filter(until="2100-01-01").matches(info)
    stats = DlqStats(examples=1)
    stats.add(failed_at(value))
    summary = stats.summary()
    assert (summary["records"], summary["first_failure"], summary["examples"][0]["failed_at"]) == (1, None, None)


def test_inspect_mixes_failure_times_with_and_without_offset() -> None:
    stats = DlqStats(examples=5)
    for value in (b"2026-11-28T06:00:00", b"2026-11-28T05:00:00Z", b"2026-11-28T08:30:00+01:00"):
        stats.add(failed_at(value))
    summary = stats.summary()
    assert (summary["first_failure"], summary["last_failure"]) == ("2026-11-28T05:00:00.000Z",
                                                                   "2026-11-28T07:30:00.000Z")
    assert summary["examples"][0]["failed_at"] == "2026-11-28T06:00:00.000Z"  # UTC, not local time


# --------------------------------------------------------------------------- 3. inspect, Kafka down



def test_inspect_with_kafka_unreachable_exits_1_with_a_one_line_message(monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import os

    for k in list(os.environ):
        if k.startswith(("KAFKA_", "TIMESCALE_", "RETRY_", "LOG_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{testkit.closed_port()}")
    # The metadata timeout is 15 s; a second is enough to see the broker is not there.
    monkeypatch.setattr(dlq.inspect, "capture_plan", functools.partial(capture_plan, timeout=1.0))
    assert main(["inspect", "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = [x for x in captured.err.splitlines() if x.startswith("sink-dlq")]
    assert line.startswith("sink-dlq inspect: unavailable, try again later: dlq_read: _TRANSPORT")
    assert "Traceback" not in captured.err


# --------------------------------------------------------------------------- 4. plain outbox


class RecordingOffsets:
    def __init__(self) -> None:
        self.commits: list[dict[TP, int]] = []

    def group_metadata(self) -> Any:
        return None

    def commit(self, offsets: dict[TP, int]) -> None:
        self.commits.append(dict(offsets))


Verdict = KafkaError | None | str  # a delivery error, None (acknowledged), or "hold" (no report yet)


class ScriptedProducer:
    """Records every produce(); flush() reports each queued record as `verdict(value)` says."""

    def __init__(self, verdict: Callable[[bytes], Verdict], refuse: Callable[[bytes], bool] = lambda v: False) -> None:
        self.verdict = verdict
        self.refuse = refuse
        self.produced: list[bytes] = []
        self.queue: list[tuple[bytes, Callable[[Any, Any], None]]] = []

    def produce(self, topic: str, *, value: bytes, on_delivery: Callable[[Any, Any], None], **_kw: Any) -> None:
        if self.refuse(value):
            # Refused before queueing, for a reason a retry can fix (a partition not known yet).
            raise KafkaException(KafkaError(KafkaError._UNKNOWN_PARTITION, "unknown partition"))
        self.produced.append(value)
        self.queue.append((value, on_delivery))

    def poll(self, _timeout: float) -> int:
        return 0

    def flush(self, _timeout: float) -> int:
        held = []
        for value, report in self.queue:
            v = self.verdict(value)
            if isinstance(v, str):  # "hold"
                held.append((value, report))
            else:
                report(v, None)
        self.queue = held
        return len(held)


def outputs(*values: bytes) -> list[Output]:
    return [(DLQ, DlqRecord(b"k", v, ())) for v in values]


def plain(producer: ScriptedProducer) -> tuple[PlainOutbox, RecordingOffsets]:
    source = RecordingOffsets()
    return PlainOutbox(Settings(), source, timeout=0.1, producer=producer), source


def test_a_retry_produces_again_only_the_record_whose_delivery_failed() -> None:
    failures = {b"1": 1}

    def verdict(v: bytes) -> Verdict:
        if failures.get(v):
            failures[v] -= 1
            return KafkaError(KafkaError._MSG_TIMED_OUT, "timed out")
        return None

    producer = ScriptedProducer(verdict)
    outbox, source = plain(producer)
    batch, offsets = outputs(b"0", b"1", b"2"), {(DLQ, 0): 10}
    with pytest.raises(RetryableError, match="_MSG_TIMED_OUT"):
        outbox.complete(batch, offsets)
    assert source.commits == []
    outbox.complete(batch, offsets)
    assert producer.produced == [b"0", b"1", b"2", b"1"]
    assert source.commits == [offsets]


def test_a_record_still_queued_is_waited_for_not_produced_again() -> None:
    holding = {b"1"}
    producer = ScriptedProducer(lambda v: "hold" if v in holding else None)
    outbox, source = plain(producer)
    batch, offsets = outputs(b"0", b"1", b"2"), {(DLQ, 0): 10}
    with pytest.raises(RetryableError, match="1 records not acknowledged"):
        outbox.complete(batch, offsets)
    holding.clear()  # the broker acknowledges it later
    outbox.complete(batch, offsets)
    assert producer.produced == [b"0", b"1", b"2"]
    assert source.commits == [offsets]


def test_a_record_produce_refuses_is_a_retryable_error_not_a_traceback() -> None:
    refusals = [b"1"]

    def refuse(v: bytes) -> bool:
        if v in refusals:
            refusals.remove(v)
            return True
        return False

    producer = ScriptedProducer(lambda v: None, refuse)
    outbox, source = plain(producer)
    batch, offsets = outputs(b"0", b"1", b"2"), {(DLQ, 0): 10}
    with pytest.raises(RetryableError, match="_UNKNOWN_PARTITION"):
        outbox.complete(batch, offsets)
    assert source.commits == []
    outbox.complete(batch, offsets)
    assert producer.produced == [b"0", b"1", b"2"]
    assert source.commits == [offsets]


@pytest.mark.integration
def test_a_record_too_large_for_the_real_producer_is_classified_and_nothing_is_committed(topic: str) -> None:
    source = RecordingOffsets()
    outbox = PlainOutbox(Settings(kafka_bootstrap_servers=services.KAFKA_BOOTSTRAP), source, timeout=10)
    try:
        too_large = 2 * 1024 * 1024  # the producer's message.max.bytes follows the DLQ topic: ~1 MiB
        with pytest.raises(RetryableError, match="MSG_SIZE_TOO_LARGE"):
            outbox.complete([(f"{topic}.dlq", DlqRecord(b"k", b"x" * too_large, ()))], {(f"{topic}.dlq", 0): 1})
        assert source.commits == []
    finally:
        outbox.close()
