"""The loop: consume -> decode -> batch -> write -> commit, with the DLQ on the side.

Only this module knows the order of things; the adapters (source, writer, committer) behind
the Protocols below are swapped for in-memory fakes in tests/test_pipeline.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from tenacity import RetryCallState

from sink.batcher import Batch, Batcher, Clock
from sink.breaker import DlqBreaker, DlqBreakerPolicy
from sink.commit_policy import CommitPolicy, CommitPolicyState
from sink.decode import decode_many
from sink.envelope import DlqRecord, to_dlq_record
from sink.errors import FatalError, RetryableError, SinkError, retry_log_fields
from sink.health import HealthState
from sink.logs import get_logger
from sink.metrics import Metrics
from sink.retry import RetryPolicy, retrying
from sink.settings import Settings
from sink.types import Rejection, SourceRecord
from sink.upsert import IGNORE, WriteMode
from sink.watchdog import Watchdog
from sink.write_stage import BatchState, InFlight, Writer, WriteStage, Written

log = get_logger("sink.pipeline")

TP = tuple[str, int]
T = TypeVar("T")


class Source(Protocol):
    broker_up: bool

    def lags(self, committed: dict[TP, int]) -> dict[int, int]: ...

    def set_rebalance_listener(self, on_assign: Callable[[list[TP]], None],
                               on_revoke: Callable[[list[TP]], None]) -> None: ...

    def consume(self, max_records: int, timeout: float) -> list[SourceRecord]: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def assignment(self) -> set[TP]: ...


class Committer(Protocol):
    def complete(self, dlq: Sequence[DlqRecord], offsets: dict[TP, int]) -> None: ...


_FOR_EVER = RetryPolicy(attempts=0, initial_backoff=0.5, max_backoff=30.0)  # the settings' defaults


@dataclass(frozen=True)
class PipelineConfig:
    topic: str
    batch_size: int = 2500
    batch_timeout: float = 1.0
    max_splits: int = 64
    retry: RetryPolicy = _FOR_EVER
    shutdown_timeout: float = 30.0
    poll_timeout: float = 0.05  # a batch opens (and its timeout starts) within 50 ms of its first record
    # While the next batch is already being written, written batches wait up to this long and
    # share one Kafka commit (transaction); with nothing else in flight a batch commits at once.
    commit_interval: float = 0.5
    idle_db_check: float = 5.0  # seconds without a write before /readyz pings the database
    # The Kafka side of a batch takes milliseconds; its calls time out after 10 s each.  Past
    # this, a librdkafka call ignored its timeout: exit and let the supervisor restart us.
    commit_deadline: float = 90.0
    write_mode: WriteMode = IGNORE

    @classmethod
    def from_settings(cls, s: Settings) -> PipelineConfig:
        return cls(topic=s.kafka_input_topic, batch_size=s.batch_size, batch_timeout=s.batch_timeout,
                   max_splits=s.bisect_max_splits, retry=RetryPolicy.from_settings(s),
                   shutdown_timeout=s.shutdown_timeout, commit_interval=s.kafka_commit_interval,
                   write_mode=WriteMode.from_settings(s))


class ShutdownExpired(Exception):
    """Stop was requested and the current batch could not be finished in time."""


class Pipeline:
    def __init__(self, cfg: PipelineConfig, source: Source, writer: Writer, committer: Committer, *,
                 breaker: DlqBreaker | None = None, metrics: Metrics | None = None,
                 health: HealthState | None = None, clock: Clock = time.monotonic,
                 watchdog: Watchdog | None = None, more_writers: Sequence[Writer] = ()) -> None:
        self.cfg = cfg
        self.source = source
        self.committer = committer
        self.breaker = breaker or DlqBreaker(DlqBreakerPolicy())
        self.metrics = metrics or Metrics()
        self.health = health or HealthState()
        self._clock = clock
        self.watchdog = watchdog or Watchdog(cfg.commit_deadline)
        self.batcher = Batcher(cfg.batch_size, cfg.batch_timeout, clock)
        # Every batch taken from the batcher and not yet committed, oldest first, with its state:
        # in the write stage (step 1), or through step 2 waiting for the Kafka commit (its rows
        # released: only offsets and rejections are kept, for at most commit_interval).
        self._inflight: list[InFlight] = []
        self._commits = CommitPolicyState(CommitPolicy(cfg.commit_interval), clock)
        # Step 1 in writer threads (one per connection: WRITE_CONCURRENCY batches at a time),
        # while this thread consumes and decodes the next batch and commits the previous ones.
        self._writes = WriteStage([writer, *more_writers], cfg.topic, cfg.max_splits, clock, cfg.write_mode)
        self._held: list[SourceRecord] = []
        self._stop_requested = False
        self._stop_logged = False
        self._stop_deadline = float("inf")
        self._last_db_activity = clock()
        self._last_gauges = 0.0
        self._committed: dict[TP, int] = {}
        source.set_rebalance_listener(self.on_assign, self.on_revoke)

    def in_flight(self) -> list[BatchState]:
        """The states of the batches taken from the batcher and not yet committed, oldest first."""
        return [item.state for item in self._inflight]

    # ------------------------------------------------------------------ control

    def request_stop(self) -> None:
        """Finish the current batch (bounded by shutdown_timeout), commit, and return from run()."""
        # Called from a signal handler: set flags only.  Logging here could deadlock, the
        # handler interrupting this thread inside the logger's (non-reentrant) lock; the loop
        # logs shutdown_requested when it sees the flag.
        if not self._stop_requested:
            self._stop_requested = True
            self._stop_deadline = self._clock() + self.cfg.shutdown_timeout
            self.health.stopping = True

    def _note_stop(self) -> None:
        """Log the stop request once, from the loop (see request_stop)."""
        if self._stop_requested and not self._stop_logged:
            self._stop_logged = True
            log.info("shutdown_requested", timeout_s=self.cfg.shutdown_timeout)

    def run(self) -> None:
        """Run until request_stop(); FatalError propagates (the caller exits non-zero)."""
        try:
            while not self._stop_requested:
                self.step()
            self._note_stop()
            self._drain()
        except ShutdownExpired as e:
            log.warning("shutdown_timeout", reason=str(e))
            self._commit_written()
        except FatalError:
            self._commit_written()
            raise
        finally:
            self._writes.close()

    def step(self) -> None:
        """One turn of the loop: hand a due batch to the writer, commit a written one, or consume.

        Batches overlap: while this thread consumes and decodes the next batch, the writer
        threads stage one batch and insert the one before it (see _start); once the oldest is
        written the next due batch goes to a writer first, and only then does the written one
        go through steps 2-4, so the Kafka round trips hide behind the writes.  Each batch
        still goes through _complete's steps in order, and batches commit in order."""
        self.health.turn()
        self._update_gauges()
        if self._commits.due():
            self._commit_pending()
            return
        due = self.batcher.due()
        if self._writes.ready() or (due and self._writes.full):
            item, written = self._await_write()  # step 1 of the oldest batch (retried here if it failed)
            if due:
                self._start(self.batcher.take())  # step 1 of the next batch begins before the commit
            self._complete(item, written)
            return
        if due:
            self._start(self.batcher.take())
            return
        records = self._next_records()
        self.batcher.add_all(records, decode_many(records))
        if records:
            self.metrics.consumed.inc(len(records))
        elif (not self._writes.busy and not len(self.batcher.batch)
              and self._clock() - self._last_db_activity > self.cfg.idle_db_check):
            self._last_db_activity = self._clock()
            self.health.db_ok = self._writes.check()
            self.metrics.db_connected.set(self.health.db_ok)

    def _next_records(self) -> list[SourceRecord]:
        room = max(1, self.batcher.room())
        if self._held:
            out, self._held = self._held[:room], self._held[room:]
            self._commits.consumed(caught_up=False)
            return out
        timeout = self.cfg.poll_timeout
        if self._writes.busy:
            timeout = min(timeout, 0.005)  # come back soon to commit what the writer finished
        timeout = min(timeout, self._commits.time_left())
        if len(self.batcher.batch):
            timeout = max(0.0, min(timeout, self.batcher.time_left()))
        records = self.source.consume(room, timeout)
        self._commits.consumed(caught_up=len(records) < room)
        return records

    def _drain(self) -> None:
        while self._writes.busy:
            self._complete(*self._await_write())
        while self._held:
            records = self._next_records()
            self.batcher.add_all(records, decode_many(records))
            if self.batcher.due():
                self._flush(self.batcher.take())
        if len(self.batcher.batch):
            self._flush(self.batcher.take())
        if self._committing():
            self._commit_pending()

    # ------------------------------------------------------------------ the guarantee

    def _flush(self, batch: Batch) -> None:
        """All of _complete's steps for one batch, with nothing else in flight."""
        self._start(batch)
        self._complete(*self._await_write())

    def _start(self, batch: Batch) -> None:
        """Step 1 of _complete's list in the write stage: its first attempt at the write."""
        item = InFlight(batch)
        self._inflight.append(item)
        self._writes.submit(item)

    def _await_write(self) -> tuple[InFlight, Written]:
        """Step 1 of _complete's list, finished: the write stage's outcome, or retries here."""
        item = self._writes.oldest
        try:
            # Attempts after the first run here, with consumption paused.
            written = self._writes.result(lambda attempt: self._retry("db_write", attempt))
        except BaseException:
            self._forget(item)
            raise
        self._last_db_activity = self._clock()
        self.health.db_ok = True
        self.metrics.db_connected.set(1)
        self._resume()  # retries paused consumption
        return item, written

    def _complete(self, item: InFlight, written: Written) -> None:
        """Make a batch durable, then commit its offsets.  The order is the guarantee:

        1. Write the batch's valid rows to PostgreSQL in one transaction (INSERT ... ON CONFLICT
           DO NOTHING).  Rows the database rejects (SQLSTATE 22/23) are isolated by bisection,
           every other row is written, and the rejected ones become DLQ records.  Retryable
           failures are retried here (for ever by default) with consumption paused; nothing
           later in this list happens until the write succeeded.
        2. Feed the batch's outcomes to the DLQ breaker; if it trips, stop before step 3, so
           neither the DLQ records nor the offsets of this batch are written.
        3. Publish every DLQ record of the batch and wait until the broker acknowledged each.
        4. Only then commit the offsets (last offset + 1 per partition) of the partitions this
           instance still owns; partitions revoked meanwhile were dropped from the batch and
           are re-read by their new owner, whose idempotent insert absorbs the repeat.
        In transactional mode steps 3 and 4 are one Kafka transaction: a crash between them
        leaves neither DLQ records nor offsets behind, and the re-delivered batch is absorbed
        by step 1's ON CONFLICT DO NOTHING.
        Steps 3 and 4 (_commit_pending) may cover several batches: while the next batch is
        already being written, a written batch waits up to commit_interval for the batches
        after it, so a busy sink makes a few Kafka transactions per second, not one per batch.
        """
        batch = item.batch
        committing = False
        try:
            # Step 1 is done (_start, _await_write): the rows are committed in PostgreSQL.
            rejections = batch.rejections + written.rejections
            self._log_written(batch, written, len(rejections))
            # Step 2.
            reason = self.breaker.feed(_outcomes(batch, rejections))
            self.metrics.dlq_share.set(self.breaker.dlq_share)
            if reason is not None:
                self.metrics.breaker_tripped.set(1)
                log.critical("dlq_breaker_tripped", reason=reason, batch_id=batch.batch_id)
                raise FatalError(f"DLQ breaker tripped: {reason}. Nothing of this batch was committed; "
                                 "fix the cause (or set DLQ_BREAKER_ENABLED=false) and restart.")
            for rej in rejections:
                self._log_rejected(rej)
            batch.release_rows()  # written: from here on only its offsets and rejections count
            self._commits.written()
            item.rejections = rejections
            item.state = BatchState.COMMITTING
            committing = True
        finally:
            if not committing:
                self._forget(item)
        if self._commits.due():
            self._commit_pending()

    def _commit_written(self) -> None:
        """Leaving early (shutdown timeout, fatal error): the batches already through step 2 are
        durable in the database, so commit them, once, not retried; whatever fails here is
        re-read on the next start and absorbed by ON CONFLICT."""
        if not self._committing():
            return
        try:
            self._commit_pending(retry=False)
        except SinkError as e:
            log.warning("exit_commit_failed", reason=str(e))

    def _commit_pending(self, retry: bool = True) -> None:
        """Steps 3 and 4 of _complete's list for every batch through step 2, in one commit."""
        pending = self._committing()
        self._commits.committed()
        try:
            # Against whatever is still ours at each attempt: a revoke drops partitions from the batches.
            t1 = self._clock()
            if retry:
                self._retry("commit", lambda: self._commit(pending))
            else:
                self._commit(pending)
            self.metrics.commit_seconds.observe(self._clock() - t1)
            self.metrics.committed()
            latency_ms = round((self._clock() - t1) * 1000, 1)
            for item in pending:
                batch = item.batch
                self._committed.update(batch.commit_offsets())
                if batch.ranges:
                    log.info("batch_committed", topic=self.cfg.topic, batch_id=batch.batch_id,
                             offsets=_offset_ranges(batch), latency_ms=latency_ms)
                for rej in _still_ours(item):
                    self.metrics.dlq.labels(error_class=rej.error_class, stage=rej.stage).inc()
        finally:
            for item in pending:
                self._forget(item)
        self._resume()

    def _committing(self) -> list[InFlight]:
        return [item for item in self._inflight if item.state is BatchState.COMMITTING]

    def _resume(self) -> None:
        self.source.resume()
        self.metrics.paused.set(0)

    def _forget(self, item: InFlight) -> None:
        self._inflight = [i for i in self._inflight if i is not item]

    def _commit(self, pending: list[InFlight]) -> None:
        envelopes: list[DlqRecord] = []
        offsets: dict[TP, int] = {}
        for item in pending:
            envelopes.extend(map(to_dlq_record, _still_ours(item)))
            for tp, offset in item.batch.commit_offsets().items():
                offsets[tp] = max(offset, offsets.get(tp, offset))
        with self.watchdog.guard("kafka_commit"):
            self.committer.complete(envelopes, offsets)

    # ------------------------------------------------------------------ retries

    def _retry(self, cause: str, fn: Callable[[], T]) -> T:
        policy = self.cfg.retry
        retry = retrying(policy, sleep=self._keepalive, before_sleep=lambda state: self._before_retry(cause, state),
                         give_up=self._shutdown_expired)
        try:
            result = retry(fn)
        except RetryableError as e:
            if self._shutdown_expired():
                raise ShutdownExpired(f"{cause} still failing at shutdown: {e}") from e
            raise FatalError(f"{cause} failed after {policy.attempts} attempts: {e}") from e
        attempts = retry.statistics.get("attempt_number", 1)
        if attempts > 1:
            log.info("recovered", cause=cause, attempt=attempts)
        return result

    def _before_retry(self, cause: str, state: RetryCallState) -> None:
        if cause == "db_write":
            self.health.db_ok = False
            self.metrics.db_connected.set(0)
        self.metrics.retries.labels(cause=cause).inc()
        log.warning("retrying", **retry_log_fields(cause, state))

    def _keepalive(self, seconds: float) -> None:
        """Sleep between retries while polling Kafka, so the group keeps us (max.poll.interval.ms)
        and rebalances are served.  Consumption is paused; anything fetched anyway is held."""
        self.source.pause()
        self.metrics.paused.set(1)
        end = self._clock() + seconds
        while True:
            self.health.turn()
            self._update_gauges()  # lag and broker state go on being reported through an outage
            self._note_stop()
            left = end - self._clock()
            if left <= 0 or self._shutdown_expired():
                return
            self._held.extend(self.source.consume(100, min(left, self.cfg.poll_timeout)))

    def _shutdown_expired(self) -> bool:
        return self._stop_requested and self._clock() >= self._stop_deadline

    # ------------------------------------------------------------------ rebalances

    def on_assign(self, tps: list[TP]) -> None:
        self.health.assigned = len(self.source.assignment())

    def on_revoke(self, tps: list[TP]) -> None:
        """Drop what we hold of revoked partitions: no offset is committed for rows not written."""
        self._writes.settle()  # writer threads read the batches: let them finish
        gone = set(tps)
        for tp in gone:
            self._committed.pop(tp, None)
            self.metrics.forget_partition(*tp)
        # What is dropped, per partition, so `logs search --record` can say "discarded": not the
        # batches already written (their rows are in; only their commit is left to the new owner).
        unwritten = [item.batch for item in self._inflight if item.state is BatchState.WRITING]
        offsets: dict[str, list[int]] = {}
        for batch in (*unwritten, self.batcher.batch):
            for tp, (first, last) in batch.ranges.items():
                if tp in gone:
                    old = offsets.get(str(tp[1]))
                    offsets[str(tp[1])] = [min(first, old[0]), max(last, old[1])] if old else [first, last]
        dropped = self.batcher.drop_partitions(gone)
        for item in self._inflight:
            dropped += item.batch.drop_partitions(gone)
        held = len(self._held)
        self._held = [r for r in self._held if (r.topic, r.partition) not in gone]
        dropped += held - len(self._held)
        if dropped:
            log.info("batch_discarded", topic=self.cfg.topic, rows=dropped, offsets=offsets,
                     partitions=sorted(p for _, p in gone))

    # ------------------------------------------------------------------ logs and gauges

    def _log_written(self, batch: Batch, w: Written, dlq: int) -> None:
        r, write_s = w.result, w.seconds
        self.metrics.batches.inc()
        self.metrics.batch_rows.observe(len(batch))
        self.metrics.write_seconds.observe(write_s)
        self.metrics.insert_seconds.inc(r.insert_s)
        self.metrics.inserted.inc(r.inserted)
        self.metrics.updated.inc(r.updated)
        self.metrics.duplicates.inc(r.duplicates)
        extra: dict[str, Any] = {}
        if w.duplicate_sources:
            dup: dict[str, list[int]] = {}
            for s in w.duplicate_sources:
                dup.setdefault(str(s.partition), []).append(s.offset)
            extra["duplicate_offsets"] = dup
        log.info("batch_written", topic=self.cfg.topic, batch_id=batch.batch_id, offsets=_offset_ranges(batch),
                 rows=len(batch), inserted=r.inserted, updated=r.updated, duplicates=r.duplicates, dlq=dlq,
                 latency_ms=round(write_s * 1000, 1), insert_ms=round(r.insert_s * 1000, 1), **extra)

    def _log_rejected(self, rej: Rejection) -> None:
        rec = rej.record
        log.warning("record_rejected", topic=rec.topic, partition=rec.partition, offset=rec.offset,
                    stage=rej.stage, error_class=rej.error_class, reason=rej.message)

    def _update_gauges(self) -> None:
        now = self._clock()
        if now - self._last_gauges < 1.0:
            return
        self._last_gauges = now
        self.metrics.set_lag(self.cfg.topic, self.source.lags(self._committed))
        assigned = len(self.source.assignment())
        self.metrics.assigned.set(assigned)
        self.health.assigned = assigned
        self.health.broker_ok = self.source.broker_up
        self.metrics.broker_up.set(self.source.broker_up)


def _offset_ranges(batch: Batch) -> dict[str, list[int]]:
    return {str(p): list(r) for (_, p), r in sorted(batch.ranges.items())}


def _still_ours(item: InFlight) -> list[Rejection]:
    """The rejections of partitions still assigned: a revoke drops partitions from batch.ranges."""
    ranges = item.batch.ranges
    return [r for r in item.rejections if (r.record.topic, r.record.partition) in ranges]


def _outcomes(batch: Batch, rejections: list[Rejection]) -> list[bool]:
    """DLQ'd-or-not per record in (partition, offset) order, for the breaker's streak count."""
    if not rejections:
        return [False] * len(batch.row_sources)
    bad = {(r.record.partition, r.record.offset) for r in rejections}
    # Every record once: the rows (write-stage rejections among them), then decode rejections.
    keys = [s[1:3] for s in batch.row_sources]  # s[1:3]: (partition, offset)
    keys.extend((r.record.partition, r.record.offset) for r in batch.rejections)
    keys.sort()
    return [k in bad for k in keys]
