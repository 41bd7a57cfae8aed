"""The sink's Kafka side of a batch: its DLQ records to the DLQ topic and its offsets, through
the outbox KAFKA_TRANSACTIONAL chooses (sink/outbox.py says what each mode guarantees)."""

from __future__ import annotations

from collections.abc import Sequence

from sink.envelope import DlqRecord
from sink.outbox import OffsetSink, Outbox, PlainOutbox, TransactionalOutbox, dlq_access, transactional_id_for
from sink.settings import Settings
from sink.topics import KAFKA_DEFAULT_MAX_MESSAGE_BYTES

TP = tuple[str, int]


class Committer:
    def __init__(self, outbox: Outbox, dlq_topic: str) -> None:
        self.outbox = outbox
        self._topic = dlq_topic

    def prepare(self) -> None:
        self.outbox.prepare()

    def complete(self, dlq: Sequence[DlqRecord], offsets: dict[TP, int]) -> None:
        self.outbox.complete([(self._topic, rec) for rec in dlq], offsets)

    def close(self) -> None:
        self.outbox.close()


def open_committer(settings: Settings, source: OffsetSink, dlq_topic: str, transactional: bool,
                   dlq_max_bytes: int = KAFKA_DEFAULT_MAX_MESSAGE_BYTES, timeout: float | None = None) -> Committer:
    """A transaction lives for milliseconds: its calls time out after 10 s; plain mode waits up
    to 30 s for the acknowledgements of a batch's DLQ records."""
    outbox: Outbox
    access = dlq_access(settings, dlq_topic)
    if transactional:
        outbox = TransactionalOutbox(settings, source, dlq_topic, transactional_id_for(settings),
                                     timeout=timeout or 10.0, dlq_max_bytes=dlq_max_bytes, access=access)
    else:
        outbox = PlainOutbox(settings, source, dlq_topic, timeout=timeout or 30.0, dlq_max_bytes=dlq_max_bytes,
                             access=access)
    return Committer(outbox, dlq_topic)
