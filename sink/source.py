"""The Kafka consumer adapter: consume, pause/resume, rebalance callbacks, lag from statistics."""

from __future__ import annotations

import contextlib
import json
import operator
import socket
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from sink.errors import FatalError, KafkaAccess, classify_kafka_error
from sink.kafka_auth import LoginWatch, principal
from sink.logs import get_logger
from sink.settings import Settings
from sink.types import Headers, SourceRecord, UnreadableHeaders

log = get_logger("sink.source")
# SourceRecord(...) without the Python-level __new__ a NamedTuple adds (one per consumed record).
_new_record: Any = tuple.__new__

TP = tuple[str, int]
PartitionsCallback = Callable[[list[TP]], None]

# Bounded prefetch: librdkafka's default (64 MiB of queued messages) alone would blow the
# sink's memory budget; 16 MiB still keeps a batch of 5000 records ready to go.
_CONSUMER_DEFAULTS = {
    "queued.max.messages.kbytes": "16384",
    "fetch.max.bytes": "16777216",
    "statistics.interval.ms": "5000",
    # The input may be written by transactional producers: never read aborted records.
    "isolation.level": "read_committed",
}


def consumer_config(settings: Settings, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    conf: dict[str, Any] = {
        **_CONSUMER_DEFAULTS,
        **settings.kafka_client_config(),
        "group.id": settings.kafka_group_id,
        "client.id": f"kafka-timescale-sink-{socket.gethostname()}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": settings.kafka_auto_offset_reset,
        "max.poll.interval.ms": settings.kafka_max_poll_interval_ms,
    }
    conf.update(extra or {})
    return conf


def commit_offsets(consumer: Any, offsets: dict[TP, int], access: KafkaAccess | None = None) -> None:
    """Synchronous commit of explicit offsets; failures come back classified."""
    if not offsets:
        return
    tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
    try:
        result = consumer.commit(offsets=tps, asynchronous=False)
    except KafkaException as e:
        raise classify_kafka_error(e, "commit", access) from e
    for tp in result or []:
        if tp.error is not None:
            raise classify_kafka_error(tp.error, "commit", access)


# Through a C-level call, never as m.headers() in a loop: for a header name that is not UTF-8
# confluent-kafka returns a list *and* sets an exception.  A plain call turns that into a
# SystemError, but once CPython 3.11+ has specialised the call site in a hot loop it skips that
# check, and the pending exception surfaces later, in an unrelated call of the next record.
_headers = operator.methodcaller("headers")


def read_headers(m: Any) -> Headers:
    """A consumed message's headers as (str, bytes | None) pairs; UnreadableHeaders where the
    Kafka client cannot read them."""
    try:
        headers = _headers(m)
    except (SystemError, UnicodeDecodeError) as e:
        return _unreadable(e)
    return tuple(headers) if headers else ()


def _unreadable(e: Exception) -> UnreadableHeaders:
    """confluent-kafka cannot read a header name that is not UTF-8 and fails on all the record's
    headers (a SystemError whose cause is the UnicodeDecodeError): read the record without them."""
    cause = e if isinstance(e, UnicodeDecodeError) else e.__cause__ or e.__context__
    if isinstance(cause, UnicodeDecodeError):
        return UnreadableHeaders(f"header name {cause.object[:64]!r} is not UTF-8: the Kafka client cannot read "
                                 "this record's headers")
    return UnreadableHeaders(f"the Kafka client cannot read this record's headers: {e}")


class KafkaSource:
    """A subscribed consumer.  Callbacks run inside consume(), in the caller's thread."""

    def __init__(self, settings: Settings) -> None:
        self.topic = settings.kafka_input_topic
        self._on_assign: PartitionsCallback = lambda tps: None
        self._on_revoke: PartitionsCallback = lambda tps: None
        self.broker_up = False
        self._paused = False
        self._last_warn: dict[str, float] = {}
        self._login = LoginWatch()
        self._access = KafkaAccess(principal(settings), "READ", (self.topic,), settings.kafka_group_id)
        self.consumer = Consumer(consumer_config(settings, {"error_cb": self._on_error, "stats_cb": self._on_stats}))
        self.consumer.subscribe([self.topic], on_assign=self._assigned, on_revoke=self._revoked,
                                on_lost=self._lost)

    def set_rebalance_listener(self, on_assign: PartitionsCallback, on_revoke: PartitionsCallback) -> None:
        """Who hears about partitions coming and going (the pipeline, before its first consume)."""
        self._on_assign = on_assign
        self._on_revoke = on_revoke

    # -- callbacks from librdkafka (in our thread, inside consume/poll)
    def _assigned(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        log.info("partitions_assigned", topic=self.topic, partitions=sorted(p for _, p in tps))
        self.broker_up = True  # the group coordinator just answered
        # librdkafka keeps a partition's pause flag across revoke/assign: set it explicitly, or
        # a partition paused during an outage and handed back later would never be read again.
        if partitions:
            if self._paused:
                consumer.pause(partitions)  # stay paused across a rebalance while the DB is down
            else:
                consumer.resume(partitions)
        self._on_assign(tps)

    def _revoked(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        log.info("partitions_revoked", topic=self.topic, partitions=sorted(p for _, p in tps))
        self._on_revoke(tps)

    def _lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        log.warning("partitions_lost", topic=self.topic, partitions=sorted(p for _, p in tps))
        self._on_revoke(tps)

    def _on_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self.broker_up = False
        self._login(err)  # consume() raises it
        if err.fatal():
            log.error("kafka_error", error_class=err.name(), reason=err.str(), fatal=True)
        else:
            self._warn_rate_limited(err)

    def _warn_rate_limited(self, err: KafkaError) -> None:
        now = time.monotonic()
        if now - self._last_warn.get(err.name(), 0.0) > 10:
            self._last_warn[err.name()] = now
            log.warning("kafka_error", error_class=err.name(), reason=err.str())

    def _on_stats(self, stats_json: str) -> None:
        try:
            stats = json.loads(stats_json)
            # Every 5 s (statistics.interval.ms): whether a broker connection is up, either way.
            states = [b.get("state") for b in stats.get("brokers", {}).values() if b.get("nodeid", -1) >= 0]
            if states:
                self.broker_up = "UP" in states
        except (ValueError, AttributeError, TypeError):
            pass

    # -- the calls the pipeline makes
    def consume(self, max_records: int, timeout: float) -> list[SourceRecord]:
        try:
            msgs = self.consumer.consume(num_messages=max(1, max_records), timeout=max(0.0, timeout))
        except KafkaException as e:
            raise classify_kafka_error(e, "consume", self._access) from e
        if self._login.refused is not None:  # reported to _on_error during consume()
            raise classify_kafka_error(self._login.refused, "consume")
        out: list[SourceRecord] = []
        append = out.append  # the per-record loop of the hot path: kept to the calls it needs
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                # Fatal: librdkafka's fatal errors and those only the operator can fix (a
                # missing ACL: exit with the reason instead of idling with a warning for ever).
                # The rest (e.g. a topic not created yet) clear up on their own: warn.
                kind = classify_kafka_error(err, "consume", self._access)
                if isinstance(kind, FatalError):
                    raise kind
                self._warn_rate_limited(err)
                continue
            ts_type, ts = m.timestamp()
            # topic/partition/offset are set on every fetched message.
            append(_new_record(SourceRecord, (m.topic(), m.partition(), m.offset(), m.key(), m.value(),
                                              read_headers(m), ts if ts_type else None)))
        if msgs:  # a fetch answered; an assignment alone says nothing about the broker now
            self.broker_up = True
        return out

    def pause(self) -> None:
        if not self._paused:
            self._paused = True
            self.consumer.pause(self.consumer.assignment())
            log.info("consumer_paused", topic=self.topic)

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            self.consumer.resume(self.consumer.assignment())
            log.info("consumer_resumed", topic=self.topic)

    @property
    def paused(self) -> bool:
        return self._paused

    def lags(self, committed: dict[TP, int]) -> dict[int, int]:
        """Records between what we committed (or our position) and the partition's end, per
        assigned partition.  Uses the watermarks cached from fetches: no broker round trip."""
        out: dict[int, int] = {}
        assigned = self.consumer.assignment()
        positions = {(p.topic, p.partition): p.offset for p in self.consumer.position(assigned)}
        for tp in assigned:
            key = (tp.topic, tp.partition)
            try:
                _, high = self.consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            base = committed.get(key, positions.get(key, -1))
            if high is not None and high >= 0 and base is not None and base >= 0:
                out[tp.partition] = max(0, high - base)
        return out

    def assignment(self) -> set[TP]:
        return {(p.topic, p.partition) for p in self.consumer.assignment()}

    def group_metadata(self) -> Any:
        return self.consumer.consumer_group_metadata()

    def commit(self, offsets: dict[TP, int]) -> None:
        """Synchronous commit of explicit offsets (non-transactional mode)."""
        commit_offsets(self.consumer, offsets, self._access)

    def close(self) -> None:
        with contextlib.suppress(KafkaException, RuntimeError):
            self.consumer.close()
