"""dlq.filters: which DLQ records a replay selects, and the consumer group a filter gets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dlq.filters import OffsetRange, ReplayFilter, build_filter, parse_offset_range, parse_time
from sink.envelope import DlqInfo

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def info(error_class: str | None = "CheckViolation", stage: str | None = "write", partition: int | None = 1,
         offset: int | None = 100, failed_at: datetime | None = T0) -> DlqInfo:
    return DlqInfo(topic="in", partition=partition, offset=offset, error_class=error_class, message="m",
                   stage=stage, failed_at=failed_at, original_timestamp_ms=None, attempt=1, sqlstate=None,
                   version=None)


def test_empty_filter_matches_everything_and_adds_no_group_suffix() -> None:
    f = ReplayFilter()
    assert f.matches(info()) and f.matches(info(error_class=None, stage=None, partition=None, failed_at=None))
    assert not f.active
    assert f.group_suffix() == ""
    assert f.describe() == {}


def test_every_given_criterion_must_match() -> None:
    f = build_filter(error_classes=["CheckViolation", "InvalidJson"], stages=["write"], partitions=[1, 2])
    assert f.matches(info())
    assert not f.matches(info(error_class="NotNullViolation"))
    assert not f.matches(info(stage="decode"))
    assert not f.matches(info(partition=0))
    assert not f.matches(info(partition=None))


def test_offset_range_is_inclusive_and_may_be_open() -> None:
    assert parse_offset_range("10:20") == OffsetRange(10, 20)
    assert parse_offset_range("10:") == OffsetRange(10, None)
    assert parse_offset_range(":20") == OffsetRange(None, 20)
    assert parse_offset_range("7") == OffsetRange(7, 7)
    f = build_filter(offset_range="10:20")
    assert [o for o in (9, 10, 20, 21) if f.matches(info(offset=o))] == [10, 20]
    assert not f.matches(info(offset=None))


@pytest.mark.parametrize("text", ["20:10", "a:b", ":", "-1:5"])
def test_bad_offset_ranges_are_refused_with_a_message(text: str) -> None:
    with pytest.raises(ValueError, match=r"offset"):
        parse_offset_range(text)


def test_since_is_inclusive_until_exclusive_and_records_without_a_time_do_not_match() -> None:
    f = build_filter(since="2026-05-01T12:00:00Z", until="2026-05-01T13:00:00+00:00")
    assert f.matches(info(failed_at=T0))
    assert f.matches(info(failed_at=T0 + timedelta(minutes=59)))
    assert not f.matches(info(failed_at=T0 + timedelta(hours=1)))
    assert not f.matches(info(failed_at=T0 - timedelta(seconds=1)))
    assert not f.matches(info(failed_at=None))


def test_times_without_offset_are_utc_and_relative_times_are_refused() -> None:
    assert parse_time("2026-05-01") == datetime(2026, 5, 1, tzinfo=UTC)
    assert parse_time("2026-05-01T14:00:00+02:00") == T0
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time("2h")
    with pytest.raises(ValueError, match="before"):
        build_filter(since="2026-05-02", until="2026-05-01")


def test_unknown_stage_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown stage"):
        build_filter(stages=["transform"])


def test_group_suffix_depends_on_the_criteria_only_not_on_their_order() -> None:
    a = build_filter(error_classes=["B", "A"], partitions=[2, 1])
    b = build_filter(error_classes=["A", "B"], partitions=[1, 2])
    c = build_filter(error_classes=["A"])
    assert a.group_suffix() == b.group_suffix()
    assert a.group_suffix().startswith(".f-") and len(a.group_suffix()) == 15
    assert c.group_suffix() not in ("", a.group_suffix())
    assert a.describe() == {"error_class": ["A", "B"], "partition": [1, 2]}


def test_describe_is_json_ready() -> None:
    f = build_filter(stages=["decode"], offset_range="5:", since="2026-05-01T12:00:00Z")
    assert f.describe() == {"stage": ["decode"], "offset_range": "5:", "since": "2026-05-01T12:00:00Z"}
