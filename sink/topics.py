"""Make sure the DLQ topic exists (as Kafka Connect does for its DLQ), before the first batch."""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # exported at runtime, missing from the stub
    ConfigResource,
    NewTopic,
    ResourceType,
)

from sink.errors import FatalError, KafkaAccess, classify_kafka_error, kafka_error
from sink.kafka_auth import admin_metadata, principal
from sink.logs import get_logger
from sink.settings import Settings

log = get_logger("sink.topics")

# The broker's message.max.bytes default: every topic's max.message.bytes unless set.
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
# A DLQ record is the input record plus our headers (the error message alone up to 4 KiB):
# a DLQ topic the sink creates takes that much more than the input topic, so every input
# record fits with its original bytes.
DLQ_HEADROOM_BYTES = 64 * 1024
# Below this even a record without key and value may not fit beside our headers.
MIN_DLQ_MAX_MESSAGE_BYTES = 16 * 1024


def ensure_dlq_topic(settings: Settings, timeout: float = 15.0) -> int:
    """Create the DLQ topic if missing: as many partitions as the input (or KAFKA_DLQ_PARTITIONS),
    and room for the input's largest record plus our headers.  Returns the largest record the
    DLQ topic takes (its max.message.bytes): the committer fits DLQ records to it."""
    admin, md = admin_metadata(settings, "dlq_topic", timeout)
    dlq = settings.dlq_topic
    created = None
    if not (dlq in md.topics and md.topics[dlq].error is None):
        created = _create(admin, settings, md, timeout)
    # Just created, the broker may not describe it yet (its metadata lags): what was set is known.
    return _dlq_limit(admin, dlq, timeout, known=created)


def dlq_max_message_bytes(settings: Settings, topic: str, timeout: float = 15.0) -> int:
    """The largest record the DLQ topic takes (for DLQ tooling that does not create it)."""
    admin, _ = admin_metadata(settings, "dlq_topic", timeout)
    return _dlq_limit(admin, topic, timeout)


def _dlq_limit(admin: Any, dlq: str, timeout: float, known: int | None = None) -> int:
    limit = _max_message_bytes(admin, dlq, timeout) or known
    if limit is None:
        limit = KAFKA_DEFAULT_MAX_MESSAGE_BYTES
        log.warning("dlq_topic_config_unknown", topic=dlq, assumed_max_message_bytes=limit,
                    hint="grant DescribeConfigs on the DLQ topic; if it takes less, a DLQ record the broker "
                         "refuses for its size is sent again without its value")
    if limit < MIN_DLQ_MAX_MESSAGE_BYTES:
        raise FatalError(f"DLQ topic {dlq} takes records of at most {limit} bytes (max.message.bytes): too small "
                         f"for the failure headers; raise it to at least {MIN_DLQ_MAX_MESSAGE_BYTES}")
    return limit


def _create(admin: Any, settings: Settings, md: Any, timeout: float) -> int | None:
    """Create the DLQ topic; its max.message.bytes, or None if another instance created it."""
    dlq = settings.dlq_topic
    partitions = settings.kafka_dlq_partitions
    src = md.topics.get(settings.kafka_input_topic)
    if not partitions:
        partitions = len(src.partitions) if src is not None and src.error is None and src.partitions else 1
    input_limit = _max_message_bytes(admin, settings.kafka_input_topic, timeout) if src is not None else None
    max_bytes = max(input_limit or 0, KAFKA_DEFAULT_MAX_MESSAGE_BYTES) + DLQ_HEADROOM_BYTES
    fut = admin.create_topics([NewTopic(dlq, num_partitions=partitions,
                                        replication_factor=settings.kafka_dlq_replication_factor,
                                        config={"max.message.bytes": str(max_bytes)})])[dlq]
    try:
        fut.result(timeout=timeout)
    except KafkaException as e:
        err = kafka_error(e)
        if err is not None and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
            return None
        who = principal(settings) or "the sink's principal"
        out = classify_kafka_error(err, "dlq_topic", KafkaAccess(principal(settings), "CREATE", (dlq,)))
        if err is not None and err.code() in (KafkaError.TOPIC_AUTHORIZATION_FAILED,
                                              KafkaError.CLUSTER_AUTHORIZATION_FAILED):
            # Without WRITE (which implies DESCRIBE) an existing DLQ topic is invisible, hence "missing".
            raise FatalError(f"{err.name()}: DLQ topic {dlq} is missing or not visible to {who}, which may not "
                             f"create it: grant {who} WRITE on topic {dlq}, and CREATE on it (or create it: e.g. "
                             f"{partitions} partitions, max.message.bytes={max_bytes})") from e
        raise out from e
    log.info("dlq_topic_created", topic=dlq, partitions=partitions, max_message_bytes=max_bytes)
    return max_bytes


def _max_message_bytes(admin: Any, topic: str, timeout: float) -> int | None:
    """The topic's max.message.bytes; None if the broker does not say (e.g. no DescribeConfigs ACL)."""
    try:
        futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)])
        (fut,) = futures.values()
        return int(fut.result(timeout=timeout)["max.message.bytes"].value)
    except (KafkaException, TimeoutError, KeyError, ValueError, TypeError) as e:
        log.debug("topic_config_unreadable", topic=topic, reason=str(e))
        return None
