"""IotMeasurement's conversion rules (sink/model.py docstring), and the writer's pure SQL helpers
that are built from the model's columns (insert_statement, classify_duplicates)."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from psycopg import sql
from pydantic import ValidationError

from sink.model import COLUMNS, PRIMARY_KEY, IotMeasurement, as_row
from sink.writer import classify_duplicates, insert_statement

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Table limits from the spec's DDL (VARCHAR(n)), by model field name.
VARCHAR_LIMITS = {
    "device_id": 50,
    "connector_mode": 50,
    "component_type": 50,
    "pin_position": 10,
    "unit": 20,
    "topic": 255,
}
ALIASES = {
    "device_id": "mac_address",
    "connector_mode": "mode",
    "component_type": "data_point_label",
    "pin_position": "pin",
    "topic": "original_topic",
}
DEFAULTS = {"connector_mode": "unknown", "component_type": "unknown", "pin_position": "-1", "unit": "", "topic": ""}
# First and last second Python (and so the model) can represent; PostgreSQL's range is wider.
YEAR_1_SECONDS = -62_135_596_800
# Integer epoch values are exact through the model while the microsecond count fits a double's
# 53-bit mantissa (about 1684-07-28 .. 2255-06-05); integers are converted exactly beyond that.
MAX_EXACT_MICROS = 2**53


def measure(**fields: Any) -> IotMeasurement:
    record: dict[str, Any] = {"mac_address": "aa:bb:cc:dd:ee:ff", "timestamp": 1_700_000_000}
    record.update(fields)
    return IotMeasurement.model_validate(record)


def measure_json(**fields: Any) -> IotMeasurement:
    """Through pydantic's JSON parser, as decode() does."""
    record: dict[str, Any] = {"mac_address": "aa:bb:cc:dd:ee:ff", "timestamp": 1_700_000_000}
    record.update(fields)
    return IotMeasurement.model_validate_json(json.dumps(record))


def rejected_fields(**fields: Any) -> list[str]:
    with pytest.raises(ValidationError) as info:
        measure(**fields)
    return [".".join(map(str, e["loc"])) for e in info.value.errors()]


# --- aliases, names and defaults


def test_aliases_map_to_the_table_columns() -> None:
    m = measure(mode="auto", data_point_label="temp", pin="A0", original_topic="devices/x", unit="C", value=1.5)
    assert (m.device_id, m.connector_mode, m.component_type, m.pin_position, m.topic) == (
        "aa:bb:cc:dd:ee:ff", "auto", "temp", "A0", "devices/x")


def test_field_names_are_accepted_as_well_as_aliases() -> None:
    m = IotMeasurement.model_validate({"device_id": "dev", "timestamp": 0, "pin_position": "7"})
    assert (m.device_id, m.pin_position) == ("dev", "7")


def test_missing_optional_fields_take_the_spec_defaults() -> None:
    m = measure()
    assert {f: getattr(m, f) for f in DEFAULTS} == DEFAULTS
    assert m.value is None


@pytest.mark.parametrize("field", sorted(DEFAULTS))
def test_explicit_null_takes_the_default(field: str) -> None:
    m = measure(**{ALIASES.get(field, field): None})
    assert getattr(m, field) == DEFAULTS[field]


def test_null_pin_becomes_minus_one_because_it_is_part_of_the_primary_key() -> None:
    assert measure_json(pin=None).pin_position == "-1"
    assert "pin_position" in PRIMARY_KEY


def test_missing_mac_address_is_rejected() -> None:
    with pytest.raises(ValidationError):
        IotMeasurement.model_validate({"timestamp": 0})


@pytest.mark.parametrize("field", ["mac_address", "timestamp"])
def test_null_required_field_is_rejected(field: str) -> None:
    assert rejected_fields(**{field: None}) == [field]


def test_empty_device_id_is_rejected() -> None:
    assert rejected_fields(mac_address="") == ["mac_address"]


def test_unknown_fields_are_ignored() -> None:
    assert measure(firmware="1.2.3", nested={"a": 1}).device_id == "aa:bb:cc:dd:ee:ff"


