"""Reads a DLQ topic from start offsets up to the end offsets captured when it was opened.

Assigned partitions, never a subscription: the set of partitions and their ends are fixed for
the run, so there are no rebalances, and a run stops by itself.  ``read_committed`` (the sink
writes the DLQ in transactions), and the end is the last stable offset: a read_committed
consumer's high watermark, so an open transaction at the end never makes us wait for it.
Records appended after the start (e.g. by this replay writing failures back) are not read.
"""

from __future__ import annotations

import contextlib
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from sink.errors import FatalError, KafkaAccess, RetryableError, classify_kafka_error
from sink.kafka_auth import principal
from sink.logs import get_logger
from sink.settings import Settings
from sink.source import commit_offsets, consumer_config, read_headers
from sink.types import SourceRecord

log = get_logger("dlq.reader")

TP = tuple[str, int]
_TIMEOUT = 15.0


@dataclass(frozen=True, slots=True)
class PartitionRange:
    """Offsets [start, end) of one DLQ partition that a run reads."""

    partition: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return max(0, self.end - self.start)


def open_consumer(settings: Settings, group: str | None) -> Any:
    """A read_committed consumer; without a group a throw-away id that never commits (inspect)."""
    return Consumer(consumer_config(settings, {
        "group.id": group or f"sink-dlq-inspect.{uuid.uuid4().hex[:12]}",
        "client.id": f"sink-dlq-{socket.gethostname()}",
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
        "statistics.interval.ms": 0,
        "auto.offset.reset": "earliest",
    }))


def reader_access(settings: Settings, topic: str, group: str | None) -> KafkaAccess:
    """What a DLQ reader does: read the DLQ topic, and (a replay) commit its group's offsets."""
    return KafkaAccess(principal(settings), "READ", (topic,), group or "")


def capture_plan(consumer: Any, topic: str, *, from_committed: bool,
                 timeout: float = _TIMEOUT, access: KafkaAccess | None = None) -> dict[int, PartitionRange]:
    """Per partition: start (the group's committed offset, else the log start) and end (now)."""
    try:
        md = consumer.list_topics(topic, timeout=timeout)
    except KafkaException as e:
        raise classify_kafka_error(e, "dlq_read", access) from e
    t = md.topics.get(topic)
    if t is None or t.error is not None or not t.partitions:
        reason = t.error.str() if t is not None and t.error is not None else "no partitions"
        raise FatalError(f"DLQ topic {topic} cannot be read: {reason} (check KAFKA_DLQ_TOPIC / --dlq-topic)")
    tps = [TopicPartition(topic, p) for p in sorted(t.partitions)]
    committed: dict[int, int] = {}
    try:
        if from_committed:
            for tp in consumer.committed(tps, timeout=timeout):
                if tp.error is not None:
                    raise classify_kafka_error(tp.error, "dlq_committed", access)
                if tp.offset >= 0:
                    committed[tp.partition] = tp.offset
        plan: dict[int, PartitionRange] = {}
        for tp in tps:
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout, cached=False)
            # Records before the log start were deleted by retention: start at what is left.
            start = max(committed.get(tp.partition, low), low)
            plan[tp.partition] = PartitionRange(tp.partition, start, max(start, high))
    except KafkaException as e:
        raise classify_kafka_error(e, "dlq_offsets", access) from e
    return plan


class DlqReader:
    """Hands out the records of a plan in per-partition order; ``done`` once every end is reached."""

    def __init__(self, consumer: Any, topic: str, plan: Mapping[int, PartitionRange],
                 stall_timeout: float = 60.0, access: KafkaAccess | None = None) -> None:
        self.consumer = consumer
        self._access = access
        self.topic = topic
        self.plan = dict(plan)
        self._pos = {p: r.start for p, r in self.plan.items()}
        self._done = {p for p, r in self.plan.items() if r.size == 0}
        self._stall_timeout = stall_timeout
        self._last_progress = time.monotonic()
        todo = [TopicPartition(topic, p, r.start) for p, r in self.plan.items() if p not in self._done]
        if todo:
            consumer.assign(todo)

    @property
    def total(self) -> int:
        """Offsets to pass (records, plus any transaction markers among them)."""
        return sum(r.size for r in self.plan.values())

    @property
    def passed(self) -> int:
        return sum(min(self._pos[p], r.end) - r.start for p, r in self.plan.items())

    @property
    def done(self) -> bool:
        return len(self._done) == len(self.plan)

    def read(self, max_records: int, timeout: float = 0.5) -> list[SourceRecord]:
        """Up to max_records records inside the plan; [] when none arrived within timeout."""
        if self.done:
            return []
        try:
            msgs = self.consumer.consume(num_messages=max(1, max_records), timeout=timeout)
        except KafkaException as e:
            raise classify_kafka_error(e, "dlq_read", self._access) from e
        out: list[SourceRecord] = []
        first_error: Any = None
        for m in msgs:
            err = m.error()
            part = m.partition()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    # The EOF offset is the fetch position: past any transaction marker at the end.
                    self._advance(part, m.offset())
                    continue
                # An error describes a partition or the client, not a record, and moves no
                # position.  Raising here would drop the records of this list, which librdkafka
                # and _pos have already passed: a retried read() would never see them again, and
                # the replay would commit past them.  So read the whole list first.
                if first_error is None:
                    first_error = err
                continue
            if part in self._done or m.offset() >= self.plan[part].end:
                self._advance(part, self.plan[part].end)
                continue
            ts_type, ts = m.timestamp()
            out.append(SourceRecord(m.topic(), part, m.offset(), m.key(), m.value(), read_headers(m),
                                    ts if ts_type else None))
            self._advance(part, m.offset() + 1)
        if first_error is not None:
            if not out:
                # Nothing read: raise, so a persistent error surfaces (and is retried or fatal).
                raise classify_kafka_error(first_error, "dlq_read", self._access)
            # Records came with it: hand them out; if the error persists, the next read raises it.
            log.warning("dlq_read_error", reason=str(classify_kafka_error(first_error, "dlq_read", self._access)),
                        records=len(out))
        if not msgs and not self.done and time.monotonic() - self._last_progress > self._stall_timeout:
            left = {p: [self._pos[p], r.end] for p, r in self.plan.items() if p not in self._done}
            raise RetryableError("dlq_read", f"no progress towards the end offsets for {self._stall_timeout:.0f}s: "
                                 f"{left}")
        return out

    def _advance(self, part: int, position: int) -> None:
        if part not in self.plan or position <= self._pos[part]:
            return
        self._pos[part] = position
        self._last_progress = time.monotonic()
        if position >= self.plan[part].end and part not in self._done:
            self._done.add(part)
            # Stop fetching what this run will not read.
            with contextlib.suppress(KafkaException):
                self.consumer.pause([TopicPartition(self.topic, part)])

    def close(self) -> None:
        with contextlib.suppress(KafkaException, RuntimeError):
            self.consumer.close()


class ConsumerOffsets:
    """The replay group's side of a consumer: its metadata for transactions, or a plain commit."""

    def __init__(self, consumer: Any, access: KafkaAccess | None = None) -> None:
        self.consumer = consumer
        self._access = access

    def group_metadata(self) -> Any:
        return self.consumer.consumer_group_metadata()

    def commit(self, offsets: dict[TP, int]) -> None:
        """Synchronous commit of explicit offsets (KAFKA_TRANSACTIONAL=false only)."""
        commit_offsets(self.consumer, offsets, self._access)
