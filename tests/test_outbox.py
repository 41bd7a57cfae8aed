"""sink.outbox.PlainOutbox (KAFKA_TRANSACTIONAL=false): a retry produces again only what was not
acknowledged, and nothing is committed before every record is."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from dev import services
from sink.envelope import DlqRecord
from sink.errors import RetryableError
from sink.outbox import Output, PlainOutbox
from sink.settings import Settings

DLQ = "in.dlq"
TP = tuple[str, int]


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
    return PlainOutbox(Settings(), source, DLQ, timeout=0.1, producer=producer), source


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
    outbox = PlainOutbox(Settings(kafka_bootstrap_servers=services.KAFKA_BOOTSTRAP), source, "elsewhere", timeout=10)
    try:
        too_large = 2 * 1024 * 1024  # the producer's message.max.bytes follows the DLQ topic: ~1 MiB
        with pytest.raises(RetryableError, match="MSG_SIZE_TOO_LARGE"):
            outbox.complete([(f"{topic}.dlq", DlqRecord(b"k", b"x" * too_large, ()))], {(f"{topic}.dlq", 0): 1})
        assert source.commits == []
    finally:
        outbox.close()
