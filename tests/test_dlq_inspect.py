"""dlq.inspect.DlqStats: the DLQ summary, computed from records (no Kafka)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from dlq.filters import build_filter
from dlq.inspect import MISSING, DlqStats, preview
from sink.envelope import to_dlq_record
from sink.types import Rejection, SourceRecord

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def dlq(offset: int, error_class: str, stage: str, *, origin_partition: int = 0, minutes: int = 0,
        value: bytes = b'{"x": 1}', retried: bool = False) -> SourceRecord:
    src = SourceRecord("in", origin_partition, offset, b"key", value, (("trace", b"abc"),), 1)
    when = T0 + timedelta(minutes=minutes)
    env = to_dlq_record(Rejection(src, stage, error_class, f"{error_class} happened"), now=when)
    if retried:  # the same origin failing again in a replay
        back = SourceRecord("in.dlq", 0, 99, env.key, env.value, env.headers)
        env = to_dlq_record(Rejection(back, stage, error_class, "again"), now=T0 + timedelta(minutes=minutes + 1),
                            replayed=True)
    return SourceRecord("in.dlq", offset % 2, offset, env.key, env.value, env.headers, 1)


def test_counts_by_class_stage_origin_attempt_and_time_span() -> None:
    s = DlqStats()
    for rec in [dlq(0, "CheckViolation", "write", minutes=5), dlq(1, "CheckViolation", "write", origin_partition=1),
                dlq(2, "InvalidJson", "decode", minutes=10), dlq(2, "InvalidJson", "decode", minutes=20, retried=True)]:
        s.add(rec)
    out = s.summary()
    assert out["records"] == out["scanned"] == 4
    assert out["by_error_class"] == {"CheckViolation": 2, "InvalidJson": 2}
    assert out["by_stage"] == {"decode": 2, "write": 2}
    assert out["by_origin"] == {"in": {"0": 3, "1": 1}}
    assert out["by_attempt"] == {"1": 3, "2": 1}
    assert out["by_dlq_partition"] == {"0": 3, "1": 1}
    assert out["distinct_origins"] == 3  # offset 2 twice: the original and its retry
    assert out["first_failure"] == "2026-05-01T12:00:00.000Z"
    assert out["last_failure"] == "2026-05-01T12:21:00.000Z"


def test_records_without_our_headers_are_counted_as_missing() -> None:
    s = DlqStats()
    s.add(SourceRecord("in.dlq", 0, 0, None, b"x"))
    out = s.summary()
    assert out["by_error_class"] == {MISSING: 1} and out["by_origin"] == {MISSING: {MISSING: 1}}
    assert out["first_failure"] is None and out["by_attempt"] == {"1": 1}


def test_examples_spread_over_error_classes() -> None:
    s = DlqStats(examples=3)
    for i in range(10):
        s.add(dlq(i, "CheckViolation", "write"))
    s.add(dlq(10, "InvalidJson", "decode"))
    s.add(dlq(11, "ValidationError", "validate"))
    classes = [e["error_class"] for e in s.summary()["examples"]]
    assert sorted(classes) == ["CheckViolation", "InvalidJson", "ValidationError"]


def test_example_shows_key_headers_and_the_first_bytes_of_the_value() -> None:
    s = DlqStats(examples=1, value_bytes=4)
    s.add(dlq(0, "InvalidUtf8", "decode", value=b"\xff\xfeabcdef"))
    (e,) = s.summary()["examples"]
    assert e["value"] == "\\xff\\xfeab..." and e["value_bytes"] == 8
    assert e["key"] == "key" and e["headers"]["trace"] == "abc"
    assert e["original"] == {"topic": "in", "partition": 0, "offset": 0}
    assert e["headers"]["__connect.errors.exception.class.name"] == "Inva..."


def test_a_filter_narrows_the_summary_but_everything_is_scanned() -> None:
    s = DlqStats(flt=build_filter(stages=["decode"]))
    s.add(dlq(0, "CheckViolation", "write"))
    s.add(dlq(1, "InvalidJson", "decode"))
    out = s.summary()
    assert (out["records"], out["scanned"]) == (1, 2)
    assert out["filter"] == {"stage": ["decode"]}


def test_preview() -> None:
    assert preview(None, 3) is None
    assert preview(b"abc", 3) == "abc"
    assert preview(b"abcd", 3) == "abc..."
