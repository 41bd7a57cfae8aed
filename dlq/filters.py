"""Which DLQ records a replay (or inspect) selects: a pure predicate over their failure headers.

A filter only looks at headers the sink wrote when the record failed, which never change, so a
record a filter skipped once is skipped by that filter for ever.  That is what makes it safe
for a filtered replay to commit past the records it skips in a consumer group of its own (see
``ReplayFilter.group_suffix`` and docs/dlq.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sink.envelope import DlqInfo

STAGES = ("decode", "validate", "write")


@dataclass(frozen=True, slots=True)
class OffsetRange:
    """Original (input topic) offsets, both ends inclusive like the sink's log ranges; None = open."""

    first: int | None = None
    last: int | None = None

    def __post_init__(self) -> None:
        if self.first is not None and self.last is not None and self.first > self.last:
            raise ValueError(f"offset range {self.first}:{self.last} is empty (first > last)")
        if (self.first is not None and self.first < 0) or (self.last is not None and self.last < 0):
            raise ValueError("offsets are >= 0")

    def __contains__(self, offset: object) -> bool:
        if not isinstance(offset, int):
            return False
        return (self.first is None or offset >= self.first) and (self.last is None or offset <= self.last)

    def __str__(self) -> str:
        return f"{'' if self.first is None else self.first}:{'' if self.last is None else self.last}"


@dataclass(frozen=True, slots=True)
class ReplayFilter:
    """Select records matching every given criterion; an empty criterion matches everything.

    ``since`` is inclusive and ``until`` exclusive (failure time, ``__sink.errors.failed_at``).
    A record whose header a criterion needs is missing does not match that criterion.
    """

    error_classes: frozenset[str] = field(default_factory=frozenset)
    stages: frozenset[str] = field(default_factory=frozenset)
    partitions: frozenset[int] = field(default_factory=frozenset)
    offsets: OffsetRange | None = None
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        bad = self.stages - set(STAGES)
        if bad:
            raise ValueError(f"unknown stage(s) {sorted(bad)}; known: {', '.join(STAGES)}")
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ValueError(f"{name} must be timezone-aware")
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError("--since must be before --until")

    @property
    def active(self) -> bool:
        return bool(self.error_classes or self.stages or self.partitions or self.offsets
                    or self.since or self.until)

    def matches(self, info: DlqInfo) -> bool:
        if self.error_classes and info.error_class not in self.error_classes:
            return False
        if self.stages and info.stage not in self.stages:
            return False
        if self.partitions and info.partition not in self.partitions:
            return False
        if self.offsets is not None and info.offset not in self.offsets:
            return False
        if self.since is not None or self.until is not None:
            if info.failed_at is None:
                return False
            if self.since is not None and info.failed_at < self.since:
                return False
            if self.until is not None and info.failed_at >= self.until:
                return False
        return True

    def describe(self) -> dict[str, Any]:
        """The criteria that are set, JSON-ready and in a canonical order (audit log, group name)."""
        out: dict[str, Any] = {}
        if self.error_classes:
            out["error_class"] = sorted(self.error_classes)
        if self.stages:
            out["stage"] = sorted(self.stages)
        if self.partitions:
            out["partition"] = sorted(self.partitions)
        if self.offsets is not None:
            out["offset_range"] = str(self.offsets)
        if self.since is not None:
            out["since"] = _iso(self.since)
        if self.until is not None:
            out["until"] = _iso(self.until)
        return out

    def group_suffix(self) -> str:
        """'' without criteria, else '.f-<hash of the criteria>': one consumer group per filter.

        Committing past skipped records is then harmless: only this filter's group moves past
        them, and this filter would skip them again; every other group still has them.
        """
        if not self.active:
            return ""
        canonical = json.dumps(self.describe(), sort_keys=True, separators=(",", ":"))
        return ".f-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


# --------------------------------------------------------------------------- parsing (CLI values)


def parse_offset_range(text: str) -> OffsetRange:
    """'A:B' (inclusive), 'A:' or ':B'; a single 'A' means just that offset."""
    text = text.strip()
    first_s, sep, last_s = text.partition(":")
    try:
        first = int(first_s) if first_s.strip() else None
        last = int(last_s) if last_s.strip() else None
    except ValueError:
        raise ValueError(f"offset range {text!r}: expected A:B, A: or :B with integer offsets") from None
    if not sep:
        last = first
    if first is None and last is None:
        raise ValueError("offset range needs at least one end")
    return OffsetRange(first, last)


def parse_time(text: str) -> datetime:
    """ISO 8601 date or date-time; without an offset it is UTC.  Absolute only, on purpose:
    a relative time ('2h ago') would select different records on each run of the same filter,
    which breaks the one-group-per-filter bookkeeping."""
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 date or date-time (e.g. 2024-05-01T12:00:00Z)") from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t


def build_filter(*, error_classes: Iterable[str] = (), stages: Iterable[str] = (), partitions: Iterable[int] = (),
                 offset_range: str | None = None, since: str | None = None, until: str | None = None) -> ReplayFilter:
    """A ReplayFilter from CLI values; raises ValueError with a message fit for the operator."""
    return ReplayFilter(
        error_classes=frozenset(e.strip() for e in error_classes if e.strip()),
        stages=frozenset(s.strip() for s in stages),
        partitions=frozenset(partitions),
        offsets=parse_offset_range(offset_range) if offset_range is not None else None,
        since=parse_time(since) if since is not None else None,
        until=parse_time(until) if until is not None else None,
    )
