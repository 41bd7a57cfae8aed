"""DLQ envelope: original key/value/headers kept, Kafka Connect failure headers added, parse(build(x)) == x,
a record re-DLQ'd by replay keeps its origin and counts its attempts, and a record too large for
the DLQ topic loses its value (then key and input headers), never its origin."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sink import __version__
from sink.envelope import (
    H_DROPPED,
    H_ORIG_BYTES,
    H_OWN,
    H_UNREADABLE,
    MAX_MESSAGE_BYTES,
    DlqRecord,
    fit_record,
    original_headers,
    parse_headers,
    record_bytes,
    to_dlq_record,
)
from sink.types import Headers, Rejection, SourceRecord, UnreadableHeaders

NOW = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
# The names Kafka Connect's DLQ reporter uses (ErrorReporter / DeadLetterQueueReporter).
CONNECT_HEADERS = {
    "topic": "__connect.errors.topic",
    "partition": "__connect.errors.partition",
    "offset": "__connect.errors.offset",
    "class": "__connect.errors.exception.class.name",
    "message": "__connect.errors.exception.message",
    "stage": "__connect.errors.stage",
}


def source(headers: Headers = (("trace-id", b"abc"), ("empty", None)), **kw: object) -> SourceRecord:
    fields: dict[str, object] = {"topic": "decoded_iot_data", "partition": 2, "offset": 41, "key": b"dev-1",
                                 "value": b'{"broken": ', "headers": headers, "timestamp_ms": 1_700_000_000_000}
    fields.update(kw)
    return SourceRecord(**fields)  # type: ignore[arg-type]


def rejection(rec: SourceRecord | None = None, **kw: object) -> Rejection:
    fields: dict[str, object] = {"stage": "decode", "error_class": "InvalidJson", "message": "value is not JSON"}
    fields.update(kw)
    return Rejection(rec or source(), **fields)  # type: ignore[arg-type]


def as_dict(headers: Headers) -> dict[str, bytes | None]:
    return dict(headers)


def test_original_key_value_and_headers_are_kept() -> None:
    rec = source()
    out = to_dlq_record(rejection(rec), now=NOW)
    assert isinstance(out, DlqRecord)
    assert (out.key, out.value) == (rec.key, rec.value)
    assert out.headers[:2] == rec.headers


def test_kafka_connect_header_names_are_used() -> None:
    h = as_dict(to_dlq_record(rejection(), now=NOW).headers)
    assert {name: h[name] for name in CONNECT_HEADERS.values()} == {
        "__connect.errors.topic": b"decoded_iot_data",
        "__connect.errors.partition": b"2",
        "__connect.errors.offset": b"41",
        "__connect.errors.exception.class.name": b"InvalidJson",
        "__connect.errors.exception.message": b"value is not JSON",
        "__connect.errors.stage": b"decode",
    }


def test_sink_headers_say_when_which_attempt_and_which_version() -> None:
    h = as_dict(to_dlq_record(rejection(), now=NOW).headers)
    assert h["__sink.errors.failed_at"] == b"2024-05-01T12:00:00.123Z"
    assert h["__sink.errors.attempt"] == b"1"
    assert h["__sink.version"] == __version__.encode()
    assert h["__sink.errors.original_timestamp_ms"] == b"1700000000000"


def test_failure_time_in_another_zone_is_written_in_utc() -> None:
    when = datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    h = as_dict(to_dlq_record(rejection(), now=when).headers)
    assert h["__sink.errors.failed_at"] == b"2024-05-01T12:00:00.000Z"


def test_failure_time_defaults_to_now() -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    info = parse_headers(to_dlq_record(rejection()).headers)
    assert info.failed_at is not None
    assert before <= info.failed_at <= datetime.now(UTC)


def test_sqlstate_header_only_for_database_rejections() -> None:
    plain = as_dict(to_dlq_record(rejection(), now=NOW).headers)
    assert "__sink.errors.sqlstate" not in plain
    db = as_dict(to_dlq_record(rejection(stage="write", error_class="CheckViolation", sqlstate="23514"),
                               now=NOW).headers)
    assert db["__sink.errors.sqlstate"] == b"23514"
    assert db["__connect.errors.stage"] == b"write"


def test_missing_kafka_timestamp_leaves_the_header_out() -> None:
    h = as_dict(to_dlq_record(rejection(source(timestamp_ms=None)), now=NOW).headers)
    assert "__sink.errors.original_timestamp_ms" not in h


def test_tombstone_keeps_its_none_key_and_value() -> None:
    out = to_dlq_record(rejection(source(key=None, value=None), error_class="EmptyValue"), now=NOW)
    assert (out.key, out.value) == (None, None)


def test_long_message_is_truncated_to_the_limit_on_a_character_boundary() -> None:
    out = to_dlq_record(rejection(message="\N{LATIN SMALL LETTER E WITH ACUTE}" * 5000), now=NOW)
    msg = as_dict(out.headers)["__connect.errors.exception.message"]
    assert msg is not None
    assert len(msg) <= MAX_MESSAGE_BYTES
    assert msg.endswith(b"...")
    msg.decode("utf-8")  # no half character before the ellipsis


def test_message_at_the_limit_is_not_truncated() -> None:
    out = to_dlq_record(rejection(message="x" * MAX_MESSAGE_BYTES), now=NOW)
    assert as_dict(out.headers)["__connect.errors.exception.message"] == b"x" * MAX_MESSAGE_BYTES


def test_lone_surrogate_in_message_does_not_break_the_envelope() -> None:
    out = to_dlq_record(rejection(message="bad \ud800 text"), now=NOW)
    assert as_dict(out.headers)["__connect.errors.exception.message"] == b"bad ? text"


def test_re_dlq_keeps_the_origin_and_counts_the_attempt() -> None:
    first = to_dlq_record(rejection(), now=NOW)
    # Replay re-reads the DLQ record from the DLQ topic and fails it again, at the write stage.
    replayed = SourceRecord("decoded_iot_data.dlq", 0, 7, first.key, first.value, first.headers, 1_800_000_000_000)
    later = NOW + timedelta(hours=1)
    second = to_dlq_record(rejection(replayed, stage="write", error_class="CheckViolation", message="check",
                                     sqlstate="23514"), now=later, replayed=True)
    info = parse_headers(second.headers)
    assert (info.topic, info.partition, info.offset) == ("decoded_iot_data", 2, 41)
    assert info.original_timestamp_ms == 1_700_000_000_000
    assert info.attempt == 2
    assert (info.stage, info.error_class, info.message, info.sqlstate) == ("write", "CheckViolation", "check", "23514")
    assert info.failed_at == later.replace(microsecond=123000)


def test_re_dlq_does_not_repeat_failure_headers_and_keeps_the_input_headers() -> None:
    rec = source()
    first = to_dlq_record(rejection(rec), now=NOW)
    second = to_dlq_record(rejection(SourceRecord("x.dlq", 0, 0, first.key, first.value, first.headers)), now=NOW,
                           replayed=True)
    ours = [k for k, _ in second.headers if k.startswith("__")]
    assert sorted(ours) == sorted(k for k, _ in first.headers if k.startswith("__"))
    assert len(ours) == len(set(ours))
    assert original_headers(second.headers) == rec.headers


def test_third_failure_is_attempt_three() -> None:
    out = to_dlq_record(rejection(), now=NOW)
    for _ in range(2):
        out = to_dlq_record(rejection(SourceRecord("in.dlq", 0, 0, out.key, out.value, out.headers)), now=NOW,
                            replayed=True)
    assert parse_headers(out.headers).attempt == 3


def test_original_headers_drop_only_the_failure_headers() -> None:
    headers: Headers = (("__connect.errors.topic", b"t"), ("__sink.version", b"1"), ("app", b"x"), ("__other", b"y"))
    assert original_headers(headers) == (("app", b"x"), ("__other", b"y"))


@pytest.mark.parametrize("headers", [None, (), [("app", b"x")]])
def test_parse_without_failure_headers_gives_nones_and_attempt_one(headers: Headers | None) -> None:
    info = parse_headers(headers)
    assert (info.topic, info.partition, info.offset, info.failed_at, info.attempt) == (None, None, None, None, 1)


def test_parse_tolerates_malformed_numbers_and_dates() -> None:
    info = parse_headers([("__connect.errors.partition", b"two"), ("__connect.errors.offset", None),
                          ("__sink.errors.failed_at", b"yesterday"), ("__sink.errors.attempt", b"x"),
                          ("__connect.errors.exception.message", b"\xff")])
    assert (info.partition, info.offset, info.failed_at, info.attempt) == (None, None, None, 1)
    assert info.message == "\N{REPLACEMENT CHARACTER}"


# A producer may send any header, ours among them: the record's own are kept, never read as ours.
header_names = st.text(min_size=1, max_size=20) | st.sampled_from(
    [*CONNECT_HEADERS.values(), "__sink.errors.attempt", "__sink.errors.own_headers", "__sink.errors.dropped"])


@given(
    topic=st.text(min_size=1, max_size=249),
    partition=st.integers(0, 2**31 - 1),
    offset=st.integers(0, 2**63 - 1),
    key=st.none() | st.binary(max_size=20),
    value=st.none() | st.binary(max_size=50),
    headers=st.lists(st.tuples(header_names, st.none() | st.binary(max_size=10)), max_size=5).map(tuple),
    timestamp_ms=st.none() | st.integers(0, 2**62),
    stage=st.sampled_from(["decode", "validate", "write"]),
    error_class=st.text(min_size=1, max_size=40),
    message=st.text(max_size=300),
    sqlstate=st.none() | st.text(alphabet="0123456789ABCDEFP", min_size=5, max_size=5),
    now=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)),
)
def test_parse_of_build_round_trips(
    topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None, headers: Headers,
    timestamp_ms: int | None, stage: str, error_class: str, message: str, sqlstate: str | None, now: datetime,
) -> None:
    rec = SourceRecord(topic, partition, offset, key, value, headers, timestamp_ms)
    out = to_dlq_record(Rejection(rec, stage, error_class, message, sqlstate), now=now)
    info = parse_headers(out.headers)
    assert (out.key, out.value, original_headers(out.headers)) == (key, value, headers)
    assert (info.topic, info.partition, info.offset, info.original_timestamp_ms) == (
        topic, partition, offset, timestamp_ms)
    assert (info.stage, info.error_class, info.message, info.sqlstate) == (stage, error_class, message, sqlstate)
    assert info.failed_at == now.replace(microsecond=now.microsecond // 1000 * 1000)
    assert (info.attempt, info.version) == (1, __version__)


# ---------------------------------------------------------------- records too large for the DLQ topic

def test_a_record_that_fits_the_dlq_is_left_as_it_is() -> None:
    rec = to_dlq_record(rejection(), now=NOW)
    assert fit_record(rec, record_bytes(rec)) is rec


def test_a_value_too_large_for_the_dlq_is_left_out_and_the_headers_say_so() -> None:
    rec = to_dlq_record(rejection(source(value=b"x" * 5000)), now=NOW)
    out = fit_record(rec, 2000)
    assert out.key == rec.key and out.value is None
    assert out.headers[: len(rec.headers)] == rec.headers  # the input's and ours, all kept
    assert as_dict(out.headers)[H_DROPPED] == b"value"
    assert as_dict(out.headers)[H_ORIG_BYTES] == str(record_bytes(rec)).encode()
    assert record_bytes(out) <= 2000
    info = parse_headers(out.headers)
    assert (info.topic, info.partition, info.offset, info.dropped) == ("decoded_iot_data", 2, 41, "value")


def test_key_and_input_headers_go_too_when_the_value_alone_is_not_enough() -> None:
    rec = to_dlq_record(rejection(source(key=b"k" * 3000, headers=(("big", b"h" * 3000),))), now=NOW)
    out = fit_record(rec, 2000)
    assert (out.key, out.value) == (None, None)
    assert original_headers(out.headers) == ()
    assert [h for h in out.headers if h[0] not in (H_DROPPED, H_ORIG_BYTES, H_OWN)] == list(
        h for h in rec.headers if h[0].startswith("__") and h[0] != H_OWN)
    assert parse_headers(out.headers).dropped == "value,key,headers"
    assert record_bytes(out) <= 2000


@given(key=st.binary(max_size=3000), value=st.binary(max_size=6000), limit=st.integers(1500, 12000),
       extra=st.lists(st.tuples(st.text(max_size=20), st.binary(max_size=500)), max_size=5))
def test_fit_record_is_within_the_limit_and_changes_only_what_does_not_fit(
        key: bytes, value: bytes, limit: int, extra: list[tuple[str, bytes]]) -> None:
    rec = to_dlq_record(rejection(source(key=key, value=value, headers=tuple(extra))), now=NOW)
    out = fit_record(rec, limit)
    assert record_bytes(out) <= limit
    assert (out is rec) == (record_bytes(rec) <= limit)
    assert parse_headers(out.headers).offset == 41  # the way back to the original, always


def test_replaying_a_record_without_its_value_keeps_saying_so() -> None:
    dropped = fit_record(to_dlq_record(rejection(source(value=b"x" * 5000)), now=NOW), 2000)
    replayed = SourceRecord("decoded_iot_data.dlq", 0, 3, dropped.key, dropped.value, dropped.headers)
    again = to_dlq_record(rejection(replayed, error_class="EmptyValue", message="empty"), now=NOW, replayed=True)
    headers = [k for k, _ in again.headers]
    assert headers.count(H_DROPPED) == 1 and headers.count(H_ORIG_BYTES) == 1
    assert parse_headers(again.headers).dropped == "value"
    assert parse_headers(again.headers).attempt == 2


def test_a_refused_limit_is_halved_down_to_a_floor() -> None:
    from sink.outbox import lower_limit

    assert lower_limit(1_048_588) == 524_294
    assert lower_limit(1500) == lower_limit(1024) == 1024


def test_a_records_own_failure_headers_are_kept_and_never_taken_for_its_origin() -> None:
    own: Headers = (("__connect.errors.topic", b"t"), ("__sink.errors.attempt", b"7"), ("app", b"x"),
                    (H_OWN, b"0"))
    rec = source(headers=own, value=b"x")
    out = to_dlq_record(rejection(rec), now=NOW)
    info = parse_headers(out.headers)
    assert (info.topic, info.partition, info.offset, info.attempt) == ("decoded_iot_data", 2, 41, 1)
    assert info.original_timestamp_ms == 1_700_000_000_000
    assert original_headers(out.headers) == own
    assert out.headers[: len(own)] == own  # first and unchanged; ours follow


def test_replay_restores_a_records_own_failure_headers_exactly() -> None:
    own: Headers = (("__connect.errors.offset", b"5"), ("trace", b"t"))
    first = to_dlq_record(rejection(source(headers=own)), now=NOW)
    back = SourceRecord("decoded_iot_data.dlq", 0, 9, first.key, first.value, first.headers)
    second = to_dlq_record(rejection(back, error_class="EmptyValue"), now=NOW, replayed=True)
    assert original_headers(second.headers) == own
    info = parse_headers(second.headers)
    assert (info.offset, info.attempt, info.error_class) == (41, 2, "EmptyValue")


def test_too_large_for_the_dlq_keeps_the_true_origin_with_hostile_headers() -> None:
    rec = source(headers=(("__connect.errors.offset", b"nope"), ("big", b"h" * 3000)), value=b"v" * 3000)
    out = fit_record(to_dlq_record(rejection(rec), now=NOW), 2000)
    info = parse_headers(out.headers)
    assert (info.topic, info.partition, info.offset, info.dropped) == ("decoded_iot_data", 2, 41, "value,key,headers")
    assert original_headers(out.headers) == ()


def test_unreadable_headers_are_said_in_the_dlq_record() -> None:
    rec = source(headers=UnreadableHeaders("header name b'\\xff' is not UTF-8"), value=None)
    out = to_dlq_record(rejection(rec, error_class="EmptyValue"), now=NOW)
    assert as_dict(out.headers)[H_UNREADABLE] == b"header name b'\\xff' is not UTF-8"
    assert original_headers(out.headers) == ()
    assert parse_headers(out.headers).offset == 41


def test_a_record_that_breaks_the_envelope_still_goes_to_the_dlq_with_its_origin(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def hostile(*args: object) -> DlqRecord:  # stands in for content the envelope does not expect
        raise ValueError("boom")

    monkeypatch.setattr("sink.envelope._envelope", hostile)
    rec = source()
    out = to_dlq_record(rejection(rec), now=NOW)
    info = parse_headers(out.headers)
    assert (out.key, out.value) == (rec.key, rec.value)
    assert (info.offset, info.stage, info.error_class) == (41, "envelope", "UnexpectedValueError")
    assert "boom" in (info.message or "")
