"""Makes a batch's DLQ records durable and commits its offsets (the Kafka side of a batch).

Two modes, chosen by KAFKA_TRANSACTIONAL:
* transactional (default): DLQ records and the offset commit are one Kafka transaction, so a
  crash between them leaves neither behind, and each DLQ record appears exactly once for
  read_committed readers;
* plain: produce the DLQ records, wait until every one is acknowledged, then commit offsets
  (at-least-once: a crash in between may repeat DLQ records).  For clusters where the sink
  may not use transactions.
Both raise RetryableError for what a retry can fix and FatalError for what it cannot.
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

log = get_logger("sink.committer")

TP = tuple[str, int]


class Committer(Protocol):
    def prepare(self) -> None: ...

    def complete(self, dlq: Sequence[DlqRecord], offsets: dict[TP, int]) -> None: ...

    def close(self) -> None: ...


class OffsetSink(Protocol):
    def group_metadata(self) -> Any: ...

    def commit(self, offsets: dict[TP, int]) -> None: ...


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
        # bootstraps from bootstrap.servers (TransactionalCommitter._discard).
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
    """What the DLQ producer does: write the DLQ topic, commit the group's offsets in its transactions."""
    return KafkaAccess(principal(settings), "WRITE", (dlq_topic,), settings.kafka_group_id,
                       f"{transactional_id_prefix(settings)}*")


_LIBRDKAFKA_MAX_MESSAGE_BYTES = 1_000_000_000  # the largest message.max.bytes librdkafka accepts
_LIBRDKAFKA_BATCH_SIZE = 1_000_000  # its batch.size default


def sized_config(settings: Settings, transactional: bool, dlq_max_bytes: int) -> tuple[dict[str, Any], int]:
    """producer_config for a DLQ topic taking dlq_max_bytes per record, and the largest DLQ
    record (record_bytes) both that producer and the topic take."""
    conf = producer_config(settings, transactional, dlq_max_bytes)
    return conf, min(dlq_max_bytes, int(conf["message.max.bytes"]))


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


def _too_large(err: Any) -> bool:
    return err is not None and err.code() == KafkaError.MSG_SIZE_TOO_LARGE


