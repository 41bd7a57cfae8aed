"""decode(): Kafka bytes -> a Row, or a Rejection naming the stage and the error class."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sink.decode import decode, decode_many
from sink.demo import INVALID
from sink.demo import records as demo_records
from sink.model import COLUMNS
from sink.types import Rejection, SourceRecord

GOOD = {"mac_address": "aa:bb", "timestamp": "2024-01-02T03:04:05Z", "value": "2.5", "pin": 4}


def record(value: bytes | None, offset: int = 7) -> SourceRecord:
    return SourceRecord("decoded_iot_data", 1, offset, b"key", value, (("h", b"v"),), 1_700_000_000_000)


def encode(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def rejection(value: bytes | None) -> Rejection:
    out = decode(record(value))
    assert isinstance(out, Rejection), out
    return out


def test_valid_record_becomes_a_row_in_column_order() -> None:
    out = decode(record(encode(GOOD)))
    assert out == (datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), "aa:bb", "unknown", "unknown", "4", 2.5, "", "")
    assert len(out) == len(COLUMNS)


@pytest.mark.parametrize("value", [b"", None])
def test_empty_value_or_tombstone_is_rejected_at_decode(value: bytes | None) -> None:
    rej = rejection(value)
    assert (rej.stage, rej.error_class) == ("decode", "EmptyValue")


def test_invalid_utf8_is_rejected_at_decode_with_the_byte_position() -> None:
    rej = rejection(b'{"mac_address": "\xff", "timestamp": 0}')
    assert (rej.stage, rej.error_class) == ("decode", "InvalidUtf8")
    assert "byte 17" in rej.message


@pytest.mark.parametrize("value", [b"not json", b'{"mac_address": "a",', b"{'single': 'quotes'}", b"\xef\xbb\xbf{}"])
def test_invalid_json_is_rejected_at_decode(value: bytes) -> None:
    rej = rejection(value)
    assert (rej.stage, rej.error_class) == ("decode", "InvalidJson")


def test_json_nested_deeper_than_the_parser_allows_is_rejected_as_invalid_json() -> None:
    rej = rejection(b"[" * 100_000 + b"]" * 100_000)
    assert (rej.stage, rej.error_class) == ("decode", "InvalidJson")


@pytest.mark.parametrize(("value", "kind"), [(b"[1, 2]", "list"), (b'"text"', "str"), (b"42", "int"),
                                            (b"null", "NoneType"), (b"true", "bool")])
def test_json_that_is_not_an_object_is_rejected_at_decode(value: bytes, kind: str) -> None:
    rej = rejection(value)
    assert (rej.stage, rej.error_class) == ("decode", "NotAnObject")
    assert kind in rej.message


def test_object_failing_the_model_is_rejected_at_validate_naming_each_field() -> None:
    rej = rejection(encode({"timestamp": "soon", "value": "NaN"}))
    assert (rej.stage, rej.error_class) == ("validate", "ValidationError")
    fields = {part.split(":")[0] for part in rej.message.split("; ")}
    assert fields == {"timestamp", "mac_address", "value"}


def test_validation_message_leaves_the_input_value_out() -> None:
    rej = rejection(encode({"mac_address": "a", "timestamp": "SECRET-ISH-INPUT"}))
    assert rej.error_class == "ValidationError"
    assert "SECRET-ISH-INPUT" not in rej.message


def test_nan_value_is_rejected() -> None:
    rej = rejection(b'{"mac_address": "a", "timestamp": 0, "value": NaN}')
    assert (rej.stage, rej.error_class) == ("validate", "ValidationError")
    assert rej.message.startswith("value:")


def test_nul_character_is_rejected() -> None:
    rej = rejection(b'{"mac_address": "a\\u0000", "timestamp": 0}')
    assert (rej.stage, rej.error_class) == ("validate", "ValidationError")
    assert rej.message.startswith("mac_address:")


def test_lone_surrogate_escape_is_rejected() -> None:
    # json.loads accepts "\ud800", pydantic's parser does not: the record never becomes a row.
    assert isinstance(decode(record(b'{"mac_address": "\\ud800", "timestamp": 0}')), Rejection)


def test_rejection_carries_the_original_record() -> None:
    rec = record(b"[]")
    out = decode(rec)
    assert isinstance(out, Rejection)
    assert out.record is rec
    assert out.sqlstate is None


def test_integer_timestamp_too_large_for_a_double_is_rejected_not_raised() -> None:
    rej = rejection(b'{"mac_address": "a", "timestamp": 1' + b"0" * 400 + b"}")
    assert (rej.stage, rej.error_class) == ("validate", "ValidationError")


@given(st.binary(max_size=200))
def test_any_bytes_become_a_row_or_a_rejection(value: bytes) -> None:
    out = decode(record(value))
    assert isinstance(out, Rejection | tuple)
    if isinstance(out, Rejection):
        assert out.stage in {"decode", "validate"}
        assert out.error_class in {"EmptyValue", "InvalidUtf8", "InvalidJson", "NotAnObject", "ValidationError"}


json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=60))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)


@given(st.fixed_dictionaries({}, optional={
    "mac_address": json_values, "timestamp": json_values, "value": json_values, "pin": json_values,
    "mode": json_values, "unit": json_values, "original_topic": json_values, "data_point_label": json_values,
}))
def test_any_json_object_becomes_a_full_row_or_a_validate_rejection(obj: dict[str, Any]) -> None:
    out = decode(record(encode(obj)))
    if isinstance(out, Rejection):
        assert (out.stage, out.error_class) == ("validate", "ValidationError")
        assert out.message
    else:
        assert len(out) == len(COLUMNS)
        assert out[0].utcoffset().total_seconds() == 0


# decode_many parses the whole list in one call; it must give exactly decode() of each record,
# whatever its neighbours are (a bad value must not spill into, or fail, the others).
values = (st.none() | st.binary(max_size=60) | st.sampled_from([*INVALID, b"{}", b"[", b"1,2", b'{"a":1}{"b":2}'])
          | st.fixed_dictionaries({}, optional={"mac_address": json_values, "timestamp": json_values,
                                                "value": json_values, "pin": json_values}).map(encode)
          | st.sampled_from(list(demo_records(40, seed=5, devices=5))))


@given(st.lists(values, max_size=12))
def test_decode_many_is_decode_of_each_record(batch: list[bytes | None]) -> None:
    recs = [record(v, offset) for offset, v in enumerate(batch)]
    assert decode_many(recs) == [decode(r) for r in recs]


def test_decode_many_keeps_good_records_beside_bad_ones() -> None:
    good = encode(GOOD)
    recs = [record(v, i) for i, v in enumerate([good, b"", b'{"a":1},{"b":2}', good, b'{"mac_address": "a\\u0000", '
                                                 b'"timestamp": 0}', good])]
    out = decode_many(recs)
    assert [type(o).__name__ for o in out] == ["tuple", "Rejection", "Rejection", "tuple", "Rejection", "tuple"]
    assert out[0] == out[3] == out[5] == decode(record(good))
