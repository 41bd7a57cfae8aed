"""decode() under hostile input: whatever the bytes, key and headers, a row or a rejection that the
rules name (never an exception, never the safety net's Unexpected* class), decode_many() agreeing
record by record; and every accepted form of a valid record gives exactly the documented row."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from sink import decode as decode_module
from sink.decode import decode, decode_many
from sink.model import COLUMNS
from sink.types import Rejection, SourceRecord, UnreadableHeaders

RULED = {"EmptyValue", "InvalidUtf8", "InvalidJson", "NotAnObject", "ValidationError"}
VALID = (b'{"timestamp": "2026-11-28T06:00:00Z", "mac_address": "02:00:00:00:00:2a", "mode": "analog", '
         b'"data_point_label": "temperature", "pin": "A0", "value": 21.5, "unit": "C", '
         b'"original_topic": "devices/x"}')
# What broken or hostile producers put into records (each seen in the field or in fuzzing).
TOKENS = [b"NaN", b"-Infinity", b"Infinity", b"1e400", b"-1e400", b"1" * 4301, b"-" + b"9" * 5000, b"1" * 4300,
          b'"\\u0000"', b'"\\ud800"', b'"\\udfff\\ud800"', b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b"[" * 3000,
          b"{" * 200, b"null", b"true", b'"' + b"x" * 300 + b'"', b"0x1F", b"1e-400", b"-0", b"1.7976931348623157e309",
          b"'; DROP TABLE iot_measurements; --", b'{"a":1}', b"\\", b'"', b",", b":", b"}"]


def record(value: bytes | None, key: bytes | None = b"k", headers: Any = ()) -> SourceRecord:
    return SourceRecord("decoded_iot_data", 0, 1, key, value, headers, 1_700_000_000_000)


def assert_ruled(out: object) -> None:
    if isinstance(out, Rejection):
        assert out.error_class in RULED, out
        assert out.stage in {"decode", "validate"}
    else:
        assert isinstance(out, tuple) and len(out) == len(COLUMNS)


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    """A valid record with a few byte-level edits: flips, cuts, insertions of hostile tokens."""
    data = bytearray(draw(st.sampled_from([VALID, VALID.replace(b'"A0"', b"3"), VALID.replace(b"21.5", b'"7"')])))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete", "replace_value"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            data[min(at, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.sampled_from(TOKENS))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        else:  # a field's value replaced by a hostile token
            field = draw(st.sampled_from([b'"02:00:00:00:00:2a"', b'"analog"', b'"A0"', b"21.5", b'"C"',
                                          b'"2026-11-28T06:00:00Z"']))
            data = bytearray(bytes(data).replace(field, draw(st.sampled_from(TOKENS)), 1))
    return bytes(data)


header_lists = st.lists(st.tuples(st.text(max_size=10), st.none() | st.binary(max_size=10)), max_size=4).map(tuple)
keys = st.none() | st.binary(max_size=40)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.none() | st.binary(max_size=2000), key=keys, headers=header_lists)
def test_any_bytes_key_and_headers_give_a_row_or_a_ruled_rejection(value: bytes | None, key: bytes | None,
                                                                   headers: Any) -> None:
    rec = record(value, key, headers)
    out = decode(rec)
    assert_ruled(out)
    assert decode_many([rec]) == [out]


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(value=mutations(), key=keys, headers=header_lists)
def test_any_mutation_of_a_valid_record_gives_a_row_or_a_ruled_rejection(value: bytes, key: bytes | None,
                                                                         headers: Any) -> None:
    out = decode(record(value, key, headers))
    assert_ruled(out)


@settings(max_examples=200)
@given(st.lists(st.none() | mutations() | st.binary(max_size=100), min_size=1, max_size=20))
def test_decode_many_over_hostile_neighbours_is_decode_of_each(batch: list[bytes | None]) -> None:
    recs = [record(v) for v in batch]
    assert decode_many(recs) == [decode(r) for r in recs]


def test_unreadable_headers_do_not_stop_a_valid_row() -> None:
    out = decode(record(VALID, headers=UnreadableHeaders("header name b'\\xff' is not UTF-8")))
    assert isinstance(out, tuple) and out[1] == "02:00:00:00:00:2a"


@pytest.mark.parametrize("field", ["mac_address", "value"])
@pytest.mark.parametrize("digits", [4301, 10_000])
def test_an_integer_longer_than_pythons_limit_is_rejected_not_raised(field: str, digits: int) -> None:
    value = b'{"mac_address": "a", "timestamp": 0, "%s": %s}' % (field.encode(), b"1" * digits)
    for out in (decode(record(value)), decode_many([record(value)])[0]):
        assert isinstance(out, Rejection) and out.error_class == "ValidationError", out


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400"])
@pytest.mark.parametrize("field", ["mac_address", "mode", "data_point_label", "pin", "unit", "original_topic"])
def test_non_finite_numbers_are_rejected_in_text_fields(field: str, token: bytes) -> None:
    base = {"mac_address": "a", "timestamp": 0}
    value = json.dumps(base).encode()[:-1] + b', "%s": %s}' % (field.encode(), token)
    out = decode(record(value))
    assert isinstance(out, Rejection) and out.error_class == "ValidationError", out
    name = "mac_address" if field == "mac_address" else field
    assert out.message.startswith(f"{name}:") and "NaN and Infinity are rejected" in out.message


def test_an_unexpected_exception_in_a_decoder_step_rejects_only_that_record(monkeypatch: pytest.MonkeyPatch) -> None:
    real = decode_module.convert_value

    def broken(v: Any) -> float | None:  # a converter that trips over one particular input
        if v in (666, "666"):
            raise KeyError("surprise")
        return real(v)

    monkeypatch.setattr(decode_module, "convert_value", broken)
    monkeypatch.setattr("sink.model.convert_value", broken)
    bad = record(b'{"mac_address": "a", "timestamp": 0, "value": "666"}')
    good = record(b'{"mac_address": "a", "timestamp": 0, "value": 2}')
    with capture_logs() as logs:
        outs = [*decode_many([good, bad, good]), decode(bad)]
    assert outs[0] == outs[2] and isinstance(outs[0], tuple)
    for out in (outs[1], outs[3]):
        assert isinstance(out, Rejection)
        assert (out.stage, out.error_class) == ("decode", "UnexpectedKeyError")
        assert "KeyError" in out.message and "surprise" in out.message
    faults = [e for e in logs if e["event"] == "record_fault"]
    assert len(faults) == 2 and faults[0]["log_level"] == "error" and faults[0]["exc_info"]
    assert (faults[0]["offset"], faults[0]["error_class"]) == (1, "KeyError")


def test_a_memory_error_is_not_a_records_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    def exhausted(value: bytes) -> None:
        raise MemoryError

    monkeypatch.setattr(decode_module, "fast_row", exhausted)
    with pytest.raises(MemoryError):
        decode(record(VALID))


# ---- valid records, in every accepted form, give exactly the documented row

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)


@st.composite
def timestamps(draw: st.DrawFn) -> tuple[Any, datetime]:
    """A timestamp in one of the accepted forms, and the UTC time the README says it means."""
    # From 1974 each epoch unit lands in its own magnitude band (README: seconds < 1e11 <= ms).
    when = draw(st.datetimes(min_value=datetime(1974, 1, 1), max_value=datetime(2200, 1, 1)))
    when = when.replace(tzinfo=UTC)
    seconds = int((when - EPOCH).total_seconds())
    form = draw(st.sampled_from(["iso_z", "iso_offset", "iso_naive", "s", "ms", "us", "s_str", "ms_str"]))
    whole = EPOCH + timedelta(seconds=seconds)
    if form == "iso_z":
        return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), when
    if form == "iso_offset":
        off = timedelta(hours=draw(st.integers(-12, 14)))
        return when.astimezone(timezone(off)).isoformat(), when
    if form == "iso_naive":
        return when.replace(tzinfo=None).isoformat(), when
    if form == "s":
        return seconds, whole
    if form == "ms":
        return seconds * 1000 + 7, whole + timedelta(milliseconds=7)
    if form == "us":
        return seconds * 1_000_000 + 9, whole + timedelta(microseconds=9)
    if form == "s_str":
        return str(seconds), whole
    return str(seconds * 1000), whole


@st.composite
def values(draw: st.DrawFn) -> tuple[Any, float | None]:
    form = draw(st.sampled_from(["float", "int", "str", "bool", "null", "empty", "missing"]))
    x = draw(st.floats(-1e300, 1e300, allow_nan=False))
    if form == "float":
        return x, x
    if form == "int":
        n = draw(st.integers(-(2**53), 2**53))
        return n, float(n)
    if form == "str":
        return repr(x), x
    if form == "bool":
        b = draw(st.booleans())
        return b, 1.0 if b else 0.0
    return {"null": None, "empty": "", "missing": ...}[form], None


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(ts=timestamps(), val=values(), device=text.filter(bool).map(lambda s: s[:50]),
       mode=st.none() | text.map(lambda s: s[:50]),
       pin=st.none() | st.integers(-999, 9999) | text.map(lambda s: s[:10]),
       unit=st.none() | text.map(lambda s: s[:20]), column_names=st.booleans())
def test_valid_records_in_every_accepted_form_give_the_documented_row(
        ts: tuple[Any, datetime], val: tuple[Any, float | None], device: str, mode: str | None,
        pin: int | str | None, unit: str | None, column_names: bool) -> None:
    names = (dict(zip(["device_id", "connector_mode", "pin_position"], ["device_id", "connector_mode", "pin_position"],
                      strict=True)) if column_names else
             {"device_id": "mac_address", "connector_mode": "mode", "pin_position": "pin"})
    obj: dict[str, Any] = {"timestamp": ts[0], names["device_id"]: device, names["connector_mode"]: mode,
                           names["pin_position"]: pin, "unit": unit}
    if val[0] is not ...:
        obj["value"] = val[0]
    out = decode(record(json.dumps(obj).encode()))
    assert not isinstance(out, Rejection), (obj, out)
    expected = (ts[1], device, "unknown" if mode is None else mode, "unknown", "-1" if pin is None else str(pin),
                val[1], "" if unit is None else unit, "")
    assert out == expected
    assert decode_many([record(json.dumps(obj).encode())]) == [expected]
