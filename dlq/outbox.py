"""The Kafka side of a replay batch: records it produces (failed again -> DLQ, or re-published)
and the replay group's DLQ offsets, made durable together.

Why not sink.committer.TransactionalCommitter: it produces to one topic only (``--to-topic``
needs two), and its transactional.id is unique per process.  Here the id is fixed per replay
group, so ``init_transactions`` of a new run aborts whatever a killed run left open (its
records vanish, its offsets were never committed) instead of leaving it to time out while
read_committed readers and this group's offsets wait, and it fences a second replay of the
same group that is still running.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from sink.committer import OffsetSink, producer_config
from sink.envelope import DlqRecord
from sink.errors import FatalError, KafkaAccess, RetryableError, classify_kafka_error, kafka_error
from sink.kafka_auth import LoginWatch
from sink.produce import produce_waiting
from sink.settings import Settings
from sink.topics import KAFKA_DEFAULT_MAX_MESSAGE_BYTES

TP = tuple[str, int]
Output = tuple[str, DlqRecord]  # (topic, record)


def transactional_id(group: str) -> str:
    return f"sink-dlq-replay.{group}"


class TransactionalOutbox:
    """Each complete() is one Kafka transaction: produce, add the group's offsets, commit.

    Raises RetryableError only when the transaction was aborted (nothing of it is visible, so
    calling complete() again is safe), FatalError otherwise: a commit whose outcome is unknown
    is settled by the next run's init_transactions, never guessed at here.
    """

    def __init__(self, settings: Settings, source: OffsetSink, group: str, timeout: float = 30.0,
                 dlq_max_bytes: int = KAFKA_DEFAULT_MAX_MESSAGE_BYTES, access: KafkaAccess | None = None) -> None:
        self._source = source
        self._access = access
        self._timeout = timeout
        conf = producer_config(settings, transactional=True, dlq_max_bytes=dlq_max_bytes)
        conf["transactional.id"] = transactional_id(group)
        conf["client.id"] = f"sink-dlq-replay-{group}"
        watch = LoginWatch()
        self._producer = Producer({**conf, "error_cb": watch})
        self._in_txn = False
        try:
            self._producer.init_transactions(timeout)
        except KafkaException as e:
            watch.check(self._producer, "init_transactions")  # a refused login times init_transactions out
            raise classify_kafka_error(e, "init_transactions", access) from e

    def complete(self, outputs: Sequence[Output], offsets: dict[TP, int]) -> None:
        if not outputs and not offsets:
            return
        p = self._producer
        try:
            p.begin_transaction()
            self._in_txn = True
            for topic, rec in outputs:
                _produce(p, topic, rec)
            if offsets:
                tps = [TopicPartition(t, part, o) for (t, part), o in offsets.items()]
                p.send_offsets_to_transaction(tps, self._source.group_metadata(), self._timeout)
        except KafkaException as e:
            raise self._abort(kafka_error(e), "replay_produce") from e
        self._commit(p)

    def _commit(self, p: Producer) -> None:
        # A retriable commit error leaves the transaction committing: commit again, never abort.
        for _ in range(5):
            try:
                p.commit_transaction(self._timeout)
                self._in_txn = False
                return
            except KafkaException as e:
                err = kafka_error(e)
                if err is not None and err.txn_requires_abort():
                    raise self._abort(err, "replay_commit") from e
                if err is None or not err.retriable() or err.fatal():
                    raise _fatal(err, "replay_commit", self._access) from e
        raise FatalError("commit_transaction kept timing out; the next run settles the transaction")

    def _abort(self, err: Any, cause: str) -> Exception:
        """Abort the open transaction; retryable only if the abort worked and the error allows it."""
        if err is not None and (err.fatal() or err.code() in _FENCED):
            return _fatal(err, cause, self._access)
        try:
            self._producer.abort_transaction(self._timeout)
            self._in_txn = False
        except KafkaException as e:
            return _fatal(kafka_error(e), "abort_transaction", self._access)
        out = classify_kafka_error(err, cause, self._access)
        return out if isinstance(out, FatalError) else RetryableError(cause, f"transaction aborted: {out}")

    def close(self) -> None:
        if self._in_txn:
            # Interrupted mid-transaction: abort now rather than leave it to the next run or
            # the transaction timeout (the group's offsets would be pending until then).
            with contextlib.suppress(KafkaException):
                self._producer.abort_transaction(5)
        self._producer.flush(5)


def _fatal(err: Any, cause: str, access: KafkaAccess | None) -> FatalError:
    code = err.code() if err is not None else None
    if code in _FENCED:
        return FatalError("another replay with the same consumer group took over (this one was fenced); "
                          "its batch in flight was not committed")
    out = classify_kafka_error(err, cause, access)
    return out if isinstance(out, FatalError) else FatalError(str(out))


_FENCED = frozenset({KafkaError._FENCED, getattr(KafkaError, "PRODUCER_FENCED", -1),
                     KafkaError.INVALID_PRODUCER_EPOCH})


class PlainOutbox:
    """KAFKA_TRANSACTIONAL=false: produce, wait for every ack, then commit the offsets.

    At-least-once: a crash between the acks and the commit repeats those records on the next
    run (rows stay exactly once: ON CONFLICT DO NOTHING).  A retried complete() of the same
    batch does not repeat the records already acknowledged."""

    def __init__(self, settings: Settings, source: OffsetSink, timeout: float = 30.0,
                 producer: Any = None, dlq_max_bytes: int = KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
                 access: KafkaAccess | None = None) -> None:
        self._source = source
        self._access = access
        self._timeout = timeout
        # A confluent_kafka Producer; tests pass a fake.
        self._producer = producer if producer is not None else Producer(
            producer_config(settings, transactional=False, dlq_max_bytes=dlq_max_bytes))
        self._batch: _Delivery | None = None  # the batch whose complete() failed, kept for its retry

    def complete(self, outputs: Sequence[Output], offsets: dict[TP, int]) -> None:
        """1. Produce the batch's records.  On a retry of the same batch (the replay calls again
              with the same arguments) only those whose delivery failed or that produce() refused:
              an acknowledged record is never produced again, and one still queued is not either
              (librdkafka delivers it, or reports its failure and it is produced on the next retry).
           2. Wait for every record's acknowledgement: RetryableError if one is missing or failed.
           3. Only then commit the offsets.
        """
        batch = self._batch
        if batch is None or not batch.same(outputs, offsets):
            batch = self._batch = _Delivery(outputs, offsets)
        # Step 1.
        for i in batch.to_produce():
            topic, rec = batch.outputs[i]
            try:
                _produce(self._producer, topic, rec, batch.on_ack(i))
            except KafkaException as e:  # refused before queueing, e.g. larger than message.max.bytes
                raise classify_kafka_error(e, "replay_produce", self._access) from e
            batch.mark_queued(i)
        # Step 2.
        if batch.outputs:
            self._producer.flush(self._timeout)
            if batch.queued:
                raise RetryableError("replay_produce",
                                     f"{len(batch.queued)} records not acknowledged in {self._timeout}s")
            if batch.failed:
                raise classify_kafka_error(next(iter(batch.failed.values())), "replay_produce", self._access)
        # Step 3.
        self._source.commit(offsets)
        self._batch = None

    def close(self) -> None:
        self._producer.flush(5)


class _Delivery:
    """One PlainOutbox batch and the delivery state of each of its records, by index."""

    def __init__(self, outputs: Sequence[Output], offsets: dict[TP, int]) -> None:
        self.outputs = list(outputs)
        self.offsets = dict(offsets)
        self.acked: set[int] = set()
        self.queued: set[int] = set()  # produced, no delivery report yet
        self.failed: dict[int, Any] = {}  # the KafkaError of a failed delivery

    def same(self, outputs: Sequence[Output], offsets: dict[TP, int]) -> bool:
        return offsets == self.offsets and list(outputs) == self.outputs

    def to_produce(self) -> list[int]:
        return [i for i in range(len(self.outputs)) if i not in self.acked and i not in self.queued]

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


def _produce(p: Producer, topic: str, rec: DlqRecord, on_ack: Any = None) -> None:
    kw: dict[str, Any] = {"value": rec.value, "key": rec.key, "headers": list(rec.headers)}
    if on_ack is not None:
        kw["on_delivery"] = on_ack
    produce_waiting(p, topic, **kw)
