"""Summarise a DLQ topic: counts by error class, stage, origin and attempt, failure time span,
and a few example records.  ``DlqStats`` is pure; ``inspect_topic`` reads the topic with
assigned partitions up to the end offsets as of the start, and never commits."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

from dlq.filters import ReplayFilter
from dlq.reader import DlqReader, capture_plan, open_consumer, reader_access
from sink.envelope import DlqInfo, parse_headers
from sink.kafka_auth import admin_metadata
from sink.settings import Settings
from sink.types import SourceRecord

MISSING = "(missing)"  # a header the record lacks (not written by this sink, or an older one)


def preview(data: bytes | None, limit: int) -> str | None:
    """The first `limit` bytes as text; bytes that are not UTF-8 are shown as \\x.. escapes."""
    if data is None:
        return None
    text = data[:limit].decode("utf-8", errors="backslashreplace")
    return text + "..." if len(data) > limit else text


class DlqStats:
    """Mutable bookkeeping of one scan.  Examples: up to `examples`, spread over error classes
    (round robin) so a rare class is not hidden behind a frequent one."""

    def __init__(self, examples: int = 5, value_bytes: int = 120, flt: ReplayFilter | None = None) -> None:
        self.filter = flt or ReplayFilter()
        self.examples = examples
        self.value_bytes = value_bytes
        self.scanned = 0
        self.records = 0
        self.by_error_class: Counter[str] = Counter()
        self.by_stage: Counter[str] = Counter()
        self.by_origin: Counter[tuple[str, str]] = Counter()
        self.by_attempt: Counter[int] = Counter()
        self.by_dlq_partition: Counter[int] = Counter()
        self.origins: set[tuple[str | None, int | None, int | None]] = set()
        self.first_failure: datetime | None = None
        self.last_failure: datetime | None = None
        self._examples: dict[str, list[dict[str, Any]]] = {}

    def add(self, rec: SourceRecord) -> None:
        self.scanned += 1
        info = parse_headers(rec.headers)
        if not self.filter.matches(info):
            return
        self.records += 1
        error_class = info.error_class or MISSING
        self.by_error_class[error_class] += 1
        self.by_stage[info.stage or MISSING] += 1
        self.by_origin[(info.topic or MISSING, MISSING if info.partition is None else str(info.partition))] += 1
        self.by_attempt[info.attempt] += 1
        self.by_dlq_partition[rec.partition] += 1
        self.origins.add((info.topic, info.partition, info.offset))
        if info.failed_at is not None:
            if self.first_failure is None or info.failed_at < self.first_failure:
                self.first_failure = info.failed_at
            if self.last_failure is None or info.failed_at > self.last_failure:
                self.last_failure = info.failed_at
        kept = self._examples.setdefault(error_class, [])
        if len(kept) < self.examples:
            kept.append(self._example(rec, info))

    def _example(self, rec: SourceRecord, info: DlqInfo) -> dict[str, Any]:
        return {
            "partition": rec.partition,
            "offset": rec.offset,
            "error_class": info.error_class,
            "stage": info.stage,
            "message": info.message,
            "failed_at": _iso(info.failed_at),
            "attempt": info.attempt,
            "original": {"topic": info.topic, "partition": info.partition, "offset": info.offset},
            "key": preview(rec.key, self.value_bytes),
            "headers": {k: preview(v, self.value_bytes) for k, v in rec.headers},
            "value": preview(rec.value, self.value_bytes),
            "value_bytes": None if rec.value is None else len(rec.value),
        }

    def example_list(self) -> list[dict[str, Any]]:
        lists = [self._examples[k] for k in sorted(self._examples)]
        out: list[dict[str, Any]] = []
        depth = 0
        while len(out) < self.examples and any(depth < len(v) for v in lists):
            out.extend(v[depth] for v in lists if depth < len(v))
            depth += 1
        return sorted(out[: self.examples], key=lambda e: (e["partition"], e["offset"]))

    def summary(self) -> dict[str, Any]:
        """JSON-ready; dict keys are strings, counts sorted by key."""
        origin: dict[str, dict[str, int]] = {}
        for (topic, part), n in sorted(self.by_origin.items()):
            origin.setdefault(topic, {})[part] = n
        return {
            "records": self.records,
            "scanned": self.scanned,
            "filter": self.filter.describe(),
            "distinct_origins": len(self.origins),
            "by_error_class": dict(sorted(self.by_error_class.items())),
            "by_stage": dict(sorted(self.by_stage.items())),
            "by_origin": origin,
            "by_attempt": {str(k): v for k, v in sorted(self.by_attempt.items())},
            "by_dlq_partition": {str(k): v for k, v in sorted(self.by_dlq_partition.items())},
            "first_failure": _iso(self.first_failure),
            "last_failure": _iso(self.last_failure),
            "examples": self.example_list(),
        }


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def inspect_topic(settings: Settings, topic: str, stats: DlqStats, batch: int = 1000) -> dict[str, Any]:
    """Scan `topic` from its log start to its end offsets as of now; returns the summary."""
    admin_metadata(settings, "dlq_read")  # a refused login is fatal at once, not a read timeout
    consumer = open_consumer(settings, group=None)
    access = reader_access(settings, topic, None)
    reader: DlqReader | None = None
    try:
        plan = capture_plan(consumer, topic, from_committed=False, access=access)
        reader = DlqReader(consumer, topic, plan, access=access)
        while not reader.done:
            for rec in reader.read(batch):
                stats.add(rec)
    finally:
        if reader is not None:
            reader.close()
        else:
            consumer.close()
    # [start, end) per DLQ partition: what was scanned.
    out = {"topic": topic, "ranges": {str(p): [r.start, r.end] for p, r in sorted(plan.items())}}
    out.update(stats.summary())
    return out
