"""decode's fast path (sink/decode.py fast_row) agrees with IotMeasurement on every record it takes.

The fast path may refuse anything (None: the model decides); what it must never do is accept a
record the model rejects, or build a row that differs from the model's in value, type or zone.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sink.decode import fast_row
from sink.demo import INVALID, records
from sink.model import IotMeasurement, Row, as_row

KEYS = ["timestamp", "mac_address", "device_id", "mode", "connector_mode", "data_point_label", "component_type",
        "pin", "pin_position", "value", "unit", "original_topic", "topic"]


def model_row(value: bytes) -> Row | None:
    try:
        return as_row(IotMeasurement.model_validate_json(value))  # type: ignore[no-any-return]
    except (ValidationError, OverflowError):  # OverflowError: the known model.py bug for ints > 1e308
        return None


def assert_agrees(value: bytes) -> Row | None:
    fast = fast_row(value)
    if fast is None:
        return None
    expected = model_row(value)
    assert expected is not None, f"fast path accepted what the model rejects: {value!r}"
    assert fast == expected
    assert [type(x) for x in fast] == [type(x) for x in expected]
    assert fast[0].tzinfo is expected[0].tzinfo
    return fast


def encode(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")


def base(**fields: Any) -> bytes:
    return encode({"mac_address": "aa:bb", "timestamp": 1_700_000_000, **fields})


def test_every_valid_demo_record_takes_the_fast_path_and_agrees() -> None:
    for value in records(3000, seed=3, devices=100, invalid_share=0.0):
        assert assert_agrees(value) is not None, value


@pytest.mark.parametrize("value", INVALID)
def test_invalid_demo_records_are_left_to_the_model(value: bytes) -> None:
    assert fast_row(value) is None


@pytest.mark.parametrize("value", [
    b'{"mac_address": "a\\u0000", "timestamp": 0}',  # NUL escape: the model names the field
    b'{"mac_address": "\\ud800", "timestamp": 0}',  # lone surrogate
    b'{"mac_address": "a", "timestamp": "2024-03-01"}',  # a date without a time
    b'{"mac_address": 12, "timestamp": 0}',  # a number in a text field other than pin
    b'{"mac_address": "a", "timestamp": 0, "pin": 12345678901}',  # 11 characters > VARCHAR(10)
    b'{"mac_address": "a", "timestamp": 0, "value": NaN}',
    b'{"mac_address": "a", "timestamp": "NaN"}',
    b'{"mac_address": "a", "timestamp": 1' + b"0" * 400 + b"}",
    b'{"mac_address": "a", "timestamp": true}',
])
def test_unusual_or_invalid_records_go_to_the_model(value: bytes) -> None:
    assert fast_row(value) is None


@pytest.mark.parametrize("value", [
    b'{"mac_address": "a\\/b", "timestamp": 0, "unit": "\\u00b0C"}',  # escapes, none of them NUL
    b'{"mac_address": "a\\"b\\\\", "timestamp": 0, "original_topic": "x\\ny"}',
])
def test_escapes_other_than_nul_take_the_fast_path(value: bytes) -> None:
    assert assert_agrees(value) is not None


def test_a_nul_escape_after_other_escapes_goes_to_the_model() -> None:
    value = b'{"mac_address": "a\\/b", "timestamp": 0, "unit": "\\n\\u0000"}'
    assert fast_row(value) is None
    assert model_row(value) is None


def test_null_text_fields_take_the_model_defaults() -> None:
    row = assert_agrees(base(mode=None, data_point_label=None, pin=None, unit=None, original_topic=None))
    assert row is not None
    assert row[2:] == ("unknown", "unknown", "-1", None, "", "")


def test_field_names_and_aliases_resolve_as_in_the_model() -> None:
    assert assert_agrees(encode({"device_id": "d", "timestamp": 0, "connector_mode": "x", "mode": "y"})) is not None


json_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=60)
                | st.sampled_from(["", " ", "1e3", " 42 ", "nan", "-inf", "0x10", "1_000", "2024-01-02T03:04:05Z"]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=2)
                           | st.dictionaries(st.text(max_size=3), inner, max_size=2), max_leaves=4)


@settings(max_examples=400)
@given(st.dictionaries(st.sampled_from(KEYS), json_values, max_size=8))
def test_any_object_of_known_keys(obj: dict[str, Any]) -> None:
    assert_agrees(encode(obj))




def _zoned(naive: datetime, minutes: int | None) -> datetime:
    return naive if minutes is None else naive.replace(tzinfo=timezone(timedelta(minutes=minutes)))


aware = st.builds(_zoned, st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
                  st.none() | st.integers(-23 * 60 - 59, 23 * 60 + 59))


@st.composite
def iso_text(draw: st.DrawFn) -> str:
    when = draw(aware)
    text = when.isoformat(sep=draw(st.sampled_from(["T", " ", "t"])),
                          timespec=draw(st.sampled_from(["auto", "seconds", "milliseconds", "microseconds"])))
    if draw(st.booleans()):
        text = text.replace("+00:00", "Z")
    return text


timestamps = (st.integers() | st.floats() | st.integers(-10**17, 10**17).map(str)
              | st.floats(allow_nan=False).map(lambda f: f" {f!r} ") | iso_text()
              | st.text(alphabet="0123456789-:TZ.+ ", max_size=32) | st.text(max_size=10))


@settings(max_examples=600)
@given(timestamps)
@example("2024-03-01T12:00:00.1234567Z")
@example("2024-02-30T00:00:00Z")
@example("0001-01-01T00:00:00+01:00")
@example(10**17 - 1)
def test_timestamps(ts: Any) -> None:
    assert_agrees(base(timestamp=ts))


@given(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
       | st.floats(allow_nan=False).map(repr))
def test_values(value: Any) -> None:
    assert_agrees(base(value=value))


text_values = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
               | st.integers(0, 300).map(lambda n: "x" * n) | st.text(max_size=60))


@settings(max_examples=400)
@given(st.sampled_from(["mac_address", "mode", "data_point_label", "pin", "unit", "original_topic"]), text_values)
def test_text_fields(key: str, text: Any) -> None:
    assert_agrees(base(**{key: text}))


def test_timestamp_is_utc() -> None:
    row = assert_agrees(base(timestamp="2024-03-01T14:00:00+02:00"))
    assert row is not None
    assert row[0] == datetime(2024, 3, 1, 12, tzinfo=UTC)
    assert row[0].tzinfo is UTC