def lower_limit(limit: int) -> int:
    """The broker refused DLQ records as too large although they fit `limit`: the topic takes
    less than known (its config could not be read).  Half of it, for the records and the
    producer's batches (a batch of records that fit alone can be refused as a whole): a few
    retries find a limit the topic takes, and no record is retried for ever over its size."""
    lowered = max(_MIN_RECORD_LIMIT, limit // 2)
    log.warning("dlq_limit_lowered", limit_bytes=lowered, previous_limit_bytes=limit,
                hint="the DLQ topic takes less than its max.message.bytes was read or assumed to be")
    return lowered


_MIN_RECORD_LIMIT = 1024  # below this even our headers alone cannot fit


class TransactionalCommitter:
    def __init__(self, settings: Settings, source: OffsetSink, dlq_topic: str, timeout: float = 10.0,
                 dlq_max_bytes: int = KAFKA_DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self._settings = settings
        self._source = source
        self._topic = dlq_topic
        self._timeout = timeout
        self._dlq_max_bytes = dlq_max_bytes
        _, self._limit = sized_config(settings, True, dlq_max_bytes)
        # One id for every producer this committer makes: a replacement's init_transactions()
        # fences its predecessor and has the broker abort that one's open transaction at once.
        self._transactional_id = transactional_id_for(settings)
        self._access = dlq_access(settings, dlq_topic)
        self._producer: Producer | None = None
        self._in_txn = False
        # What the transaction whose commit_transaction() timed out holds, while librdkafka
        # goes on committing it in the background (see _commit).
        self._unfinished: _Work | None = None

    def prepare(self) -> None:
        """Register the transactional producer with the broker (init_transactions) now, at
        startup: it takes 50-500 ms (measured), which the first batch's commit would otherwise
        wait for with consumption stalled, and a broker or ACL that refuses transactions is
        found before any row is written rather than after the first batch."""
        self._ensure_producer()

    def _ensure_producer(self) -> Producer:
        if self._producer is None:
            conf = producer_config(self._settings, transactional=True, dlq_max_bytes=self._dlq_max_bytes,
                                   transactional_id=self._transactional_id)
            watch = LoginWatch()
            p = Producer({**conf, "error_cb": watch})
            try:
                p.init_transactions(self._timeout)
            except KafkaException as e:
                watch.check(p, "init_transactions")  # a refused login times init_transactions out
                raise _classify(kafka_error(e), "init_transactions", self._access) from e  # p is not kept
            self._producer = p
            log.info("kafka_transactions_ready", topic=self._topic, transactional_id=conf["transactional.id"])
        return self._producer

    def _drop_producer(self) -> None:
        self._producer = None
        self._in_txn = False
        self._unfinished = None

    def complete(self, dlq: Sequence[DlqRecord], offsets: dict[TP, int]) -> None:
        """One transaction: produce the DLQ records, add the offsets, commit."""
        if not dlq and not offsets:
            return
        p = self._ensure_producer()
        work = _Work.of(dlq, offsets)
        refused: list[Any] = []  # delivery errors: the one commit_transaction() reports may be a later one
        try:
            if self._unfinished is not None:
                # The last commit_transaction() timed out.  librdkafka goes on committing that
                # transaction and refuses every other transactional call (_CONFLICT) until
                # commit_transaction() is called again: finish it first.
                unfinished, self._unfinished = self._unfinished, None
                self._commit(p, unfinished)
                if work.within(unfinished):
                    return  # this retry's DLQ records and offsets are in it: committed, once
            if self._in_txn:
                p.abort_transaction(self._timeout)
                self._in_txn = False
            p.begin_transaction()
            self._in_txn = True
            for rec in dlq:
                self._produce(p, rec, refused)
            if offsets:
                tps = [TopicPartition(t, part, o) for (t, part), o in offsets.items()]
                p.send_offsets_to_transaction(tps, self._source.group_metadata(), self._timeout)
            self._commit(p, work)
        except KafkaException as e:
            err = kafka_error(e)
            if _too_large(err) or any(map(_too_large, refused)):
                self._lower_limit()
            out = _classify(err, "dlq_commit", self._access)
            # A transaction that failed (not a commit that timed out: that one is resumed, see
            # _commit) is not committed.  Aborting it and going on with this producer is not
            # enough: what it still had in flight to a broker that went away came back into the
            # next transaction with a sequence gap and failed that one too (OUT_OF_ORDER_SEQUENCE_
            # NUMBER, chaos broker_sigkill with debug=eos).  A new producer under the same
            # transactional.id fences this one instead, bootstraps afresh, and batches under
            # the limit _lower_limit may just have lowered.
            self._discard(p)
            raise out from e

    def _lower_limit(self) -> None:
        self._dlq_max_bytes = lower_limit(self._limit)
        _, self._limit = sized_config(self._settings, True, self._dlq_max_bytes)

    def _produce(self, p: Producer, rec: DlqRecord, refused: list[Any]) -> None:
        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                refused.append(err)

        rec = fit(rec, self._limit)
        produce_waiting(p, self._topic, value=rec.value, key=rec.key, headers=list(rec.headers),
                        on_delivery=on_delivery)

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

    def _abort(self, p: Producer) -> None:
        try:
            p.abort_transaction(self._timeout)
            self._in_txn = False
        except KafkaException:
            self._drop_producer()

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
            # the pipeline saw fail are re-read and absorbed by ON CONFLICT on the next start.
            with contextlib.suppress(KafkaException):
                p.commit_transaction(self._timeout)
                self._in_txn = False
        elif self._in_txn:
            self._abort(p)
        # Bounded like every other call here: a shutdown against a broker that does not answer
        # takes the committer's timeout per step, not a fixed 5 s more.
        p.flush(min(5.0, self._timeout))
        self._drop_producer()


def _classify(err: Any, cause: str, access: KafkaAccess) -> Exception:
    out = classify_kafka_error(err, cause, access)
    if isinstance(out, FatalError) and err is not None and (err.code() in _FENCED or (
            err.fatal() and "AUTHORIZATION" not in err.name())):
        # Fenced, or the producer reached a fatal state (e.g. INVALID_TXN_STATE after a broker
        # restart): the rows are written, so a fresh producer (new epoch) redoes the Kafka side.
        out = RetryableError(cause, f"{err.name()}: {err.str()}")
    return out


@dataclass(frozen=True, slots=True)
class _Work:
    """What one transaction holds: its offsets and its DLQ records, told apart by the origin
    they carry (their failed_at header differs between retries of the same batch)."""

    offsets: frozenset[tuple[TP, int]]
    dlq: Counter[_Origin]

    @classmethod
    def of(cls, dlq: Sequence[DlqRecord], offsets: dict[TP, int]) -> _Work:
        return cls(frozenset(offsets.items()), Counter(map(_origin, dlq)))

    def within(self, other: _Work) -> bool:
        """Everything of this is in `other` (the same batches, or fewer after a revoke)."""
        return self.offsets <= other.offsets and self.dlq <= other.dlq


_ORIGIN = frozenset({H_TOPIC, H_PARTITION, H_OFFSET})
_Origin = tuple[bytes | None, bytes | None, tuple[tuple[str, bytes | None], ...]]


def _origin(rec: DlqRecord) -> _Origin:
    """A DLQ record without what changes between retries of its batch (failed_at)."""
    return rec.key, rec.value, tuple(h for h in rec.headers if h[0] in _ORIGIN)


_FENCED = frozenset({KafkaError._FENCED, getattr(KafkaError, "PRODUCER_FENCED", -1),
                     KafkaError.INVALID_PRODUCER_EPOCH})


class PlainCommitter:
    def __init__(self, settings: Settings, source: OffsetSink, dlq_topic: str, timeout: float = 30.0,
                 dlq_max_bytes: int = KAFKA_DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self._source = source
        self._topic = dlq_topic
        self._timeout = timeout
        self._settings = settings
        self._access = dlq_access(settings, dlq_topic)
        conf, self._limit = sized_config(settings, False, dlq_max_bytes)
        self._producer = Producer(conf)
        # The batch whose complete() failed, and its DLQ records acknowledged so far.
        self._retrying: tuple[_Work, Counter[_Origin]] | None = None

    def prepare(self) -> None:
        """Nothing to set up: a plain producer connects on its first record."""

    def complete(self, dlq: Sequence[DlqRecord], offsets: dict[TP, int]) -> None:
        """Produce DLQ records, wait for every ack, then commit offsets.  A retry of the same
        batch (the pipeline's, after a failure here) does not produce again what was acknowledged."""
        work = _Work.of(dlq, offsets)
        if self._retrying is None or self._retrying[0] != work:
            self._retrying = (work, Counter())
        acked = self._retrying[1]
        errors: list[Any] = []

        def on_ack(origin: _Origin) -> Callable[[Any, Any], None]:
            def ack(err: Any, _msg: Any) -> None:
                if err is None:
                    acked[origin] += 1
                else:
                    errors.append(err)
            return ack

        todo = Counter(acked)
        for rec in dlq:
            origin = _origin(rec)
            if todo[origin]:  # acknowledged in an earlier attempt
                todo[origin] -= 1
                continue
            rec = fit(rec, self._limit)
            try:
                produce_waiting(self._producer, self._topic, value=rec.value, key=rec.key,
                                headers=list(rec.headers), on_delivery=on_ack(origin))
            except KafkaException as e:
                raise classify_kafka_error(e, "dlq_publish", self._access) from e
        if dlq:
            left = self._producer.flush(self._timeout)
            if left:
                raise RetryableError("dlq_publish", f"{left} DLQ records not acknowledged in {self._timeout}s")
            if errors:
                if any(map(_too_large, errors)):
                    conf, self._limit = sized_config(self._settings, False, lower_limit(self._limit))
                    self._producer = Producer(conf)  # batches under the new limit (the old one is drained)
                raise classify_kafka_error(errors[0], "dlq_publish", self._access)
            log.debug("dlq_published", topic=self._topic, dlq=len(dlq))
        self._source.commit(offsets)
        self._retrying = None

    def close(self) -> None:
        self._producer.flush(5)
