"""The Kafka side of a batch: the records it produces and its consumer offsets, made durable
together.  The sink (its DLQ records) and `sink-dlq replay` (records that failed again, or
re-published ones) both go through here.

Two modes, chosen by KAFKA_TRANSACTIONAL:
* transactional (default): the records and the offset commit are one Kafka transaction, so a
  crash between them leaves neither behind, and each record appears exactly once for
  read_committed readers;
* plain: produce the records, wait until every one is acknowledged, then commit the offsets
  (at-least-once: a crash in between may repeat records).  For clusters where transactions
  are not allowed.
complete() raises RetryableError for what a retry can fix (calling it again with the same
batch is safe: nothing is produced or committed twice) and FatalError for what it cannot.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from sink.envelope import H_OFFSET, H_PARTITION, H_TOPIC, DlqRecord, fit_record, parse_headers, record_bytes
from sink.errors import FatalError, KafkaAccess, RetryableError, classify_kafka_error, kafka_error
from sink.kafka_auth import LoginWatch, principal
from sink.logs import get_logger
from sink.produce import produce_waiting
from sink.settings import Settings
from sink.topics import KAFKA_DEFAULT_MAX_MESSAGE_BYTES

log = get_logger("sink.outbox")

TP = tuple[str, int]
Output = tuple[str, DlqRecord]  # (topic, record)


class OffsetSink(Protocol):
    def group_metadata(self) -> Any: ...

    def commit(self, offsets: dict[TP, int]) -> None: ...


class Outbox(Protocol):
    def prepare(self) -> None: ...

    def complete(self, outputs: Sequence[Output], offsets: dict[TP, int]) -> None: ...

    def close(self) -> None: ...


def producer_config(settings: Settings, transactional: bool,
                    dlq_max_bytes: int = KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
                    transactional_id: str | None = None) -> dict[str, Any]:
    """dlq_max_bytes: the largest record the DLQ topic takes (its max.message.bytes).
    transactional_id: the one to use (default: transactional_id_for(settings))."""
    conf: dict[str, Any] = {
        **settings.kafka_client_config(),
        "client.id": f"kafka-timescale-sink-dlq-{socket.gethostname()}",
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "zstd",
    }
    # librdkafka refuses a record above message.max.bytes (default 1,000,000) and batches up to
    # batch.size: both follow the DLQ topic, so a record the topic takes is produced, and a
    # batch of several is never larger than the topic takes.  Set in KAFKA_EXTRA_CONFIG, they win.
    limit = min(dlq_max_bytes, _LIBRDKAFKA_MAX_MESSAGE_BYTES)
    conf.setdefault("message.max.bytes", limit)
    conf.setdefault("batch.size", min(limit, _LIBRDKAFKA_BATCH_SIZE))
    if transactional:
        # Zombie fencing comes from the consumer group metadata (KIP-447), so the id only has
        # to be unique.  A stable one (KAFKA_TRANSACTIONAL_ID, e.g. the pod name) also lets a
        # restarted instance abort its predecessor's open transaction at once.
        conf["transactional.id"] = transactional_id or transactional_id_for(settings)
        # A transaction lives for milliseconds (produce + send offsets + commit).  Keep the
        # timeout short: the offsets of a killed instance's open transaction stay "pending"
        # (consumers of the group wait on them) until the broker aborts it after this.
        conf["transaction.timeout.ms"] = 10_000
        # When every broker is down, librdkafka 2.16 re-bootstraps and decommissions the brokers
        # it learned, but its producer keeps the decommissioned one as the group coordinator:
        # the first send_offsets_to_transaction() after the brokers are back then waits for
        # ever, past its timeout (librdkafka#5511 with #5456; measured: each broker restart in
        # chaos_tests ended in the watchdog's exit).  Without re-bootstrap the producer
        # reconnects to the brokers it knows; one that cannot is replaced, and a new one
        # bootstraps from bootstrap.servers (TransactionalOutbox._discard).
        conf.setdefault("metadata.recovery.strategy", "none")
    return conf


def transactional_id_for(settings: Settings) -> str:
    """KAFKA_TRANSACTIONAL_ID if set, else a new unique id (each call makes another)."""
    return settings.kafka_transactional_id or (
        f"{transactional_id_prefix(settings)}{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    )


def transactional_id_prefix(settings: Settings) -> str:
    """What every transactional id of this sink (and of its `check`) starts with: the ACL's PREFIXED name."""
    if settings.kafka_transactional_id:
        return settings.kafka_transactional_id
    return f"kafka-timescale-sink.{settings.kafka_group_id}."


