"""Step 1 of the guarantee off the loop's thread: batches written by writer threads, in order.

The loop submits a batch, asks whether the oldest one is ready, and takes its result; meanwhile
it consumes and decodes the next batch and commits the previous ones.  With several writers
(WRITE_CONCURRENCY, each on its own connection) batches are written at the same time:

* Kafka's order within a partition is kept: a batch's INSERT waits until every earlier batch in
  flight that shares a partition with it has inserted successfully (its COPY into its stage runs
  meanwhile); batches of different partitions insert side by side.
* No deadlocks: each batch sends its rows in primary-key order, so two INSERTs that meet on the
  same keys take their locks in the same order (one waits, neither waits on the other).
* Results come back in submission order, and an attempt that failed is retried by the caller,
  on its own thread, through the retry it passes to result(); later batches of its partitions
  wait for that retry to succeed.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from sink.batcher import Batch, Clock
from sink.bisect import write_isolating_poison
from sink.logs import get_logger
from sink.model import Row, row_key
from sink.types import InsertTurn, Rejection, SourceRecord, WriteResult
from sink.upsert import IGNORE, WriteMode, latest_per_key, versioned

log = get_logger("sink.write_stage")

# A batch waiting for the one before it is idle in a transaction (after its COPY, before its
# INSERT); the writer's idle_in_transaction_session_timeout (20 s) would end its session if the
# previous INSERT took longer (a slow database: statement_timeout allows 120 s).
WAIT_KEEPALIVE_S = 5.0


class Writer(Protocol):
    def write(self, rows: Sequence[Row], turn: InsertTurn | None = None) -> WriteResult: ...

    def check(self) -> bool: ...


class BatchState(Enum):
    """Where a batch taken from the batcher stands; it leaves the in-flight queue when its
    offsets are committed or it is given up (a fatal error, or every partition revoked)."""

    WRITING = "writing"        # step 1, in the write stage
    WRITTEN = "written"        # step 1 done: its rows are committed in PostgreSQL
    COMMITTING = "committing"  # through step 2: waits for steps 3-4, the Kafka commit


@dataclass(eq=False)
class InFlight:
    """One batch between the batcher and its Kafka commit (identity: Batch compares by value)."""

    batch: Batch
    state: BatchState = BatchState.WRITING
    rejections: list[Rejection] = field(default_factory=list)  # decode and write, set by step 2


@dataclass
class Written:
    """Step 1's outcome for one batch."""

    result: WriteResult
    rejections: list[Rejection]
    duplicate_sources: list[SourceRecord]
    seconds: float = 0.0  # from submission to the end of the successful attempt


class Turn:
    """A batch's place in the order of INSERTs: its INSERT waits for those of the earlier batches
    of its partitions (keeping its own open transaction alive meanwhile), and lets later ones go."""

    def __init__(self, previous: Sequence[threading.Event], every: float = WAIT_KEEPALIVE_S) -> None:
        self._previous = list(previous)
        self._every = every
        self.done = threading.Event()

    def wait(self, keepalive: Callable[[], None]) -> None:
        for previous in self._previous:
            while not previous.wait(self._every):
                keepalive()

    def passed(self) -> None:
        self.done.set()

    def again(self) -> Turn:
        """The same wait for a further write of the batch (bisection), whose INSERT lets nobody go."""
        return Turn(self._previous, self._every)


@dataclass(frozen=True)
class _Task:
    item: InFlight
    writer: Writer
    future: Future[Written]
    started: float
    turn: Turn
    partitions: frozenset[tuple[str, int]]


