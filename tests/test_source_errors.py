"""KafkaSource: which errors librdkafka reports among the consumed messages stop the sink (an
ACL only the operator can fix) and which are warned about while the records around them are
kept (a topic not created yet); and what says whether the broker is up."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import Consumer as KafkaConsumer
from confluent_kafka import KafkaError
from structlog.testing import capture_logs

from dev import services, testkit
from sink.errors import FatalError
from sink.settings import Settings
from sink.source import KafkaSource, consumer_config


class Msg:
    def __init__(self, offset: int, err: KafkaError | None = None) -> None:
        self._offset, self._err = offset, err

    def error(self) -> KafkaError | None:
        return self._err

    def topic(self) -> str:
        return "in"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return None

    def value(self) -> bytes:
        return b"{}"

    def headers(self) -> None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000)


class Consumer:
    """Hands out one fixed list of messages."""

    def __init__(self, msgs: list[Msg]) -> None:
        self.msgs = msgs

    def consume(self, num_messages: int, timeout: float) -> list[Msg]:
        out, self.msgs = self.msgs, []
        return out

    def assignment(self) -> list[Any]:
        return []


@pytest.fixture
def source() -> Iterator[KafkaSource]:
    src = KafkaSource(Settings(kafka_bootstrap_servers=services.KAFKA_BOOTSTRAP, kafka_input_topic="in"))
    real = src.consumer
    yield src
    real.close()


def test_an_authorization_error_stops_the_sink(source: KafkaSource) -> None:
    source.consumer = Consumer([Msg(0), Msg(0, KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "denied"))])
    with pytest.raises(FatalError, match="TOPIC_AUTHORIZATION_FAILED"):
        source.consume(10, 0.1)


def test_a_transient_error_is_warned_about_and_the_records_around_it_kept(source: KafkaSource) -> None:
    source.consumer = Consumer([Msg(0), Msg(0, KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, "not yet")), Msg(1)])
    with capture_logs() as logs:
        assert [r.offset for r in source.consume(10, 0.1)] == [0, 1]
    [warning] = [e for e in logs if e["event"] == "kafka_error"]
    assert warning["log_level"] == "warning"
    assert warning["error_class"] == "UNKNOWN_TOPIC_OR_PART"
    assert "not yet" in warning["reason"]


def test_broker_state_follows_the_statistics_both_ways_and_an_assignment_alone_proves_nothing(
        source: KafkaSource) -> None:
    # /readyz and sink_kafka_connected read broker_up: it must fall when the brokers are gone.
    source.consumer = Consumer([])
    source._on_stats(json.dumps({"brokers": {"b1": {"nodeid": 1, "state": "UP"}}}))
    assert source.broker_up
    source._on_stats(json.dumps({"brokers": {"b1": {"nodeid": 1, "state": "DOWN"},
                                             "bootstrap": {"nodeid": -1, "state": "UP"}}}))
    assert not source.broker_up
    source.consumer.assignment = lambda: [object()]  # type: ignore[method-assign]  # partitions still assigned
    source.consume(10, 0.1)  # nothing fetched
    assert not source.broker_up
    source.consumer = Consumer([Msg(0)])
    source.consume(10, 0.1)  # a fetch answered
    assert source.broker_up


def test_librdkafka_s_own_log_lines_are_json_events_not_raw_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    nowhere = Settings(kafka_bootstrap_servers=f"127.0.0.1:{testkit.closed_port()}")
    with capture_logs() as logs:
        consumer = KafkaConsumer(consumer_config(nowhere))
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not any(e["event"] == "kafka_client_log" for e in logs):
                consumer.poll(0.5)  # confluent-kafka hands log lines over on poll
        finally:
            consumer.close()
    lines = [e for e in logs if e["event"] == "kafka_client_log"]
    assert lines, "librdkafka said nothing about a broker that refuses connections"
    assert {"facility", "client", "message"} <= set(lines[0]) and "Connection refused" in " ".join(
        e["message"] for e in lines)
    assert "%3|" not in capfd.readouterr().err  # librdkafka's raw format: none of it on stderr
