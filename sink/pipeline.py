"""The loop: consume -> decode -> batch -> write -> commit, with the DLQ on the side.

Only this module knows the order of things; the adapters (source, writer, committer) behind
the Protocols below are swapped for in-memory fakes in tests/test_pipeline.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from tenacity import RetryCallState

from sink.batcher import Batch, Batcher, Clock
from sink.bisect import write_isolating_poison
from sink.breaker import DlqBreaker, DlqBreakerPolicy
from sink.commit_policy import CommitPolicy, CommitPolicyState
from sink.decode import decode_many
from sink.envelope import DlqRecord, to_dlq_record
from sink.errors import FatalError, RetryableError, SinkError, retry_log_fields
from sink.health import HealthState
from sink.logs import get_logger
from sink.metrics import Metrics
from sink.model import Row
from sink.retry import RetryPolicy, retrying
from sink.settings import Settings
from sink.types import Rejection, SourceRecord, WriteResult
from sink.watchdog import Watchdog

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


class Writer(Protocol):
    @property
    def connected(self) -> bool: ...

    def write(self, rows: Sequence[Row], before_insert: Callable[[], None] | None = None,
              after_insert: Callable[[], None] | None = None) -> WriteResult: ...

    def keepalive(self) -> None: ...

    def check(self) -> bool: ...


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

    @classmethod
    def from_settings(cls, s: Settings) -> PipelineConfig:
        return cls(topic=s.kafka_input_topic, batch_size=s.batch_size, batch_timeout=s.batch_timeout,
                   max_splits=s.bisect_max_splits, retry=RetryPolicy.from_settings(s),
                   shutdown_timeout=s.shutdown_timeout, commit_interval=s.kafka_commit_interval)


# A batch waiting for the one before it is idle in a transaction (after its COPY, before its
# INSERT); the writer's idle_in_transaction_session_timeout (20 s) would end its session if the
# previous INSERT took longer (a slow database: statement_timeout allows 120 s).
WAIT_KEEPALIVE_S = 5.0


def wait_keeping_alive(done: threading.Event, writer: Writer, every: float = WAIT_KEEPALIVE_S) -> None:
    """Wait for `done`, with a keepalive on the writer's open transaction every `every` seconds."""
    while not done.wait(every):
        writer.keepalive()


class ShutdownExpired(Exception):
    """Stop was requested and the current batch could not be finished in time."""


@dataclass
class _Written:
    result: WriteResult
    rejections: list[Rejection]
    duplicate_sources: list[SourceRecord]


@dataclass(frozen=True)
class _Writing:
    """A batch in step 1: its first write attempt runs in a writer thread."""

    batch: Batch
    writer: Writer
    future: Future[tuple[_Written, float]]
    started: float
    inserted: threading.Event  # its rows are in the table (uncommitted), or its write ended


@dataclass(frozen=True)
class _Done:
    """A batch through step 1: its rows are committed in PostgreSQL."""

    batch: Batch
    written: _Written
    write_s: float