def dlq_access(settings: Settings, dlq_topic: str) -> KafkaAccess:
    """What the sink's DLQ producer does: write the DLQ topic, commit the group's offsets in its transactions."""
    return KafkaAccess(principal(settings), "WRITE", (dlq_topic,), settings.kafka_group_id,
                       f"{transactional_id_prefix(settings)}*")


_LIBRDKAFKA_MAX_MESSAGE_BYTES = 1_000_000_000  # the largest message.max.bytes librdkafka accepts
_LIBRDKAFKA_BATCH_SIZE = 1_000_000  # its batch.size default
_MIN_RECORD_LIMIT = 1024  # below this even our headers alone cannot fit


def _record_limit(conf: dict[str, Any], dlq_max_bytes: int) -> int:
    """The largest DLQ record (record_bytes) both the producer and the topic take."""
    return min(dlq_max_bytes, int(conf["message.max.bytes"]))


def fit(rec: DlqRecord, limit: int) -> DlqRecord:
    """fit_record, and a log line when it had to leave something out."""
    out = fit_record(rec, limit)
    if out is not rec:
        info = parse_headers(rec.headers)
        # topic/partition/offset: the input record's, so `logs search --record` finds this line.
        log.error("dlq_record_too_large", topic=info.topic, partition=info.partition,
                  offset=info.offset, record_bytes=record_bytes(rec), limit_bytes=limit,
                  dropped=parse_headers(out.headers).dropped,
                  hint="the original stays in the input topic at that offset until its retention deletes it; "
                       "raise max.message.bytes of the DLQ topic to keep such records whole")
    return out


