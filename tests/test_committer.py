"""The Kafka side of a batch against the real local broker: the transactional producer is
registered at startup, a broker that cannot be reached is a retryable error, not a hang, and a
commit that timed out is resumed on the retry, not aborted."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer

from dev import services, testkit
from sink.committer import open_committer
from sink.envelope import H_FAILED_AT, H_OFFSET, H_PARTITION, H_TOPIC, DlqRecord
from sink.errors import FatalError, RetryableError
from sink.settings import Settings

pytestmark = pytest.mark.integration


class NoOffsets:
    """An OffsetSink for batches that carry DLQ records only."""

    def group_metadata(self) -> Any:
        raise AssertionError("no offsets were given")

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        raise AssertionError("a transactional committer never commits offsets on the consumer")



def test_prepare_registers_the_producer_and_the_first_transaction_commits(infra: None, topic: str) -> None:
    committer = open_committer(Settings(kafka_bootstrap_servers=services.KAFKA_BOOTSTRAP), NoOffsets(),
                               f"{topic}.dlq", True)
    try:
        committer.prepare()
        committer.prepare()  # idempotent: the same producer
        committer.complete([DlqRecord(b"k", b"not json", (("why", b"test"),))], {})
    finally:
        committer.close()
    got = testkit.read_all(f"{topic}.dlq")
    assert [(r.key, r.value) for r in got] == [(b"k", b"not json")]


def test_prepare_against_an_unreachable_broker_is_retryable(infra: None) -> None:
    committer = open_committer(Settings(kafka_bootstrap_servers=f"127.0.0.1:{testkit.closed_port()}"),
                               NoOffsets(), "nowhere.dlq", True, timeout=2.0)
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


_MAX_FREEZE_S = 7.0


@contextmanager
def _broker_frozen() -> Iterator[None]:
    """SIGSTOP the broker: requests go unanswered (a coordinator that does not reply in time).

    Kept under the broker's session timeout (broker.session.timeout.ms, 9 s by default): a
    longer stop makes its own controller fence it when it resumes, and every partition of the
    shared dev broker goes leaderless for a while, failing a later test's create_topics."""
    pid = services.kafka_pid()
    assert pid is not None, "the local broker is not running"
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
        frozen = time.monotonic() - t0
    assert frozen < _MAX_FREEZE_S, f"the broker was stopped {frozen:.1f}s: its controller fences it after 9s"


def test_a_commit_that_timed_out_is_resumed_and_the_batch_is_committed_once(infra: None, topic: str) -> None:
    # librdkafka keeps committing a transaction whose commit_transaction() timed out and refuses
    # any other transactional call (_CONFLICT) until commit_transaction() is called again: an
    # abort on the retry would fail for ever, with consumption paused.
    committer = open_committer(Settings(kafka_bootstrap_servers=services.KAFKA_BOOTSTRAP), NoOffsets(),
                               f"{topic}.dlq", True, timeout=1.0)
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
    committer = open_committer(Settings(kafka_bootstrap_servers=services.KAFKA_BOOTSTRAP), NoOffsets(),
                               f"{topic}.dlq", True, timeout=1.0)
    committer.prepare()
    with _broker_frozen():
        with pytest.raises(RetryableError):
            committer.complete([_dlq_record(b"2026-11-28T06:00:00.001Z")], {})
        committer.close()  # shutdown while the broker still does not answer


class GroupOf:
    """An OffsetSink over a real consumer in the group: its metadata fences the transaction.
    Taken by the test's thread (snapshot()): a consumer is not called from two threads."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.metadata: Any = None

    def snapshot(self) -> None:
        self.metadata = self.consumer.consumer_group_metadata()

    def group_metadata(self) -> Any:
        return self.metadata

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        raise AssertionError("a transactional committer never commits offsets on the consumer")


def test_the_first_transaction_after_a_broker_restart_returns_and_commits(infra: None, topic: str,
                                                                         group: str) -> None:
    # When every broker is down, librdkafka 2.16 re-bootstraps and decommissions the brokers it
    # learned; its producer kept the decommissioned broker as group coordinator and
    # send_offsets_to_transaction() waited for ever (librdkafka#5511): the sink's watchdog exit.
    testkit.produce(topic, [b"x"] * 3, partition=0)
    consumer = Consumer({"bootstrap.servers": services.KAFKA_BOOTSTRAP, "group.id": group,
                         "enable.auto.commit": False, "auto.offset.reset": "earliest",
                         "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000})
    consumer.subscribe([topic])
    source = GroupOf(consumer)
    committer = open_committer(Settings(kafka_bootstrap_servers=services.KAFKA_BOOTSTRAP),
                               source, f"{topic}.dlq", True, timeout=5.0)
    try:
        testkit.wait_for(lambda: consumer.poll(0.5) is not None, 30, what="the consumer's first record")
        committer.prepare()
        source.snapshot()
        committer.complete([], {(topic, 0): 1})  # the producer now knows the group coordinator
        services.stop_kafka(kill=True)
        time.sleep(1)
        services.start_kafka()
        deadline, committed, attempts = time.monotonic() + 120, False, 0
        while not committed:
            assert time.monotonic() < deadline, "the offsets were never committed after the broker came back"
            attempts += 1
            source.snapshot()
            # Legitimately at most a few calls of 5 s each (init, send offsets, commit x3).
            record = _dlq_record(f"2026-11-28T06:00:{attempts:02d}.001Z".encode())  # this retry's envelope
            err = testkit.call_bounded(lambda r=record: committer.complete([r], {(topic, 0): 2}), 45,
                                       "complete() did not return in 45s: a librdkafka call ignored its timeout",
                                       serve=lambda: consumer.poll(0.2))
            assert err is None or isinstance(err, RetryableError | FatalError), repr(err)
            committed = err is None
            if not committed:
                consumer.poll(1.0)  # rejoin the group: a stale generation is refused
    finally:
        committer.close()
        consumer.close()
    assert testkit.committed_offsets(group, topic).get(0) == 2, attempts
    # Each failed attempt's DLQ record was aborted with its transaction: one is visible.
    assert [(r.key, r.value) for r in testkit.read_all(f"{topic}.dlq")] == [(b"k", b"not json")], attempts