def test_measurement_is_immutable() -> None:
    m = measure()
    with pytest.raises(ValidationError):
        m.value = 3.0  # type: ignore[misc]


# --- timestamps


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2024-03-01T12:34:56Z", datetime(2024, 3, 1, 12, 34, 56, tzinfo=UTC)),
        ("2024-03-01T12:34:56.123456Z", datetime(2024, 3, 1, 12, 34, 56, 123456, tzinfo=UTC)),
        ("2024-03-01T14:34:56+02:00", datetime(2024, 3, 1, 12, 34, 56, tzinfo=UTC)),
        ("2024-03-01T07:34:56-05:00", datetime(2024, 3, 1, 12, 34, 56, tzinfo=UTC)),
    ],
)
def test_iso_timestamp_with_zone_is_converted_to_utc(raw: str, expected: datetime) -> None:
    ts = measure(timestamp=raw).timestamp
    assert ts == expected
    assert ts.utcoffset() == timedelta(0)


def test_naive_iso_timestamp_is_taken_as_utc() -> None:
    ts = measure(timestamp="2024-03-01T12:34:56").timestamp
    assert ts == datetime(2024, 3, 1, 12, 34, 56, tzinfo=UTC)
    assert ts.tzinfo is not None


def test_aware_datetime_is_converted_to_utc() -> None:
    ts = measure(timestamp=datetime(2024, 1, 1, 9, tzinfo=timezone(timedelta(hours=9)))).timestamp
    assert ts == datetime(2024, 1, 1, tzinfo=UTC)
    assert ts.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # |x| < 1e11: seconds
        (0, EPOCH),
        (1_700_000_000, datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        (1_700_000_000.25, datetime(2023, 11, 14, 22, 13, 20, 250000, tzinfo=UTC)),
        (-86_400, datetime(1969, 12, 31, tzinfo=UTC)),
        (99_999_999_999, datetime(5138, 11, 16, 9, 46, 39, tzinfo=UTC)),
        # 1e11 <= |x| < 1e14: milliseconds
        (100_000_000_000, datetime(1973, 3, 3, 9, 46, 40, tzinfo=UTC)),
        (1_700_000_000_123, datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)),
        (-100_000_000_000, datetime(1966, 10, 31, 14, 13, 20, tzinfo=UTC)),
        # 1e14 <= |x| < 1e17: microseconds
        (100_000_000_000_000, datetime(1973, 3, 3, 9, 46, 40, tzinfo=UTC)),
        (1_700_000_000_123_456, datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC)),
    ],
)
def test_epoch_unit_is_picked_by_magnitude(raw: float, expected: datetime) -> None:
    assert measure(timestamp=raw).timestamp == expected


@pytest.mark.parametrize("raw", ["1700000000", " 1700000000 ", "1.7e9", "1700000000000", "1700000000000000"])
def test_numeric_string_timestamp_is_read_as_epoch(raw: str) -> None:
    assert measure(timestamp=raw).timestamp == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)


def test_epoch_of_1e17_or_more_is_rejected() -> None:
    assert rejected_fields(timestamp=10**17) == ["timestamp"]
    assert rejected_fields(timestamp=-(10**17)) == ["timestamp"]


@pytest.mark.parametrize("raw", [True, False])
def test_boolean_timestamp_is_rejected(raw: bool) -> None:
    assert rejected_fields(timestamp=raw) == ["timestamp"]


@pytest.mark.parametrize("raw", [math.nan, math.inf, -math.inf, "nan", "NaN", "inf", "-Infinity"])
def test_non_finite_timestamp_is_rejected(raw: Any) -> None:
    assert rejected_fields(timestamp=raw) == ["timestamp"]


@pytest.mark.parametrize(
    "raw",
    [
        YEAR_1_SECONDS - 1,  # 0000-12-31T23:59:59Z: before year 1
        -99_999_999_999,  # year -1199
        "0001-01-01T00:00:00+01:00",  # year 0 in UTC
        "9999-12-31T23:59:59-01:00",  # year 10000 in UTC
    ],
)
def test_timestamp_outside_years_1_to_9999_is_rejected(raw: Any) -> None:
    assert rejected_fields(timestamp=raw) == ["timestamp"]