def lower_limit(limit: int) -> int:
    """The broker refused DLQ records as too large although they fit `limit`: the topic takes
    less than known (its config could not be read).  Half of it, for the records and the
    producer's batches (a batch of records that fit alone can be refused as a whole): a few
    retries find a limit the topic takes, and no record is retried for ever over its size."""
    lowered = max(_MIN_RECORD_LIMIT, limit // 2)
    log.warning("dlq_limit_lowered", limit_bytes=lowered, previous_limit_bytes=limit,
                hint="the DLQ topic takes less than its max.message.bytes was read or assumed to be")
    return lowered


def _too_large(err: Any) -> bool:
    return err is not None and err.code() == KafkaError.MSG_SIZE_TOO_LARGE


class _Producing:
    """What both modes share: the producer's settings, the DLQ record limit (lowered when the
    broker refuses records the known limit allows), and fitting DLQ records to it."""

    def __init__(self, settings: Settings, dlq_topic: str, transactional_id: str | None,
                 dlq_max_bytes: int, client_id: str | None, access: KafkaAccess | None) -> None:
        self._settings = settings
        self._dlq_topic = dlq_topic
        self._access = access  # what an authorization error names as the grant to add
        self._transactional_id = transactional_id
        self._client_id = client_id
        self._set_limit(dlq_max_bytes)

    def _set_limit(self, dlq_max_bytes: int) -> None:
        self._dlq_max_bytes = dlq_max_bytes
        self._limit = _record_limit(self._config(), dlq_max_bytes)

    def _config(self) -> dict[str, Any]:
        conf = producer_config(self._settings, self._transactional_id is not None, self._dlq_max_bytes,
                               self._transactional_id)
        if self._client_id is not None:
            conf["client.id"] = self._client_id
        return conf

    def _lower_limit(self) -> None:
        self._set_limit(lower_limit(self._limit))

    def _send(self, producer: Any, topic: str, rec: DlqRecord, on_delivery: Callable[[Any, Any], None]) -> None:
        """Queue one record; DLQ records cut down to what the DLQ topic takes, others as they are."""
        if topic == self._dlq_topic:
            rec = fit(rec, self._limit)
        produce_waiting(producer, topic, value=rec.value, key=rec.key, headers=list(rec.headers),
                        on_delivery=on_delivery)


class TransactionalOutbox(_Producing):
    """Each complete() is one Kafka transaction: produce, add the group's offsets, commit.

    One transactional.id for every producer this outbox makes: a replacement's
    init_transactions() fences its predecessor and has the broker abort that one's open
    transaction at once.  `fenced`: what to say when another process with the same id takes
    over (a replay of the same group); without it the outbox makes a new producer and goes on
    (the sink's ids are unique per process: a fence there is this process's own producer)."""

    def __init__(self, settings: Settings, source: OffsetSink, dlq_topic: str, transactional_id: str,
                 timeout: float = 10.0, dlq_max_bytes: int = KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
                 client_id: str | None = None, fenced: str | None = None, access: KafkaAccess | None = None) -> None:
        super().__init__(settings, dlq_topic, transactional_id, dlq_max_bytes, client_id, access)
        self._source = source
        self._timeout = timeout
        self._fenced = fenced
        self._producer: Producer | None = None
        self._in_txn = False
        # What the transaction whose commit_transaction() timed out holds, while librdkafka
        # goes on committing it in the background (see _commit).
        self._unfinished: _Work | None = None

    def prepare(self) -> None:
        """Register the transactional producer with the broker (init_transactions) now, at
        startup: it takes 50-500 ms, which the first batch's commit would otherwise wait for
        with consumption stalled; a broker or ACL that refuses transactions is found before
        any row is written; and a killed predecessor's open transaction (same id) is aborted."""
        self._ensure_producer()

    def _ensure_producer(self) -> Producer:
        if self._producer is None:
            conf = self._config()
            watch = LoginWatch()
            p = Producer({**conf, "error_cb": watch})
            try:
                p.init_transactions(self._timeout)
            except KafkaException as e:
                watch.check(p, "init_transactions")  # a refused login times init_transactions out
                raise self._classify(kafka_error(e), "init_transactions") from e  # p is not kept
            self._producer = p
            log.info("kafka_transactions_ready", topic=self._dlq_topic, transactional_id=conf["transactional.id"])
        return self._producer

    def _drop_producer(self) -> None:
        self._producer = None
        self._in_txn = False
        self._unfinished = None

    def complete(self, outputs: Sequence[Output], offsets: dict[TP, int]) -> None:
        """One transaction: produce the records, add the offsets, commit."""
        if not outputs and not offsets:
            return
        p = self._ensure_producer()
        work = _Work.of(outputs, offsets)
        refused: list[Any] = []  # delivery errors: the one commit_transaction() reports may be a later one
        try:
            if self._unfinished is not None:
                # The last commit_transaction() timed out.  librdkafka goes on committing that
                # transaction and refuses every other transactional call (_CONFLICT) until
                # commit_transaction() is called again: finish it first.
                unfinished, self._unfinished = self._unfinished, None
                self._commit(p, unfinished)
                if work.within(unfinished):
                    return  # this retry's records and offsets are in it: committed, once
            if self._in_txn:
                p.abort_transaction(self._timeout)
                self._in_txn = False
            p.begin_transaction()
            self._in_txn = True
            for topic, rec in outputs:
                self._produce(p, topic, rec, refused)
            if offsets:
                tps = [TopicPartition(t, part, o) for (t, part), o in offsets.items()]
                p.send_offsets_to_transaction(tps, self._source.group_metadata(), self._timeout)
            self._commit(p, work)
        except KafkaException as e:
            err = kafka_error(e)
            if _too_large(err) or any(map(_too_large, refused)):
                self._lower_limit()
            out = self._classify(err, "dlq_commit")
            # A transaction that failed (not a commit that timed out: that one is resumed, see
            # _commit) is not committed.  Aborting it and going on with this producer is not
            # enough: what it still had in flight to a broker that went away came back into the
            # next transaction with a sequence gap and failed that one too (OUT_OF_ORDER_SEQUENCE_
            # NUMBER, chaos broker_sigkill with debug=eos).  A new producer under the same
            # transactional.id fences this one instead, bootstraps afresh, and batches under
            # the limit _lower_limit may just have lowered.
            self._discard(p)
            raise out from e

    def _produce(self, p: Producer, topic: str, rec: DlqRecord, refused: list[Any]) -> None:
        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                refused.append(err)

        self._send(p, topic, rec, on_delivery)

    def _commit(self, p: Producer, work: _Work) -> None:
        # A retriable commit error leaves the transaction committing: commit again, never abort.
        for _ in range(3):
            try:
                p.commit_transaction(self._timeout)
                self._in_txn = False
                return
            except KafkaException as e:
                err = kafka_error(e)
                if err is None or not err.retriable() or err.txn_requires_abort() or err.fatal():
                    raise
        self._unfinished = work  # the next complete() (or close()) resumes this commit
        raise RetryableError("dlq_commit", "commit_transaction kept timing out")

    def _classify(self, err: Any, cause: str) -> Exception:
        out = classify_kafka_error(err, cause, self._access)
        if err is not None and err.code() in _FENCED and self._fenced is not None:
            return FatalError(self._fenced)
        if isinstance(out, FatalError) and err is not None and (err.code() in _FENCED or (
                err.fatal() and "AUTHORIZATION" not in err.name())):
            # Fenced, or the producer reached a fatal state (e.g. INVALID_TXN_STATE after a broker
            # restart): the rows are written, so a fresh producer (new epoch) redoes the Kafka side.
            out = RetryableError(cause, f"{err.name()}: {err.str()}")
        return out

    def _discard(self, p: Producer) -> None:
        """Drop the producer without waiting on the broker: its queued and in-flight records
        are purged (their transaction is aborted by the broker when the next producer
        registers)."""
        self._drop_producer()
        with contextlib.suppress(KafkaException, RuntimeError):
            p.purge(in_queue=True, in_flight=True, blocking=False)
            p.poll(0)

    def close(self) -> None:
        p = self._producer
        if p is None:
            return
        if self._unfinished is not None:
            # Only commit_transaction() may be called now; whatever it ends in, the offsets
            # seen failing are re-read on the next start (rows: absorbed by ON CONFLICT).
            with contextlib.suppress(KafkaException):
                p.commit_transaction(self._timeout)
                self._in_txn = False
        elif self._in_txn:
            # Interrupted mid-transaction: abort now rather than leave it to the next start or
            # the transaction timeout (the group's offsets would be pending until then).
            with contextlib.suppress(KafkaException):
                p.abort_transaction(self._timeout)
                self._in_txn = False
        # Bounded like every other call here: a shutdown against a broker that does not answer
        # takes the outbox's timeout per step, not a fixed 5 s more.
        p.flush(min(5.0, self._timeout))
        self._drop_producer()


_FENCED = frozenset({KafkaError._FENCED, getattr(KafkaError, "PRODUCER_FENCED", -1),
                     KafkaError.INVALID_PRODUCER_EPOCH})


class PlainOutbox(_Producing):
    """KAFKA_TRANSACTIONAL=false: produce, wait for every acknowledgement, then commit the offsets.

    At-least-once: a crash between the acknowledgements and the commit repeats those records on
    the next start (rows stay exactly once: ON CONFLICT DO NOTHING)."""

    def __init__(self, settings: Settings, source: OffsetSink, dlq_topic: str, timeout: float = 30.0,
                 dlq_max_bytes: int = KAFKA_DEFAULT_MAX_MESSAGE_BYTES, producer: Any = None,
                 access: KafkaAccess | None = None) -> None:
        super().__init__(settings, dlq_topic, None, dlq_max_bytes, None, access)
        self._source = source
        self._timeout = timeout
        # A confluent_kafka Producer; tests pass a fake.
        self._producer = producer if producer is not None else Producer(self._config())
        self._batch: _Delivery | None = None  # the batch whose complete() failed, kept for its retry

    def prepare(self) -> None:
        """Nothing to set up: a plain producer connects on its first record."""

    def complete(self, outputs: Sequence[Output], offsets: dict[TP, int]) -> None:
        """1. Produce the batch's records.  On a retry of the same batch (the same records from
              the same origins, and the same offsets) only those whose delivery failed or that
              produce() refused: an acknowledged record is never produced again, and one still
              queued is not either (librdkafka delivers it, or reports its failure and it is
              produced on the next retry).
           2. Wait for every record's acknowledgement: RetryableError if one is missing or failed.
           3. Only then commit the offsets.
        """
        work = _Work.of(outputs, offsets)
        batch = self._batch
        if batch is None or batch.work != work:
            batch = self._batch = _Delivery(work, len(outputs))
        # Step 1.
        for i in batch.to_produce():
            topic, rec = outputs[i]
            try:
                self._send(self._producer, topic, rec, batch.on_ack(i))
            except KafkaException as e:  # refused before queueing, e.g. larger than message.max.bytes
                raise classify_kafka_error(e, "dlq_publish", self._access) from e
            batch.mark_queued(i)
        # Step 2.
        if outputs:
            self._producer.flush(self._timeout)
            if batch.queued:
                raise RetryableError("dlq_publish", f"{len(batch.queued)} records not acknowledged in {self._timeout}s")
            if batch.failed:
                errors = list(batch.failed.values())
                if any(map(_too_large, errors)):
                    self._lower_limit()
                    self._producer = Producer(self._config())  # batches under the new limit (the old one is drained)
                raise classify_kafka_error(errors[0], "dlq_publish", self._access)
            log.debug("dlq_published", outputs=len(outputs))
        # Step 3.
        self._source.commit(offsets)
        self._batch = None

    def close(self) -> None:
        self._producer.flush(5)


class _Delivery:
    """One PlainOutbox batch and the delivery state of each of its records, by index."""

    def __init__(self, work: _Work, size: int) -> None:
        self.work = work
        self.size = size
        self.acked: set[int] = set()
        self.queued: set[int] = set()  # produced, no delivery report yet
        self.failed: dict[int, Any] = {}  # the KafkaError of a failed delivery

    def to_produce(self) -> list[int]:
        return [i for i in range(self.size) if i not in self.acked and i not in self.queued]

    def mark_queued(self, i: int) -> None:
        self.queued.add(i)
        self.failed.pop(i, None)

    def on_ack(self, i: int) -> Callable[[Any, Any], None]:
        def ack(err: Any, _msg: Any) -> None:
            self.queued.discard(i)
            if err is None:
                self.acked.add(i)
            else:
                self.failed[i] = err
        return ack


@dataclass(frozen=True, slots=True)
class _Work:
    """What one batch holds: its offsets and its records, told apart by topic and the origin
    they carry (a DLQ record's failed_at header differs between retries of the same batch)."""

    offsets: frozenset[tuple[TP, int]]
    outputs: Counter[_Origin]

    @classmethod
    def of(cls, outputs: Sequence[Output], offsets: dict[TP, int]) -> _Work:
        return cls(frozenset(offsets.items()), Counter(_origin(topic, rec) for topic, rec in outputs))

    def within(self, other: _Work) -> bool:
        """Everything of this is in `other` (the same batches, or fewer after a revoke)."""
        return self.offsets <= other.offsets and self.outputs <= other.outputs


_ORIGIN = frozenset({H_TOPIC, H_PARTITION, H_OFFSET})
_Origin = tuple[str, bytes | None, bytes | None, tuple[tuple[str, bytes | None], ...]]


def _origin(topic: str, rec: DlqRecord) -> _Origin:
    """A record without what changes between retries of its batch (failed_at)."""
    return topic, rec.key, rec.value, tuple(h for h in rec.headers if h[0] in _ORIGIN)