class Pipeline:
    def __init__(self, cfg: PipelineConfig, source: Source, writer: Writer, committer: Committer, *,
                 breaker: DlqBreaker | None = None, metrics: Metrics | None = None,
                 health: HealthState | None = None, clock: Clock = time.monotonic,
                 watchdog: Watchdog | None = None, spare_writer: Writer | None = None) -> None:
        self.cfg = cfg
        self.source = source
        self.writer = writer
        self.committer = committer
        self.breaker = breaker or DlqBreaker(DlqBreakerPolicy())
        self.metrics = metrics or Metrics()
        self.health = health or HealthState()
        self._clock = clock
        self.watchdog = watchdog or Watchdog(cfg.commit_deadline)
        self.batcher = Batcher(cfg.batch_size, cfg.batch_timeout, clock)
        # Batches taken from the batcher and not yet committed: the one in step 1 in the writer
        # thread, and those through step 2 waiting for the Kafka commit (their rows released:
        # only offsets and rejections are kept, for at most commit_interval).
        self._inflight: list[Batch] = []
        self._pending: list[tuple[Batch, list[Rejection]]] = []
        self._commits = CommitPolicyState(CommitPolicy(cfg.commit_interval), clock)
        # Batches in step 1 (the database write), oldest first, each in a writer thread on its
        # own connection, while this thread consumes and decodes the next one and commits the
        # previous ones.  With a spare writer two batches overlap: the second one's COPY into
        # its stage runs while the first one inserts, and its INSERT starts once the first
        # one's INSERT went through (the first then only fetches and commits: it waits on
        # nothing, so the two never wait on each other's rows) or its write ended.
        self._writers: list[Writer] = [writer] if spare_writer is None else [writer, spare_writer]
        self._next_writer = 0
        self._writing: list[_Writing] = []
        self._write_thread = ThreadPoolExecutor(len(self._writers), thread_name_prefix="sink-write")
        self._held: list[SourceRecord] = []
        self._stop_requested = False
        self._stop_logged = False
        self._stop_deadline = float("inf")
        self._last_db_activity = clock()
        self._last_gauges = 0.0
        self._committed: dict[TP, int] = {}
        source.set_rebalance_listener(self.on_assign, self.on_revoke)

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
        full = len(self._writing) == len(self._writers)
        if self._writing and (self._writing[0].future.done() or (due and full)):
            written = self._await_write()  # step 1 of the oldest batch (retried here if it failed)
            if due:
                self._start(self.batcher.take())  # step 1 of the next batch begins before the commit
            self._complete(written)
            return
        if due:
            self._start(self.batcher.take())
            return
        records = self._next_records()
        self.batcher.add_all(records, decode_many(records))
        if records:
            self.metrics.consumed.inc(len(records))
        elif (not self._writing and not len(self.batcher.batch)
              and self._clock() - self._last_db_activity > self.cfg.idle_db_check):
            self._last_db_activity = self._clock()
            self.health.db_ok = self.writer.check()
            self.metrics.db_connected.set(self.health.db_ok)

    def _next_records(self) -> list[SourceRecord]:
        room = max(1, self.batcher.room())
        if self._held:
            out, self._held = self._held[:room], self._held[room:]
            self._commits.consumed(caught_up=False)
            return out
        timeout = self.cfg.poll_timeout
        if self._writing:
            timeout = min(timeout, 0.005)  # come back soon to commit what the writer finished
        timeout = min(timeout, self._commits.time_left())
        if len(self.batcher.batch):
            timeout = max(0.0, min(timeout, self.batcher.time_left()))
        records = self.source.consume(room, timeout)
        self._commits.consumed(caught_up=len(records) < room)
        return records

    def _drain(self) -> None:
        while self._writing:
            self._complete(self._await_write())
        while self._held:
            records = self._next_records()
            self.batcher.add_all(records, decode_many(records))
            if self.batcher.due():
                self._flush(self.batcher.take())
        if len(self.batcher.batch):
            self._flush(self.batcher.take())
        if self._pending:
            self._commit_pending()

    # ------------------------------------------------------------------ the guarantee

    def _flush(self, batch: Batch) -> None:
        """All of _complete's steps for one batch, with nothing else in flight."""
        self._start(batch)
        self._complete(self._await_write())

    def _start(self, batch: Batch) -> None:
        """Step 1 of _complete's list in a writer thread: its first attempt at the write."""
        assert len(self._writing) < len(self._writers)
        # Round robin, oldest awaited first: the writer taken is the one whose batch finished.
        writer = self._writers[self._next_writer]
        self._next_writer = (self._next_writer + 1) % len(self._writers)
        before = self._writing[-1].inserted if self._writing else None
        inserted = threading.Event()
        self._inflight.append(batch)
        started = self._clock()

        def write() -> tuple[_Written, float]:
            try:
                return self._write(batch, writer, before, inserted), self._clock() - started
            finally:
                inserted.set()

        self._writing.append(_Writing(batch, writer, self._write_thread.submit(write), started, inserted))

    def _await_write(self) -> _Done:
        """Step 1 of _complete's list, finished: the writer thread's outcome, or retries here."""
        w = self._writing.pop(0)
        batch, writer, started = w.batch, w.writer, w.started
        threaded = [w.future]

        def attempt() -> tuple[_Written, float]:
            if threaded:  # attempt 1 ran in the writer thread: its outcome, or its error to retry
                return threaded.pop().result()
            return self._write(batch, writer, None, None), self._clock() - started

        try:
            # Attempts after the first run here, with consumption paused.
            written, write_s = self._retry("db_write", attempt)
        except BaseException:
            self._forget(batch)
            raise
        self._last_db_activity = self._clock()
        self._resume()  # retries paused consumption
        return _Done(batch, written, write_s)

    def _complete(self, done: _Done) -> None:
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
        batch, written, write_s = done.batch, done.written, done.write_s
        committing = False
        try:
            # Step 1 is done (_start, _await_write): the rows are committed in PostgreSQL.
            rejections = batch.rejections + written.rejections
            self._log_written(batch, written, write_s, len(rejections))
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
            self._pending.append((batch, rejections))
            committing = True
        finally:
            if not committing:
                self._forget(batch)
        if self._commits.due():
            self._commit_pending()

    def _commit_written(self) -> None:
        """Leaving early (shutdown timeout, fatal error): the batches already through step 2 are
        durable in the database, so commit them, once, not retried; whatever fails here is
        re-read on the next start and absorbed by ON CONFLICT."""
        if not self._pending:
            return
        try:
            self._commit_pending(retry=False)
        except SinkError as e:
            log.warning("exit_commit_failed", reason=str(e))

    def _commit_pending(self, retry: bool = True) -> None:
        """Steps 3 and 4 of _complete's list for every batch through step 2, in one commit."""
        pending, self._pending = self._pending, []
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
            for batch, rejections in pending:
                self._committed.update(batch.commit_offsets())
                if batch.ranges:
                    log.info("batch_committed", topic=self.cfg.topic, batch_id=batch.batch_id,
                             offsets=_offset_ranges(batch), latency_ms=latency_ms)
                for rej in _still_ours(batch, rejections):
                    self.metrics.dlq.labels(error_class=rej.error_class, stage=rej.stage).inc()
        finally:
            for batch, _ in pending:
                self._forget(batch)
        self._resume()

    def _resume(self) -> None:
        self.source.resume()
        self.metrics.paused.set(0)

    def _forget(self, batch: Batch) -> None:
        self._inflight = [b for b in self._inflight if b is not batch]  # identity: Batch compares by value

    def _write(self, batch: Batch, writer: Writer, after: threading.Event | None,
               rows_in: threading.Event | None) -> _Written:
        """Step 1 for one batch.  With `after` (the previous batch's), its rows go into the stage
        at once and into the table once the previous batch's rows are in; `rows_in` is set
        when this batch's whole-batch INSERT went through.  A batch that bisects around poison
        sets it only when its write has ended (_start): its later INSERTs must not wait on
        the next batch's rows while that one waits on theirs."""
        rows, sources = batch.rows, batch.row_sources
        if not rows:
            return _Written(WriteResult(0, 0), [], [])
        calls = [0]

        def wait_previous() -> None:
            if after is not None:
                wait_keeping_alive(after, writer)

        def write(part: Sequence[Row]) -> WriteResult:
            calls[0] += 1
            signal = rows_in.set if rows_in is not None and calls[0] == 1 else None
            return writer.write(part, wait_previous, signal)

        iso = write_isolating_poison(rows, write, self.cfg.max_splits)
        self.health.db_ok = True
        self.metrics.db_connected.set(1)
        inserted = sum(r.inserted for _, _, r in iso.written)
        insert_s = sum(r.insert_s for _, _, r in iso.written)
        dup_sources = [sources[start + i] for start, _, r in iso.written for i in r.duplicate_indexes]
        rejections = [Rejection(sources[i], "write", e.error_class, e.message, e.sqlstate) for i, e in iso.poison]
        if iso.poison:
            log.warning("poison_isolated", topic=self.cfg.topic, batch_id=batch.batch_id, rows=len(rows),
                        dlq=len(iso.poison), writes=iso.writes)
        return _Written(WriteResult(inserted, len(dup_sources), insert_s=insert_s), rejections, dup_sources)

    def _commit(self, pending: list[tuple[Batch, list[Rejection]]]) -> None:
        envelopes: list[DlqRecord] = []
        offsets: dict[TP, int] = {}
        for batch, rejections in pending:
            envelopes.extend(map(to_dlq_record, _still_ours(batch, rejections)))
            for tp, offset in batch.commit_offsets().items():
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
        if self._writing:
            wait_futures([w.future for w in self._writing])  # writer threads read the batches: let them finish
        gone = set(tps)
        for tp in gone:
            self._committed.pop(tp, None)
            self.metrics.forget_partition(*tp)
        # What is dropped, per partition, so `logs search --record` can say "discarded": not the
        # batches already written (their rows are in; only their commit is left to the new owner).
        written = {id(b) for b, _ in self._pending}
        written.update(id(w.batch) for w in self._writing if w.future.done() and w.future.exception() is None)
        offsets: dict[str, list[int]] = {}
        for batch in (*(b for b in self._inflight if id(b) not in written), self.batcher.batch):
            for tp, (first, last) in batch.ranges.items():
                if tp in gone:
                    old = offsets.get(str(tp[1]))
                    offsets[str(tp[1])] = [min(first, old[0]), max(last, old[1])] if old else [first, last]
        dropped = self.batcher.drop_partitions(gone)
        for batch in self._inflight:
            dropped += batch.drop_partitions(gone)
        held = len(self._held)
        self._held = [r for r in self._held if (r.topic, r.partition) not in gone]
        dropped += held - len(self._held)
        if dropped:
            log.info("batch_discarded", topic=self.cfg.topic, rows=dropped, offsets=offsets,
                     partitions=sorted(p for _, p in gone))

    # ------------------------------------------------------------------ logs and gauges

    def _log_written(self, batch: Batch, w: _Written, write_s: float, dlq: int) -> None:
        r = w.result
        self.metrics.batches.inc()
        self.metrics.batch_rows.observe(len(batch))
        self.metrics.write_seconds.observe(write_s)
        self.metrics.insert_seconds.inc(r.insert_s)
        self.metrics.inserted.inc(r.inserted)
        self.metrics.duplicates.inc(r.duplicates)
        extra: dict[str, Any] = {}
        if w.duplicate_sources:
            dup: dict[str, list[int]] = {}
            for s in w.duplicate_sources:
                dup.setdefault(str(s.partition), []).append(s.offset)
            extra["duplicate_offsets"] = dup
        log.info("batch_written", topic=self.cfg.topic, batch_id=batch.batch_id, offsets=_offset_ranges(batch),
                 rows=len(batch), inserted=r.inserted, duplicates=r.duplicates, dlq=dlq,
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


def _still_ours(batch: Batch, rejections: list[Rejection]) -> list[Rejection]:
    """The rejections of partitions still assigned: a revoke drops partitions from batch.ranges."""
    return [r for r in rejections if (r.record.topic, r.record.partition) in batch.ranges]


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
