"""An invalid record too large for the DLQ is neither retried for ever nor a crash loop: the DLQ
topic the sink creates takes the input's largest record plus our headers, and a DLQ topic that
takes less gets the record without its value, with headers saying so and where the original is.
The real sink process against the real local broker and PostgreSQL."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import ConfigResource, NewTopic, ResourceType  # type: ignore[attr-defined]

from dev import services, testkit
from sink.committer import Committer, open_committer
from sink.envelope import H_DROPPED, H_OFFSET, H_ORIG_BYTES, H_TOPIC, DlqRecord
from sink.errors import RetryableError
from sink.settings import Settings
from sink.topics import DLQ_HEADROOM_BYTES, KAFKA_DEFAULT_MAX_MESSAGE_BYTES

pytestmark = pytest.mark.integration


@pytest.fixture
def dlq_topic(topic: str) -> Iterator[str]:
    name = f"{topic}.dlq2"  # not created by the topic fixture
    yield name
    testkit.delete_topics([name])


def _produce_large(topic: str, values: list[bytes]) -> list[testkit.Sent]:
    """testkit.produce, with a producer that sends up to the topic's 1 MiB (librdkafka: 1,000,000)."""
    p = testkit.producer(**{"message.max.bytes": 1_048_576})
    sent: list[testkit.Sent] = []

    def on_ack(err: Any, msg: Any) -> None:
        assert err is None, err
        sent.append(testkit.Sent(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value()))

    for v in values:
        p.produce(topic, value=v, key=b"dev-big", partition=0, on_delivery=on_ack)
    assert p.flush(30) == 0
    return sent


def _max_message_bytes(topic: str) -> int:
    adm = testkit.admin()  # keep a reference: a destroyed handle fails its futures
    fut = next(iter(adm.describe_configs([ConfigResource(ResourceType.TOPIC, topic)]).values()))
    return int(fut.result(timeout=10)["max.message.bytes"].value)


def _drain(schema: str, topic: str, group: str, dlq_topic: str, logdir: Path) -> testkit.SinkProcess:
    """Run the sink until it committed both records of partition 0, then stop it cleanly."""
    return testkit.SinkProcess(testkit.sink_env(schema, topic, group, KAFKA_DLQ_TOPIC=dlq_topic),
                               logdir / "sink.log").start().stop_once_committed(group, topic, {0: 2})


def _small_topic(name: str) -> None:
    """A one-partition DLQ topic that takes records of at most 100 kB (made by hand, as it were)."""
    adm = testkit.admin()
    for fut in adm.create_topics([NewTopic(name, num_partitions=1, replication_factor=1,
                                           config={"max.message.bytes": "100000"})]).values():
        fut.result(timeout=30)
    testkit.wait_topic_ready(name, 1)


def _valid() -> bytes:
    return json.dumps({"timestamp": 1_700_000_000, "mac_address": "dev-1", "mode": "analog",
                       "data_point_label": "temperature", "pin": 1, "value": 1.5}).encode()


def test_the_dlq_topic_the_sink_creates_takes_the_largest_input_record_whole(
        schema: str, topic: str, group: str, dlq_topic: str, logdir: Path) -> None:
    big = b"{" + b"x" * 1_040_000  # not JSON; the input topic takes it, librdkafka's default limit does not
    sent = _produce_large(topic, [big, _valid()])
    _drain(schema, topic, group, dlq_topic, logdir)
    assert _max_message_bytes(dlq_topic) == KAFKA_DEFAULT_MAX_MESSAGE_BYTES + DLQ_HEADROOM_BYTES
    (d,) = testkit.read_all(dlq_topic)
    assert d.value == big and d.key == b"dev-big"  # the original bytes
    assert H_DROPPED not in d.headers and int(d.headers[H_OFFSET]) == sent[0].offset
    assert testkit.row_count(schema) == 1


