"""The Kafka side of a batch against the real local broker: the transactional producer is
registered at startup, and a broker that cannot be reached is a retryable error, not a hang."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from dev import services, testkit
from sink.committer import TransactionalCommitter
from sink.envelope import DlqRecord
from sink.errors import RetryableError
from sink.settings import Settings

pytestmark = pytest.mark.integration


class NoOffsets:
    """An OffsetSink for batches that carry DLQ records only."""

    def group_metadata(self) -> Any:
        raise AssertionError("no offsets were given")

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        raise AssertionError("a transactional committer never commits offsets on the consumer")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: nothing listens there


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
    committer = TransactionalCommitter(Settings(kafka_bootstrap_servers=f"127.0.0.1:{_closed_port()}"),
                                       NoOffsets(), "nowhere.dlq", timeout=2.0)
    with pytest.raises(RetryableError):
        committer.prepare()
    committer.close()


def test_the_sink_registers_its_producer_before_it_consumes(schema: str, topic: str, group: str,
                                                          logdir: Path) -> None:
    testkit.produce(topic, [b"not json"], partition=0)
    sink = testkit.SinkProcess(testkit.sink_env(schema, topic, group, KAFKA_TRANSACTIONAL_ID=f"{group}-tx"),
                               logdir / "sink.log").start()
    try:
        testkit.wait_for(lambda: testkit.committed_offsets(group, topic) == {0: 1}, 60, what="offset 1 committed")
        assert sink.stop() == 0
    finally:
        if sink.alive():
            sink.kill()
    events = [e["event"] for e in sink.events()]
    ready = [e for e in sink.events() if e["event"] == "kafka_transactions_ready"]
    assert [e["transactional_id"] for e in ready] == [f"{group}-tx"]  # once, with the configured id
    assert events.index("kafka_transactions_ready") < events.index("partitions_assigned")
    assert [r.value for r in testkit.read_all(f"{topic}.dlq")] == [b"not json"]
