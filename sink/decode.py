"""Bytes -> Row, or a Rejection saying why (pure: no Kafka, no database).

Two paths, one set of rules (sink/model.py):

* the fast path: pydantic's Rust JSON parser checks the record against ``_Wire``, a narrow
  schema with no Python validator (names, aliases, lengths and defaults taken from
  IotMeasurement), then a few lines of Python finish the row with the model's own converters
  (epoch units, UTC, value): about 5 µs of CPU per record where the model, with its ~20
  Python validator calls, takes 16-19 µs (docs/performance.md).
* the model path: IotMeasurement itself, for every record the fast path does not take.

decode_many() runs the fast path's parsing for a whole list of records in one call into
pydantic; each record still gets exactly decode()'s outcome (tests/test_decode.py).

The fast path only *accepts* what it converts exactly as the model does (tests/test_decode_fast.py
compares both on generated records); anything unusual (a NUL escape, a number in a text field
other than ``pin``, a date without a time, every invalid record) returns None and goes to the
model, so rejections and their messages are the model's, unchanged.

Neither raises: an exception no rule expected becomes the record's rejection
(sink.errors.record_fault), so no record's content can stop the sink.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from operator import itemgetter
from typing import Annotated, Any, NotRequired

from pydantic import ConfigDict, Field, Json, StringConstraints, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from sink.errors import record_fault
from sink.model import (
    COLUMNS,
    NULL_TAKES_DEFAULT,
    IotMeasurement,
    Row,
    as_row,
    convert_timestamp,
    convert_value,
    epoch_to_datetime,
    to_utc,
)
from sink.types import Rejection, SourceRecord

_validate_json = IotMeasurement.__pydantic_validator__.validate_json

# A string that cannot be an ISO date-time with a time of day.  Such strings stay text and go
# through the model's convert_timestamp (epoch numbers like "1700000000"); strings with a colon
# are parsed by pydantic's date-time parser, the one the model hands them to as well.
_NoColon = Annotated[str, StringConstraints(pattern=r"^[^:]*$")]
_FIELDS = IotMeasurement.model_fields


def _limits(name: str) -> StringConstraints | None:
    for m in _FIELDS[name].metadata:
        if isinstance(m, StringConstraints):
            return StringConstraints(min_length=m.min_length, max_length=m.max_length)
    return None


def _wire_schema() -> Any:
    """IotMeasurement's fields, aliases and limits as a TypedDict of Rust-only strict types (no
    Python validator); None if the model has a field the fast path does not know how to check
    (then it is off).  A TypedDict, not a model: 2.7 µs per record against 4.5 µs (no instance)."""
    spec: dict[str, Any] = {}
    for name, f in _FIELDS.items():
        limits = _limits(name)
        if name == "timestamp":
            spec[name] = Annotated[int | float | _NoColon | datetime, Field(union_mode="left_to_right")]
        elif name == "value":
            spec[name] = NotRequired[Annotated[float | bool | str | None, Field(None, union_mode="left_to_right")]]
        elif limits is None:
            return None
        elif name not in NULL_TAKES_DEFAULT:  # null is the model's call (an error, or None)
            spec[name] = (Annotated[str, limits, Field(alias=f.alias)] if f.is_required()
                          else NotRequired[Annotated[str, limits, Field(f.default, alias=f.alias)]])
        elif name == "pin_position":  # upstream sends pins as numbers ("pin": 3)
            spec[name] = NotRequired[Annotated[Annotated[str, limits] | int | None, Field(f.default, alias=f.alias)]]
        else:  # missing: the model's default; null: None here, the model's default in fast_row
            spec[name] = NotRequired[Annotated[Annotated[str, limits] | None, Field(f.default, alias=f.alias)]]
    make_typed_dict: Any = TypedDict  # built from the model at import time: no literal for mypy
    wire: Any = make_typed_dict("_Wire", spec)
    wire.__pydantic_config__ = ConfigDict(strict=True, validate_by_name=True, validate_by_alias=True,
                                          extra="ignore", allow_inf_nan=False)
    return wire


_Wire = _wire_schema()
_validate_wire = TypeAdapter(_Wire).validate_json if _Wire is not None else None
# A list of values in one call: each item is parsed and checked as _Wire on its own (Json: no
# item can spill into the next); one that fails comes back unchanged (Any) instead of failing the
# list, so a bad record costs nothing but its own slow path.
_wires: Any = list[Annotated[Json[_Wire] | Any, Field(union_mode="left_to_right")]]  # type: ignore[valid-type]
_validate_wires = TypeAdapter(_wires).validate_python if _Wire is not None else None
_wire_fields: Any = itemgetter(*COLUMNS)
# Text fields that take the model's default when null: (name, default).
_DEFAULTS = tuple((c, _FIELDS[c].default) for c in NULL_TAKES_DEFAULT)
_PIN_MAX = getattr(_limits("pin_position"), "max_length", None) or 0
_BACKSLASH = ord("\\")


def fast_row(value: bytes) -> Row | None:
    """The row for a well-formed record, or None: "ask the model" (never a verdict on validity)."""
    if _validate_wire is None:
        return None
    try:
        d = _validate_wire(value)
    except ValidationError:
        return None
    return _finish(value, d)


def _finish(value: bytes, d: dict[str, Any]) -> Row | None:
    """The row from `value`, whose parse `d` passed ``_Wire``, converted as the model converts;
    None: "ask the model"."""
    # A NUL escape would reach a text field (a raw NUL byte is not JSON at all).  Looking for one
    # byte is a memchr (~20 ns); searching every record for the 6-byte escape took ~300 ns.
    if _BACKSLASH in value and b"\\u0000" in value:
        return None
    ts = d["timestamp"]
    kind = type(ts)
    try:
        if kind is datetime:
            d["timestamp"] = to_utc(ts)
        elif kind is str:
            if ts.isascii() and ts.isdigit():  # epoch digits (convert_timestamp would int() them too)
                d["timestamp"] = epoch_to_datetime(int(ts))
            else:
                ts = d["timestamp"] = convert_timestamp(ts)
                if type(ts) is str:
                    return None  # not a number: a date, or no time at all
        else:  # int or float (strict: never a bool)
            d["timestamp"] = epoch_to_datetime(ts)
        val = d["value"]
        if val is not None and type(val) is not float:
            d["value"] = convert_value(val)
    except (ValueError, OverflowError):
        return None
    pin = d["pin_position"]
    if type(pin) is int:
        pin = d["pin_position"] = str(pin)
        if len(pin) > _PIN_MAX:
            return None
    for name, default in _DEFAULTS:  # an explicit null text field takes the model's default
        if d[name] is None:
            d[name] = default
    return _wire_fields(d)  # type: ignore[no-any-return]


def decode(record: SourceRecord) -> Row | Rejection:
    """Validate one record: the fast path, else the model (pydantic's Rust JSON parser either way)."""
    try:
        value = record.value
        row = fast_row(value) if value else None
        return row if row is not None else _by_model(record)
    except Exception as e:
        return record_fault(record, "decode", e)


def _by_model(record: SourceRecord) -> Row | Rejection:
    """The model's verdict, for every record the fast path did not take (empty ones included)."""
    value = record.value
    if not value:
        return Rejection(record, "decode", "EmptyValue", "empty value or tombstone")
    try:
        return as_row(_validate_json(value))  # type: ignore[no-any-return]
    except ValidationError as e:
        return _explain(record, value, e)


def decode_many(records: Sequence[SourceRecord]) -> list[Row | Rejection]:
    """decode() of each record, in order, with the fast path's parsing done in one call for the
    whole list (~0.5 µs per record less than a call per record: docs/performance.md)."""
    if _validate_wires is None:
        return [decode(rec) for rec in records]
    try:
        parsed = _validate_wires([rec.value for rec in records])
    except Exception:  # one record broke the whole list's parse: each on its own, so only it fails
        return [decode(rec) for rec in records]
    out: list[Row | Rejection] = []
    append = out.append
    for rec, d in zip(records, parsed, strict=True):
        try:
            # A dict passed _Wire; anything else (empty, or not _Wire's) is the input itself, handed
            # back, and goes straight to the model: parsing it as _Wire again would fail again.
            row = _finish(rec.value, d) if type(d) is dict else None  # type: ignore[arg-type]  # bytes: it parsed
            append(row if row is not None else _by_model(rec))
        except Exception as e:
            append(record_fault(rec, "decode", e))
    return out


def _explain(record: SourceRecord, value: bytes, err: ValidationError) -> Rejection:
    """Slow path, rejects only: say precisely which decode step failed."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as e:
        return Rejection(record, "decode", "InvalidUtf8", f"value is not UTF-8: {e.reason} at byte {e.start}")
    try:
        obj = json.loads(text, parse_int=_json_int)
    except json.JSONDecodeError as e:
        return Rejection(record, "decode", "InvalidJson", f"value is not JSON: {e.msg} at {e.lineno}:{e.colno}")
    except RecursionError:
        return Rejection(record, "decode", "InvalidJson", "value is not JSON: nested too deeply")
    if not isinstance(obj, dict):
        return Rejection(record, "decode", "NotAnObject", f"value is JSON {type(obj).__name__}, not an object")
    return Rejection(record, "validate", "ValidationError", format_validation_error(err))


def _json_int(digits: str) -> int | float:
    # Python's int() refuses over 4,300 digits (ValueError, not a JSONDecodeError); only the
    # record's shape matters here, and pydantic has already said what is wrong with the number.
    return int(digits) if len(digits) <= 4300 else float(digits)


def format_validation_error(err: ValidationError) -> str:
    """One line per field: 'field: message'; the input value is left out (it is in the DLQ)."""
    parts = []
    for e in err.errors(include_url=False, include_input=False):
        loc = ".".join(str(x) for x in e["loc"]) or "record"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)