def test_a_record_too_large_for_the_dlq_topic_goes_there_without_its_value(
        schema: str, topic: str, group: str, dlq_topic: str, logdir: Path) -> None:
    _small_topic(dlq_topic)
    big = b"{" + b"y" * 200_000
    sent = _produce_large(topic, [big, _valid()])
    sink = _drain(schema, topic, group, dlq_topic, logdir)
    (d,) = testkit.read_all(dlq_topic)
    assert d.value is None and d.key == b"dev-big"
    assert d.headers[H_DROPPED] == b"value" and int(d.headers[H_ORIG_BYTES]) > 200_000
    assert d.headers[H_TOPIC] == topic.encode() and int(d.headers[H_OFFSET]) == sent[0].offset
    assert testkit.row_count(schema) == 1
    (line,) = [e for e in sink.events() if e["event"] == "dlq_record_too_large"]
    assert line["limit_bytes"] == 100_000
    assert (line["topic"], line["partition"], line["offset"]) == (topic, 0, sent[0].offset)


class NoOffsets:
    def group_metadata(self) -> Any:
        raise AssertionError("no offsets were given")

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        assert offsets == {}


@pytest.mark.parametrize("transactional", [True, False], ids=["transactional", "plain"])
def test_a_limit_the_sink_could_not_read_is_learnt_from_the_broker_refusing_a_record(
        dlq_topic: str, transactional: bool) -> None:
    # DescribeConfigs not allowed: the sink assumes Kafka's default, the topic takes 100 kB.
    committer = _assuming_default(transactional, dlq_topic)
    big = DlqRecord(b"k", random.Random(5).randbytes(200_000),  # incompressible: zstd cannot save it
                    ((H_TOPIC, b"in"), (H_OFFSET, b"5")))
    small = DlqRecord(b"k2", b"fits", ((H_TOPIC, b"in"), (H_OFFSET, b"6")))
    try:
        with pytest.raises(RetryableError):  # transactional: may name a later error of the aborted transaction
            committer.complete([small, big], {})
        _retry(lambda: committer.complete([small, big], {}))  # the pipeline's retries
    finally:
        committer.close()
    got = {r.key: r for r in testkit.read_all(dlq_topic)}
    assert got[b"k"].value is None and got[b"k"].headers[H_DROPPED] == b"value"
    assert got[b"k2"].value == b"fits"


@pytest.mark.parametrize("transactional", [True, False], ids=["transactional", "plain"])
def test_records_that_fit_alone_keep_their_values_when_their_batch_was_refused(
        dlq_topic: str, transactional: bool) -> None:
    # Five 30 kB records fit a 100 kB topic one by one, not in one producer batch.
    committer = _assuming_default(transactional, dlq_topic)
    rnd = random.Random(6)
    records = [DlqRecord(f"k{i}".encode(), rnd.randbytes(30_000), ((H_TOPIC, b"in"), (H_OFFSET, str(i).encode())))
               for i in range(5)]
    try:
        _retry(lambda: committer.complete(records, {}))
    finally:
        committer.close()
    got = sorted((r.key, r.value) for r in testkit.read_all(dlq_topic))
    assert got == [(r.key, r.value) for r in records]  # whole, each once


def _assuming_default(transactional: bool, dlq_topic: str) -> Committer:
    """A committer for a 100 kB DLQ topic whose config it could not read: Kafka's default assumed."""
    _small_topic(dlq_topic)
    return open_committer(Settings(kafka_bootstrap_servers=services.KAFKA_BOOTSTRAP), NoOffsets(), dlq_topic,
                          transactional, timeout=10.0, dlq_max_bytes=KAFKA_DEFAULT_MAX_MESSAGE_BYTES)


def _retry(fn: Any, attempts: int = 12) -> None:
    """As the pipeline retries a RetryableError (the limit halves per refusal; transactional: an
    aborted transaction's epoch bump costs one more)."""
    for attempt in range(attempts):
        try:
            fn()
            return
        except RetryableError:
            assert attempt < attempts - 1
            time.sleep(0.3)
