"""Make sure the DLQ topic exists (as Kafka Connect does for its DLQ), before the first batch."""

from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]  # exported at runtime, missing from the stub

from sink.errors import FatalError, classify_kafka_error
from sink.logs import get_logger
from sink.settings import Settings

log = get_logger("sink.topics")


def ensure_dlq_topic(settings: Settings, timeout: float = 15.0) -> None:
    """Create the DLQ topic if missing: as many partitions as the input (or KAFKA_DLQ_PARTITIONS)."""
    admin = AdminClient({**settings.kafka_extra_config, "bootstrap.servers": settings.kafka_bootstrap_servers})
    try:
        md = admin.list_topics(timeout=timeout)
    except KafkaException as e:
        raise classify_kafka_error(e.args[0] if e.args else None, "dlq_topic") from e
    dlq = settings.dlq_topic
    if dlq in md.topics and md.topics[dlq].error is None:
        return
    partitions = settings.kafka_dlq_partitions
    if not partitions:
        src = md.topics.get(settings.kafka_input_topic)
        partitions = len(src.partitions) if src is not None and src.error is None and src.partitions else 1
    fut = admin.create_topics([NewTopic(dlq, num_partitions=partitions,
                                        replication_factor=settings.kafka_dlq_replication_factor)])[dlq]
    try:
        fut.result(timeout=timeout)
    except KafkaException as e:
        err = e.args[0] if e.args else None
        if err is not None and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
            return
        out = classify_kafka_error(err, "dlq_topic")
        if err is not None and err.code() in (KafkaError.TOPIC_AUTHORIZATION_FAILED,
                                              KafkaError.CLUSTER_AUTHORIZATION_FAILED):
            raise FatalError(f"DLQ topic {dlq} does not exist and the sink may not create it: create it "
                             f"(e.g. {partitions} partitions) or grant CREATE") from e
        raise out from e
    log.info("dlq_topic_created", topic=dlq, partitions=partitions)