def test_first_second_of_year_1_is_accepted() -> None:
    assert measure(timestamp=YEAR_1_SECONDS).timestamp == datetime(1, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("raw", ["yesterday", "", "2024-13-01T00:00:00Z", [1], {"s": 1}])
def test_unparseable_timestamp_is_rejected(raw: Any) -> None:
    assert rejected_fields(timestamp=raw) == ["timestamp"]


def test_huge_integer_timestamp_is_rejected_not_raised() -> None:
    """A JSON integer too large for a double must be a validation error like any other."""
    with pytest.raises(ValidationError):
        measure(timestamp=10**400)


@given(st.integers(min_value=YEAR_1_SECONDS, max_value=10**11 - 1))
def test_epoch_seconds_round_trip_exactly(seconds: int) -> None:
    expected = EPOCH + timedelta(seconds=seconds)
    assert measure_json(timestamp=seconds).timestamp == expected
    assert measure(timestamp=str(seconds)).timestamp == expected


# A double holds seconds with six exact decimals only while |µs| < 2^51 (1898-08 .. 2041-05);
# beyond that a microsecond-precise float of seconds does not exist, whatever the model does.
@given(st.integers(min_value=-(2**51), max_value=2**51))
def test_fractional_epoch_seconds_round_to_the_nearest_microsecond(micros: int) -> None:
    seconds = micros / 1e6
    assert measure_json(timestamp=seconds).timestamp == EPOCH + timedelta(microseconds=micros)


@given(st.integers(min_value=10**11, max_value=MAX_EXACT_MICROS // 1000), st.booleans())
def test_epoch_milliseconds_round_trip_exactly(magnitude: int, negative: bool) -> None:
    millis = -magnitude if negative else magnitude
    assert measure_json(timestamp=millis).timestamp == EPOCH + timedelta(milliseconds=millis)


@given(st.integers(min_value=10**14, max_value=MAX_EXACT_MICROS), st.booleans())
def test_epoch_microseconds_round_trip_exactly(magnitude: int, negative: bool) -> None:
    micros = -magnitude if negative else magnitude
    assert measure_json(timestamp=micros).timestamp == EPOCH + timedelta(microseconds=micros)


@given(st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)))
def test_datetime_to_epoch_microseconds_and_back_is_identity(when: datetime) -> None:
    micros = (when - EPOCH) // timedelta(microseconds=1)
    assume(abs(micros) >= 10**14)  # smaller magnitudes are read as seconds or milliseconds
    assert measure_json(timestamp=micros).timestamp == when


def test_epoch_milliseconds_in_documented_range_convert_exactly() -> None:
    # 99_999_999_999_999 ms < 1e14 is milliseconds by the documented rule.
    assert measure_json(timestamp=99_999_999_999_999).timestamp == datetime(
        5138, 11, 16, 9, 46, 39, 999000, tzinfo=UTC)


def test_largest_documented_microsecond_epoch_is_accepted() -> None:
    assert measure_json(timestamp=10**17 - 1).timestamp == datetime(5138, 11, 16, 9, 46, 39, 999999, tzinfo=UTC)


# --- values


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (21, 21.0),
        (-3.25, -3.25),
        ("21.5", 21.5),
        (" 1e3 ", 1000.0),
        (True, 1.0),
        (False, 0.0),
        (None, None),
        ("", None),
        ("   ", None),
        (1.7976931348623157e308, 1.7976931348623157e308),
    ],
)
def test_value_conversion(raw: Any, expected: float | None) -> None:
    assert measure(value=raw).value == expected


def test_value_is_always_a_float_or_none() -> None:
    assert type(measure(value=21).value) is float


