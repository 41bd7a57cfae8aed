"""Batch accumulation by size or age, whichever comes first (pure; the clock is injected)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from sink.model import Row
from sink.types import Rejection, SourceRecord

Clock = Callable[[], float]
_batch_ids = itertools.count(1)


@dataclass
class Batch:
    """Rows to write and rejections to DLQ, with the offsets they cover per (topic, partition)."""

    batch_id: int
    rows: list[Row] = field(default_factory=list)
    row_sources: list[SourceRecord] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    # (topic, partition) -> [first_offset, last_offset], inclusive, over every record consumed.
    ranges: dict[tuple[str, int], list[int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows) + len(self.rejections)

    def release_rows(self) -> None:
        """Forget the rows once written (the batch may wait a while for its Kafka commit)."""
        self.rows, self.row_sources = [], []

    def commit_offsets(self) -> dict[tuple[str, int], int]:
        """Offsets to commit: the next offset to read, i.e. last consumed + 1."""
        return {tp: r[1] + 1 for tp, r in self.ranges.items()}

    def drop_partitions(self, revoked: Iterable[tuple[str, int]]) -> int:
        """Forget records of revoked partitions; returns how many were dropped."""
        gone = set(revoked) & set(self.ranges)
        if not gone:
            return 0
        before = len(self)
        keep = [(s, r) for s, r in zip(self.row_sources, self.rows, strict=True)
                if (s.topic, s.partition) not in gone]
        self.row_sources = [s for s, _ in keep]
        self.rows = [r for _, r in keep]
        self.rejections = [j for j in self.rejections if (j.record.topic, j.record.partition) not in gone]
        for tp in gone:
            del self.ranges[tp]
        return before - len(self)


class Batcher:
    """Holds the open batch; says when it is due (size reached, or timeout since first record)."""

    def __init__(self, size: int, timeout: float, clock: Clock = time.monotonic) -> None:
        if size < 1 or timeout <= 0:
            raise ValueError("batch size must be >= 1 and timeout > 0")
        self.size = size
        self.timeout = timeout
        self._clock = clock
        self._batch = Batch(next(_batch_ids))
        self._opened_at: float | None = None

    @property
    def batch(self) -> Batch:
        return self._batch

    def add(self, rec: SourceRecord, outcome: Row | Rejection) -> None:
        self.add_all([rec], [outcome])

    def add_all(self, records: Sequence[SourceRecord], outcomes: Sequence[Row | Rejection]) -> None:
        """Add consumed records with their decode outcomes (a Row, or a Rejection)."""
        if not records:
            return
        if self._opened_at is None:
            self._opened_at = self._clock()
        b = self._batch
        rows, sources, rejections = b.rows, b.row_sources, b.rejections
        for rec, out in zip(records, outcomes, strict=True):
            if type(out) is tuple:  # a Row; a Rejection otherwise
                rows.append(out)
                sources.append(rec)
            else:
                rejections.append(out)  # type: ignore[arg-type]
        # librdkafka hands out a partition's records in offset order: the first and last seen
        # of each partition are its lowest and highest offsets in this call.
        first: dict[tuple[str, int], int] = {}
        last: dict[tuple[str, int], int] = {}
        for rec in records:
            tp = rec[:2]
            last[tp] = rec.offset
            first.setdefault(tp, rec.offset)
        for tp, lo in first.items():
            hi = last[tp]
            r = b.ranges.get(tp)
            if r is None:
                b.ranges[tp] = [min(lo, hi), max(lo, hi)]
            else:
                r[0], r[1] = min(r[0], lo, hi), max(r[1], lo, hi)

    def room(self) -> int:
        """How many more records fit before the batch is full."""
        return max(0, self.size - len(self._batch))

    def due(self) -> bool:
        if not len(self._batch):
            return False
        return len(self._batch) >= self.size or self.time_left() <= 0

    def time_left(self) -> float:
        """Seconds until the open batch times out (the full timeout when it is empty)."""
        if self._opened_at is None:
            return self.timeout
        return self._opened_at + self.timeout - self._clock()

    def take(self) -> Batch:
        """Hand over the open batch and start a new one."""
        out = self._batch
        self._batch = Batch(next(_batch_ids))
        self._opened_at = None
        return out

    def drop_partitions(self, revoked: Iterable[tuple[str, int]]) -> int:
        dropped = self._batch.drop_partitions(revoked)
        if not len(self._batch):
            self._opened_at = None
        return dropped