class WriteStage:
    def __init__(self, writers: Sequence[Writer], topic: str, max_splits: int, clock: Clock = time.monotonic,
                 mode: WriteMode = IGNORE) -> None:
        self._writers = list(writers)
        self._mode = mode
        self._topic = topic
        self._max_splits = max_splits
        self._clock = clock
        self._next_writer = 0
        self._tasks: deque[_Task] = deque()
        self._retrying: _Task | None = None  # taken out by result(), its retry running on the loop's thread
        self._threads = ThreadPoolExecutor(len(self._writers), thread_name_prefix="sink-write")

    @property
    def busy(self) -> bool:
        return bool(self._tasks)

    @property
    def full(self) -> bool:
        return len(self._tasks) == len(self._writers)

    @property
    def oldest(self) -> InFlight:
        return self._tasks[0].item

    def ready(self) -> bool:
        """Has the oldest batch's first attempt ended?"""
        return bool(self._tasks) and self._tasks[0].future.done()

    def submit(self, item: InFlight) -> None:
        """Start the batch's first attempt in a writer thread."""
        assert not self.full
        # Round robin, oldest taken first: the writer used is the one whose batch finished.
        writer = self._writers[self._next_writer]
        self._next_writer = (self._next_writer + 1) % len(self._writers)
        partitions = frozenset(item.batch.ranges)
        turn = Turn([t.turn.done for t in self._tasks if t.partitions & partitions])
        started = self._clock()

        def attempt() -> Written:
            # A failed attempt keeps its turn: the later batches of its partitions wait for
            # the retry (result()), so none of them inserts ahead of it.
            written = self._write(item.batch, writer, turn, started)
            item.state = BatchState.WRITTEN
            turn.passed()
            return written

        self._tasks.append(_Task(item, writer, self._threads.submit(attempt), started, turn, partitions))

    def result(self, retry: Callable[[Callable[[], Written]], Written]) -> Written:
        """The oldest batch's outcome, taken out of the stage; its first attempt's, or, if that
        failed, what `retry` makes of further attempts (run here, one at a time)."""
        task = self._tasks.popleft()
        first = [task.future]

        def attempt() -> Written:
            if first:
                return first.pop().result()
            return self._write(task.item.batch, task.writer, None, task.started)

        self._retrying = task
        try:
            written = retry(attempt)
        finally:
            self._retrying = None
            task.turn.passed()  # written, or given up (the sink stops): the later batches go on
        task.item.state = BatchState.WRITTEN
        return written

    def settle(self) -> None:
        """Wait for every writer thread: they read batches that a revoke is about to change.
        A batch whose first attempt failed lets the later batches of its partitions go now:
        they wait for its retry, and the retry (the loop's own thread) is what waits here."""
        if self._retrying is not None:  # a revoke served by the retry's own polling
            self._retrying.turn.passed()
        while True:
            for t in self._tasks:
                if t.future.done():
                    t.turn.passed()
            running = [t.future for t in self._tasks if not t.future.done()]
            if not running:
                return
            wait_futures(running, return_when=FIRST_COMPLETED)

    def close(self) -> None:
        """The loop is leaving: no batch waits for a turn any longer (a failed one's retry will
        not come), so every writer thread ends."""
        for t in self._tasks:
            t.turn.passed()
        self._threads.shutdown(wait=False)

    def check(self) -> bool:
        """Is the database reachable (when idle, for /readyz)?"""
        return self._writers[0].check()

    def _write(self, batch: Batch, writer: Writer, turn: Turn | None, started: float) -> Written:
        """One attempt at step 1.  Every write of the batch waits for the INSERTs of the earlier
        batches of its partitions, and only the whole batch's first write lets later ones go: a
        batch that bisects around poison lets them go when its write has ended (submit), so its
        later INSERTs never wait on a later batch's rows while that one waits on theirs."""
        rows: Sequence[Row] = batch.rows
        sources: Sequence[SourceRecord] = batch.row_sources
        if not rows:
            return Written(WriteResult(0, 0), [], [], self._clock() - started)
        superseded: list[SourceRecord] = []
        if self._mode.update:
            rows, sources, superseded = _latest(rows, sources)
        if len(self._writers) > 1:
            rows, sources = _in_key_order(rows, sources)
        if self._mode.versioned:
            rows = versioned(rows, [s.timestamp_ms for s in sources])
        calls = [0]

        def write(part: Sequence[Row]) -> WriteResult:
            calls[0] += 1
            return writer.write(part, turn if turn is None or calls[0] == 1 else turn.again())

        iso = write_isolating_poison(rows, write, self._max_splits)
        inserted = sum(r.inserted for _, _, r in iso.written)
        updated = sum(r.updated for _, _, r in iso.written)
        insert_s = sum(r.insert_s for _, _, r in iso.written)
        dup_sources = [sources[start + i] for start, _, r in iso.written for i in r.duplicate_indexes]
        dup_sources.extend(superseded)
        rejections = [Rejection(sources[i], "write", e.error_class, e.message, e.sqlstate) for i, e in iso.poison]
        if iso.poison:
            log.warning("poison_isolated", topic=self._topic, batch_id=batch.batch_id, rows=len(rows),
                        dlq=len(iso.poison), writes=iso.writes)
        return Written(WriteResult(inserted, len(dup_sources), insert_s=insert_s, updated=updated), rejections,
                       dup_sources, self._clock() - started)


def _in_key_order(rows: Sequence[Row], sources: Sequence[SourceRecord]
                  ) -> tuple[Sequence[Row], Sequence[SourceRecord]]:
    """The rows (and their records) in primary-key order; a key's rows keep their batch order,
    so of repeats the first is inserted (ignore mode)."""
    keys = list(map(row_key, rows))
    order = sorted(range(len(rows)), key=keys.__getitem__)
    return [rows[i] for i in order], [sources[i] for i in order]


def _latest(rows: Sequence[Row], sources: Sequence[SourceRecord]
            ) -> tuple[Sequence[Row], Sequence[SourceRecord], list[SourceRecord]]:
    """One row per key (the newest, sink/upsert.py), and the records superseded by it."""
    kept = latest_per_key(rows, sources)
    if len(kept) == len(rows):
        return rows, sources, []
    keep = set(kept)
    return ([rows[i] for i in kept], [sources[i] for i in kept],
            [s for i, s in enumerate(sources) if i not in keep])