@pytest.mark.parametrize("raw", [math.nan, math.inf, -math.inf, "NaN", "nan", "Infinity", "-inf"])
def test_nan_and_infinity_values_are_rejected(raw: Any) -> None:
    assert rejected_fields(value=raw) == ["value"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_non_finite_json_number_value_is_rejected(literal: str) -> None:
    raw = '{"mac_address": "dev", "timestamp": 0, "value": ' + literal + "}"
    with pytest.raises(ValidationError) as info:
        IotMeasurement.model_validate_json(raw)
    assert [e["loc"] for e in info.value.errors()] == [("value",)]


def test_integer_too_large_for_double_precision_is_rejected() -> None:
    assert rejected_fields(value=10**400) == ["value"]


@pytest.mark.parametrize("raw", ["abc", "0x10", "1,5", [1.0], {"v": 1}])
def test_non_numeric_value_is_rejected(raw: Any) -> None:
    assert rejected_fields(value=raw) == ["value"]


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_finite_float_value_round_trips_through_json_and_numeric_string(x: float) -> None:
    assert measure_json(value=x).value == x
    assert measure(value=repr(x)).value == x


# --- text fields


@pytest.mark.parametrize(("field", "limit"), sorted(VARCHAR_LIMITS.items()))
def test_text_at_varchar_limit_is_accepted(field: str, limit: int) -> None:
    assert getattr(measure(**{ALIASES.get(field, field): "x" * limit}), field) == "x" * limit


@pytest.mark.parametrize(("field", "limit"), sorted(VARCHAR_LIMITS.items()))
def test_text_over_varchar_limit_is_rejected(field: str, limit: int) -> None:
    key = ALIASES.get(field, field)
    assert rejected_fields(**{key: "x" * (limit + 1)}) == [key]


def test_varchar_limit_counts_characters_not_bytes() -> None:
    # PostgreSQL's VARCHAR(n) counts characters: 50 four-byte emoji fit VARCHAR(50).
    assert measure(mac_address="\N{GRINNING FACE}" * 50).device_id == "\N{GRINNING FACE}" * 50
    assert rejected_fields(mac_address="\N{GRINNING FACE}" * 51) == ["mac_address"]


@pytest.mark.parametrize("field", sorted(VARCHAR_LIMITS))
def test_nul_character_in_text_is_rejected(field: str) -> None:
    key = ALIASES.get(field, field)
    assert rejected_fields(**{key: "a\x00b"}) == [key]


@pytest.mark.parametrize("field", sorted(VARCHAR_LIMITS))
def test_lone_surrogate_in_text_is_rejected(field: str) -> None:
    key = ALIASES.get(field, field)
    assert rejected_fields(**{key: "a\ud800b"}) == [key]


@pytest.mark.parametrize(("raw", "expected"), [(3, "3"), (-1, "-1"), (2.5, "2.5")])
def test_number_for_text_field_becomes_its_string(raw: float, expected: str) -> None:
    assert measure(pin=raw).pin_position == expected


def test_boolean_for_text_field_is_rejected() -> None:
    assert rejected_fields(pin=True) == ["pin"]


def test_number_too_long_for_its_column_is_rejected() -> None:
    assert rejected_fields(pin=12_345_678_901) == ["pin"]


@given(st.text(max_size=50).filter(lambda s: "\x00" not in s))
def test_any_unicode_mode_without_nul_within_limit_is_kept_verbatim(text: str) -> None:
    assert measure(mode=text).connector_mode == text


# --- rows and columns


def test_columns_follow_the_table_column_order() -> None:
    assert COLUMNS == ("timestamp", "device_id", "connector_mode", "component_type", "pin_position", "value",
                       "unit", "topic")


def test_primary_key_is_a_subset_of_the_columns() -> None:
    assert set(PRIMARY_KEY) <= set(COLUMNS)


def test_as_row_yields_values_in_column_order() -> None:
    m = measure(mode="auto", data_point_label="temp", pin=2, value="1.5", unit="C", original_topic="t/1")
    assert as_row(m) == (datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC), "aa:bb:cc:dd:ee:ff", "auto", "temp", "2",
                         1.5, "C", "t/1")


# --- the writer's pure helpers, built from the model's columns


def test_insert_statement_lists_the_model_columns_and_returns_the_primary_key() -> None:
    text = insert_statement(sql.Identifier("s", "iot_measurements")).as_string(None)
    cols = ", ".join(f'"{c}"' for c in COLUMNS)
    pk = ", ".join(f'"{c}"' for c in PRIMARY_KEY)
    assert text == (f'INSERT INTO "s"."iot_measurements" ({cols}) SELECT {cols} FROM "_sink_stage" '
                    f'ORDER BY "_sink_ord" ON CONFLICT DO NOTHING RETURNING {pk}')


