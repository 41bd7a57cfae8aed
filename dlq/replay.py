"""The replay core: DLQ records through the sink's own decode and writer, batch by batch.

Only this module knows the order of things; the reader, writer and outbox behind the
Protocols below are the real adapters (dlq/reader.py, sink/writer.py, sink/outbox.py) or the
in-memory fakes of tests/test_dlq_replay_core.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Protocol, TypeVar

from tenacity import RetryCallState

from dlq.filters import ReplayFilter
from dlq.reader import PartitionRange
from sink.bisect import write_isolating_poison
from sink.decode import decode
from sink.envelope import DlqInfo, DlqRecord, fit_record, original_headers, parse_headers, to_dlq_record
from sink.errors import FatalError, PoisonError, RetryableError, retry_log_fields
from sink.logs import get_logger
from sink.model import Row
from sink.outbox import Outbox, Output
from sink.retry import RetryPolicy, retrying
from sink.topics import KAFKA_DEFAULT_MAX_MESSAGE_BYTES
from sink.types import Rejection, SourceRecord, WriteResult
from sink.upsert import IGNORE, WriteMode, latest_per_key, versioned

log = get_logger("dlq.replay")

TP = tuple[str, int]
T = TypeVar("T")


class OnFailure(StrEnum):
    """What happens to a record that fails again."""

    DLQ = "dlq"  # written back to the DLQ (attempt + 1, the new error), committed past
    SKIP = "skip"  # left out, committed past (it stays in the DLQ at its old offset only)
    STOP = "stop"  # the run ends at it; it and everything after it stay uncommitted


class Fate(StrEnum):
    INSERTED = "inserted"
    UPDATED = "updated"  # WRITE_MODE=update: it overwrote the row of its key
    ALREADY_PRESENT = "already_present"  # changed nothing (update mode: identical, older, or superseded)
    REPUBLISHED = "republished"
    VALID = "valid"  # dry run: would be written / re-published
    FAILED_AGAIN = "failed_again"
    SKIPPED = "skipped"  # not selected by the filter


class Outcome(StrEnum):
    COMPLETED = "completed"  # reached the end offsets captured at the start
    MAX_REACHED = "max_reached"
    STOPPED_ON_FAILURE = "stopped_on_failure"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class ReplayOptions:
    dlq_topic: str  # where records that fail again go (the DLQ being read)
    filter: ReplayFilter = field(default_factory=ReplayFilter)
    on_failure: OnFailure = OnFailure.DLQ
    dry_run: bool = False
    to_topic: str | None = None  # re-publish valid records there instead of writing them
    max_records: int | None = None  # selected records to replay in this run
    batch_size: int = 500
    max_splits: int = 64
    # Bounded, unlike the sink's: an operator is waiting, and the next run resumes where this one stopped.
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    dlq_max_bytes: int = KAFKA_DEFAULT_MAX_MESSAGE_BYTES  # the DLQ topic's max.message.bytes
    write_mode: WriteMode = IGNORE  # the sink's WRITE_MODE and WRITE_VERSION

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch size must be >= 1")
        if self.max_records is not None and self.max_records < 1:
            raise ValueError("--max must be >= 1")
        if self.to_topic is not None and self.to_topic == self.dlq_topic:
            raise ValueError("--to-topic must not be the DLQ topic itself")


@dataclass
class Counts:
    """What a run did.  replayed = inserted + updated + already_present + republished + valid + failed_again."""

    replayed: int = 0
    inserted: int = 0
    updated: int = 0
    already_present: int = 0
    republished: int = 0
    valid: int = 0
    failed_again: int = 0
    dlq: int = 0  # of failed_again: written back to the DLQ
    skipped: int = 0

    def add(self, fate: Fate, to_dlq: bool) -> None:
        setattr(self, fate.value, getattr(self, fate.value) + 1)
        if fate is not Fate.SKIPPED:
            self.replayed += 1
        if to_dlq:
            self.dlq += 1

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class ReplayResult:
    outcome: Outcome
    counts: Counts
    stopped_at: Rejection | None = None  # --on-failure stop: the record that failed


class Reader(Protocol):
    topic: str
    plan: dict[int, PartitionRange]

    @property
    def done(self) -> bool: ...

    @property
    def passed(self) -> int: ...

    def read(self, max_records: int, timeout: float = ...) -> list[SourceRecord]: ...


class Writer(Protocol):
    def write(self, rows: Sequence[Row]) -> WriteResult: ...


@dataclass
class _Item:
    record: SourceRecord
    fate: Fate | None = None
    row: Row | None = None
    rejection: Rejection | None = None
    info: DlqInfo | None = None  # its failure headers, once selected


ProgressFn = Callable[[int, Counts], None]


class Replayer:
    def __init__(self, opts: ReplayOptions, reader: Reader, writer: Writer | None, outbox: Outbox | None, *,
                 on_progress: ProgressFn = lambda passed, counts: None,
                 stop_requested: Callable[[], bool] = lambda: False,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not opts.dry_run and outbox is None:
            raise ValueError("a replay that is not a dry run needs an outbox")
        if not opts.dry_run and opts.to_topic is None and writer is None:
            raise ValueError("a replay into the database needs a writer")
        self.opts = opts
        self.reader = reader
        self.writer = writer
        self.outbox = outbox
        self.counts = Counts()
        self._on_progress = on_progress
        self._stop_requested = stop_requested
        self._sleep = sleep
        self._committed: dict[TP, int] = {}
        self._stopped_at: Rejection | None = None
        self._max_cut = False

    def run(self) -> ReplayResult:
        """Replay batches until the end offsets captured at the start, --max, a stop or a signal."""
        outcome = Outcome.COMPLETED
        while not self.reader.done:
            if self._stop_requested():
                outcome = Outcome.INTERRUPTED
                break
            if self._max_cut or self._max_left() == 0:
                outcome = Outcome.MAX_REACHED
                break
            records = self._retry("dlq_read", lambda: self.reader.read(self.opts.batch_size))
            if records:
                self.replay_batch(records)
            self._on_progress(self.reader.passed, self.counts)
            if self._stopped_at is not None:
                outcome = Outcome.STOPPED_ON_FAILURE
                break
        if outcome is Outcome.COMPLETED and self._max_cut:
            outcome = Outcome.MAX_REACHED
        if outcome is Outcome.COMPLETED and not self.opts.dry_run:
            self._commit_ends()
        return ReplayResult(outcome, self.counts, self._stopped_at)

    def replay_batch(self, records: Sequence[SourceRecord]) -> None:
        """Replay one batch.  The order is the guarantee:

        1. Select: the filter marks records skipped (they are committed past in step 4, in the
           filter's own consumer group, see ReplayFilter.group_suffix).  --max cuts the batch
           after the N-th selected record; what follows the cut is not touched nor committed.
        2. Decode and validate each selected record with the sink's decode().
        3. Write the valid rows with the sink's writer, one PostgreSQL transaction per write,
           INSERT ... ON CONFLICT DO NOTHING (rows already present are reported, not inserted
           twice); rows the database rejects are isolated with the sink's bisection.  Retryable
           errors are retried; nothing below happens before the rows are committed.
           --to-topic: no write, valid records become records to re-publish instead.
           --on-failure stop: the batch is cut at the first record that failed, and no row
           after it is written.
        4. One Kafka transaction: produce the records that failed again back to the DLQ
           (to_dlq_record: origin kept, attempt + 1, the new error) and the re-published ones,
           add the replay group's DLQ offsets (last offset + 1 per partition of the records up
           to the cut, skipped ones included), commit.  A crash before this commit leaves
           neither records nor offsets behind: the next run re-reads the batch, and step 3's
           ON CONFLICT DO NOTHING absorbs the rows that were already written.
        5. Only then count the batch and log each record's fate.
        --dry-run stops after step 2: nothing is written, produced or committed.
        """
        opts = self.opts
        items = [_Item(r) for r in records]
        # Step 1.
        cut = len(items)
        selected: list[int] = []
        left = self._max_left()
        for i, item in enumerate(items):
            if left is not None and len(selected) >= left:
                cut, self._max_cut = i, True
                break
            info = parse_headers(item.record.headers)
            if opts.filter.matches(info):
                selected.append(i)
                item.info = info
            else:
                item.fate = Fate.SKIPPED
        # Step 2.
        for i in selected:
            selected_info = items[i].info
            if selected_info is not None and selected_info.dropped:  # too large for the DLQ: stored without its value
                items[i].rejection = _without_value(items[i].record, selected_info)
                continue
            out = decode(items[i].record)
            if isinstance(out, Rejection):
                items[i].rejection = out
            else:
                items[i].row = out
        stop = opts.on_failure is OnFailure.STOP
        if stop:
            cut = min([cut, *(i for i in selected if items[i].rejection is not None)])
        valid = [i for i in selected if i < cut and items[i].row is not None]
        # Step 3.
        if opts.dry_run:
            for i in valid:
                items[i].fate = Fate.VALID
        elif opts.to_topic is not None:
            for i in valid:
                items[i].fate = Fate.REPUBLISHED
        elif valid:
            self._write(items, valid)
        failing = [i for i in selected if items[i].rejection is not None]
        if stop and failing:
            # The record stopped at is not committed (nor counted): the next run starts with it.
            cut = min(failing)
            self._stopped_at = items[cut].rejection
        for i in failing:
            if i < cut:
                items[i].fate = Fate.FAILED_AGAIN
        kept = items[:cut]
        # Step 4.
        to_dlq = not opts.dry_run and opts.on_failure is OnFailure.DLQ
        if not opts.dry_run:
            outputs = self._outputs(kept, to_dlq)
            offsets: dict[TP, int] = {}
            for item in kept:
                tp = (item.record.topic, item.record.partition)
                offsets[tp] = max(offsets.get(tp, 0), item.record.offset + 1)
            assert self.outbox is not None
            outbox = self.outbox
            self._retry("replay_commit", lambda: outbox.complete(outputs, offsets))
            self._committed.update(offsets)
        # Step 5.
        for item in kept:
            assert item.fate is not None
            self.counts.add(item.fate, to_dlq and item.fate is Fate.FAILED_AGAIN)
            self._log(item, to_dlq)

    # ------------------------------------------------------------------ steps

    def _write(self, items: list[_Item], valid: list[int]) -> None:
        """Write the rows of `valid`; sets their fates, or rejections for rows the database refused."""
        writer = self.writer
        assert writer is not None
        mode = self.opts.write_mode
        if mode.update:  # one row per key, the newest in the original records' order
            valid = _latest(items, valid)
        rows = [row for i in valid if (row := items[i].row) is not None]
        if mode.versioned:  # the original record's Kafka timestamp, as the sink wrote it
            rows = versioned(rows, [_origin(items[i]).timestamp_ms for i in valid])
        if self.opts.on_failure is OnFailure.STOP:
            results, poison = self._retry("db_write", lambda: _write_until_poison(writer, rows))
        else:
            iso = self._retry("db_write", lambda: write_isolating_poison(rows, writer.write, self.opts.max_splits))
            results = {}
            for start, length, res in iso.written:
                results.update((start + j, fate) for j, fate in _fates(res, length).items())
            poison = iso.poison
        for j, fate in results.items():
            items[valid[j]].fate = fate
        for j, e in poison:
            rec = items[valid[j]].record
            items[valid[j]].rejection = Rejection(rec, "write", e.error_class, e.message, e.sqlstate)

    def _outputs(self, kept: list[_Item], to_dlq: bool) -> list[Output]:
        out: list[Output] = []
        for item in kept:
            rec = item.record
            if item.fate is Fate.REPUBLISHED:
                assert self.opts.to_topic is not None
                # The input record as it was: our failure headers dropped, so the sink treats it
                # as new input (and, if it fails there again, DLQs it with a fresh origin).
                out.append((self.opts.to_topic, DlqRecord(rec.key, rec.value, original_headers(rec.headers))))
            elif item.fate is Fate.FAILED_AGAIN and to_dlq:
                assert item.rejection is not None
                again = to_dlq_record(item.rejection, replayed=True)
                out.append((self.opts.dlq_topic, fit_record(again, self.opts.dlq_max_bytes)))
        return out

    def _commit_ends(self) -> None:
        """Every partition reached its end: commit the end itself, which may lie past the last
        record (transaction markers), so the next run starts with nothing to pass."""
        ends: dict[TP, int] = {}
        for p, r in self.reader.plan.items():
            tp = (self.reader.topic, p)
            if r.size and self._committed.get(tp, r.start) < r.end:
                ends[tp] = r.end
        if ends:
            assert self.outbox is not None
            outbox = self.outbox
            self._retry("replay_commit", lambda: outbox.complete([], ends))
            self._committed.update(ends)

    def _max_left(self) -> int | None:
        if self.opts.max_records is None:
            return None
        return max(0, self.opts.max_records - self.counts.replayed)

    # ------------------------------------------------------------------ logs and retries

    def _log(self, item: _Item, to_dlq: bool) -> None:
        rec, fate = item.record, item.fate
        info = parse_headers(rec.headers)
        fields = {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset, "fate": str(fate),
                  "original_topic": info.topic, "original_partition": info.partition,
                  "original_offset": info.offset, "dlq_attempt": info.attempt, "dry_run": self.opts.dry_run}
        rej = item.rejection
        if rej is None:
            log.debug("dlq_record_replayed", error_class=info.error_class, stage=info.stage, **fields)
            return
        # Failures always show (as the sink's record_rejected does); the rest, and a dry run's
        # (its report counts them), only at DEBUG: a replay of a large DLQ would otherwise drown
        # its own summary.
        loud = fate is Fate.FAILED_AGAIN and not self.opts.dry_run
        (log.warning if loud else log.debug)("dlq_record_replayed", stage=rej.stage, error_class=rej.error_class,
                                             reason=rej.message, to_dlq=to_dlq, **fields)

    def _retry(self, cause: str, fn: Callable[[], T]) -> T:
        return retry(self.opts.retry, cause, fn, self._sleep)


def _without_value(rec: SourceRecord, info: DlqInfo) -> Rejection:
    """A DLQ record the sink had to store without its value (too large for the DLQ topic)."""
    return Rejection(rec, "decode", "ValueNotInDlq",
                     f"the DLQ holds this record without its {info.dropped} (too large for the DLQ topic); "
                     f"the original is at {info.topic} partition {info.partition} offset {info.offset} while "
                     "that topic's retention keeps it")


def retry(policy: RetryPolicy, cause: str, fn: Callable[[], T], sleep: Callable[[float], None] = time.sleep) -> T:
    """Call fn, retrying RetryableError with backoff; FatalError once the attempts are used up."""

    def before_sleep(state: RetryCallState) -> None:
        log.warning("retrying", **retry_log_fields(cause, state))

    try:
        return retrying(policy, sleep=sleep, before_sleep=before_sleep)(fn)
    except RetryableError as e:
        raise FatalError(f"{cause} still failing after {policy.attempts} attempts: {e}; "
                         "nothing uncommitted was counted, run the replay again to resume") from e


def _write_until_poison(writer: Writer, rows: Sequence[Row]) -> tuple[dict[int, Fate], list[tuple[int, PoisonError]]]:
    """All rows at once; if one is poison, row by row in order up to the first poison row only
    (--on-failure stop must not write anything after the record it stops at)."""
    try:
        res = writer.write(rows)
    except PoisonError:
        pass
    else:
        return _fates(res, len(rows)), []
    results: dict[int, Fate] = {}
    for j, row in enumerate(rows):
        try:
            results[j] = _fates(writer.write([row]), 1)[0]
        except PoisonError as e:
            return results, [(j, e)]
    return results, []



def _fates(res: WriteResult, n: int) -> dict[int, Fate]:
    dups, updated = set(res.duplicate_indexes), set(res.updated_indexes)
    return {j: Fate.ALREADY_PRESENT if j in dups else Fate.UPDATED if j in updated else Fate.INSERTED
            for j in range(n)}


def _origin(item: _Item) -> SourceRecord:
    """The record as the sink first read it: its partition, offset and Kafka timestamp."""
    info, rec = item.info, item.record
    if info is None or info.partition is None or info.offset is None:
        return rec
    return rec._replace(partition=info.partition, offset=info.offset, timestamp_ms=info.original_timestamp_ms)


def _latest(items: list[_Item], valid: list[int]) -> list[int]:
    """Of `valid`, one per key (sink/upsert.py's rule over the original records); the others
    changed nothing."""
    rows = [row for i in valid if (row := items[i].row) is not None]
    kept = [valid[k] for k in latest_per_key(rows, [_origin(items[i]) for i in valid])]
    for i in set(valid) - set(kept):
        items[i].fate = Fate.ALREADY_PRESENT
    return kept
