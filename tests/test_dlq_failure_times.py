"""Failure times written by other producers (no offset, out of range, unreadable): UTC for
--since/--until and inspect, or missing."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dlq.filters import build_filter
from dlq.inspect import DlqStats
from sink.envelope import H_FAILED_AT, parse_headers
from sink.types import SourceRecord

DLQ = "in.dlq"


def failed_at(value: bytes) -> SourceRecord:
    """A DLQ record whose failure time header was written by another producer."""
    return SourceRecord(DLQ, 0, 0, b"k", b"{}", (("__connect.errors.topic", b"in"), (H_FAILED_AT, value)), 1)


def test_a_failure_time_without_offset_is_utc_for_since_and_until() -> None:
    naive = parse_headers(failed_at(b"2026-11-28T06:00:00").headers)
    assert naive.failed_at == datetime(2026, 11, 28, 6, 0, tzinfo=UTC)
    assert build_filter(since="2026-11-28T06:00:00Z").matches(naive)
    assert not build_filter(since="2026-11-28T06:00:01Z").matches(naive)
    assert not build_filter(until="2026-11-28T06:00:00Z").matches(naive)
    assert build_filter(since="2026-11-28T07:00:00+01:00", until="2026-11-28T06:00:01Z").matches(naive)


@pytest.mark.parametrize("value", [b"yesterday", b"", b"9999-12-31T23:59:59-05:00", b"0001-01-01T00:00:00+05:00"])
def test_an_unusable_failure_time_counts_as_missing(value: bytes) -> None:
    info = parse_headers(failed_at(value).headers)
    assert info.failed_at is None
    assert not build_filter(since="2000-01-01").matches(info)
    assert not build_filter(until="2100-01-01").matches(info)
    stats = DlqStats(examples=1)
    stats.add(failed_at(value))
    summary = stats.summary()
    assert (summary["records"], summary["first_failure"], summary["examples"][0]["failed_at"]) == (1, None, None)


def test_inspect_mixes_failure_times_with_and_without_offset() -> None:
    stats = DlqStats(examples=5)
    for value in (b"2026-11-28T06:00:00", b"2026-11-28T05:00:00Z", b"2026-11-28T08:30:00+01:00"):
        stats.add(failed_at(value))
    summary = stats.summary()
    assert (summary["first_failure"], summary["last_failure"]) == ("2026-11-28T05:00:00.000Z",
                                                                   "2026-11-28T07:30:00.000Z")
    assert summary["examples"][0]["failed_at"] == "2026-11-28T06:00:00.000Z"  # UTC, not local time