def test_insert_statement_quotes_identifiers() -> None:
    text = insert_statement(sql.Identifier("t"), columns=('we"ird',), pk=('we"ird',), stage="s").as_string(None)
    assert text == ('INSERT INTO "t" ("we""ird") SELECT "we""ird" FROM "s" ORDER BY "_sink_ord" '
                    'ON CONFLICT DO NOTHING RETURNING "we""ird"')


PK_INDEX = tuple(COLUMNS.index(c) for c in PRIMARY_KEY)


def row(device: str, value: float = 0.0, second: int = 0) -> tuple[Any, ...]:
    return (EPOCH + timedelta(seconds=second), device, "m", "c", "-1", value, "", "")


def key(r: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(r[i] for i in PK_INDEX)


def test_every_row_returned_means_no_duplicates() -> None:
    rows = [row("a"), row("b"), row("c")]
    result = classify_duplicates(rows, [key(r) for r in reversed(rows)], PK_INDEX)
    assert (result.inserted, result.duplicates, result.duplicate_indexes) == (3, 0, ())


def test_nothing_returned_means_every_row_was_a_duplicate() -> None:
    result = classify_duplicates([row("a"), row("b")], [], PK_INDEX)
    assert (result.inserted, result.duplicates, result.duplicate_indexes) == (0, 2, (0, 1))


def test_repeated_key_within_a_batch_counts_the_first_as_new_and_the_rest_as_duplicates() -> None:
    rows = [row("a", 1.0), row("b"), row("a", 2.0), row("a", 3.0)]
    result = classify_duplicates(rows, [key(row("a")), key(row("b"))], PK_INDEX)  # row order
    assert (result.inserted, result.duplicates, result.duplicate_indexes) == (2, 2, (2, 3))


def test_returned_keys_out_of_row_order_are_matched_by_key() -> None:
    rows = [row("a"), row("b"), row("c"), row("d")]
    result = classify_duplicates(rows, [key(row("c")), key(row("a"))], PK_INDEX)
    assert (result.inserted, result.duplicates, result.duplicate_indexes) == (2, 2, (1, 3))


def test_returned_timestamp_in_another_zone_matches_the_utc_row() -> None:
    r = row("a")
    returned = (r[0].astimezone(timezone(timedelta(hours=2))), *key(r)[1:])
    assert classify_duplicates([r], [returned], PK_INDEX).inserted == 1


@given(
    st.lists(st.tuples(st.sampled_from("abcd"), st.integers(0, 3)), max_size=40),
    st.sets(st.tuples(st.sampled_from("abcd"), st.integers(0, 3))),
    st.randoms(use_true_random=False),
    st.booleans(),
)
def test_duplicates_match_a_simulated_on_conflict_do_nothing(
    batch: list[tuple[str, int]], existing: set[tuple[str, int]], rnd: random.Random, in_order: bool
) -> None:
    """in_order: RETURNING in row order (insert_statement's ORDER BY; the walk).  Otherwise
    shuffled, with one row per key (the hash fallback; with repeated keys and a shuffled
    RETURNING, which of two same-key rows "won" is not knowable from the keys at all)."""
    if not in_order:
        batch = list(dict.fromkeys(batch))
    rows = [row(device, second=second) for device, second in batch]
    seen = {key(row(d, second=s)) for d, s in existing}
    expected_dups, returned = [], []
    for i, r in enumerate(rows):  # what PostgreSQL does: the first new key wins, the rest conflict
        if key(r) in seen:
            expected_dups.append(i)
        else:
            seen.add(key(r))
            returned.append(key(r))
    if not in_order:
        rnd.shuffle(returned)
    result = classify_duplicates(rows, returned, PK_INDEX)
    assert result.duplicate_indexes == tuple(expected_dups)
    assert result.inserted + result.duplicates == len(rows)
    assert result.inserted == len(returned)
