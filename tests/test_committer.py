"""The Kafka side of a batch against the real local broker: the transactional producer is
registered at startup, a broker that cannot be reached is a retryable error, not a hang, and a
commit that timed out is resumed on the retry, not aborted."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from dev import services, testkit
from sink.committer import TransactionalCommitter
from sink.envelope import H_FAILED_AT, H_OFFSET, H_PARTITION, H_TOPIC, DlqRecord
from sink.errors import RetryableError
from sink.settings import Settings

pytestmark = pytest.mark.integration


class NoOffsets:
    """An OffsetSink for batches that carry DLQ records only."""

    def group_metadata(self) -> Any:
        raise AssertionError("no offsets were given")

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        raise AssertionError("a transactional committer never commits offsets on the consumer")



def test_prepare_registers_the_producer_and_the_first_transaction_commits(infra: None, topic: str) -> None:
    committer = TransactionalCommitter(Settings(kafka_bootstrap_servers=services.KAFKA_BOOTSTRAP), NoOffsets(),
                                       f"{topic}.dlq")
    try:
        committer.prepare()
        committer.prepare()  # idempotent: the same producer
        committer.complete([DlqRecord(b"k", b"not json", (("why", b"test"),))], {})
    finally:
        committer.close()
    got = testkit.read_all(f"{topic}.dlq")
    assert [(r.key, r.value) for r in got] == [(b"k", b"not json")]


def test_prepare_against_an_unreachable_broker_is_retryable(infra: None) -> None:
    committer = TransactionalCommitter(Settings(kafka_bootstrap_servers=f"127.0.0.1:{testkit.closed_port()}"),
                                       NoOffsets(), "nowhere.dlq", timeout=2.0)
    with pytest.raises(RetryableError):
        committer.prepare()
    committer.close()


def test_the_sink_registers_its_producer_before_it_consumes(schema: str, topic: str, group: str,
                                                          logdir: Path) -> None:
    testkit.produce(topic, [b"not json"], partition=0)
    sink = testkit.SinkProcess(testkit.sink_env(schema, topic, group, KAFKA_TRANSACTIONAL_ID=f"{group}-tx"),
                               logdir / "sink.log").start().stop_once_committed(group, topic, {0: 1})
    events = [e["event"] for e in sink.events()]
    ready = [e for e in sink.events() if e["event"] == "kafka_transactions_ready"]
    assert [e["transactional_id"] for e in ready] == [f"{group}-tx"]  # once, with the configured id
    assert events.index("kafka_transactions_ready") < events.index("partitions_assigned")
    assert [r.value for r in testkit.read_all(f"{topic}.dlq")] == [b"not json"]


def _dlq_record(failed_at: bytes) -> DlqRecord:
    """One rejected input record as a batch's retry envelopes it again: same origin, new failed_at."""
    return DlqRecord(b"k", b"not json", ((H_TOPIC, b"in"), (H_PARTITION, b"0"), (H_OFFSET, b"7"),
                                         (H_FAILED_AT, failed_at)))


@contextmanager
def _broker_frozen() -> Iterator[None]:
    """SIGSTOP the broker: requests go unanswered (a coordinator that does not reply in time)."""
    pid = services.kafka_pid()
    assert pid is not None, "the local broker is not running"
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_commit_that_timed_out_is_resumed_and_the_batch_is_committed_once(infra: None, topic: str) -> None:
    # librdkafka keeps committing a transaction whose commit_transaction() timed out and refuses
    # any other transactional call (_CONFLICT) until commit_transaction() is called again: an
    # abort on the retry would fail for ever, with consumption paused.
    committer = TransactionalCommitter(Settings(kafka_bootstrap_servers=services.KAFKA_BOOTSTRAP), NoOffsets(),
                                       f"{topic}.dlq", timeout=1.0)
    try:
        committer.prepare()
        with _broker_frozen(), pytest.raises(RetryableError, match="timing out"):
            committer.complete([_dlq_record(b"2026-11-28T06:00:00.001Z")], {})
        committer.complete([_dlq_record(b"2026-11-28T06:00:05.001Z")], {})  # the pipeline's retry
        committer.complete([DlqRecord(b"k2", b"next batch", ())], {})  # and the producer goes on
    finally:
        committer.close()
    got = testkit.read_all(f"{topic}.dlq")
    assert sorted((r.key, r.value) for r in got) == [(b"k", b"not json"), (b"k2", b"next batch")]
    first = next(r for r in got if r.key == b"k")
    assert first.headers[H_FAILED_AT] == b"2026-11-28T06:00:00.001Z"  # the first attempt's, once


def test_close_after_a_commit_timed_out_does_not_raise(infra: None, topic: str) -> None:
    committer = TransactionalCommitter(Settings(kafka_bootstrap_servers=services.KAFKA_BOOTSTRAP), NoOffsets(),
                                       f"{topic}.dlq", timeout=1.0)
    committer.prepare()
    with _broker_frozen():
        with pytest.raises(RetryableError):
            committer.complete([_dlq_record(b"2026-11-28T06:00:00.001Z")], {})
        committer.close()  # shutdown while the broker still does not answer
