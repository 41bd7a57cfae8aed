"""Bytes -> IotMeasurement, or a Rejection saying why (pure: no Kafka, no database)."""

from __future__ import annotations

import json
from collections.abc import Iterable

from pydantic import ValidationError

from sink.model import IotMeasurement, Row, as_row
from sink.types import Rejection, SourceRecord

_validate_json = IotMeasurement.__pydantic_validator__.validate_json


def decode(record: SourceRecord) -> Row | Rejection:
    """Validate one record; the fast path is pydantic's own JSON parser (Rust)."""
    value = record.value
    if not value:
        return Rejection(record, "decode", "EmptyValue", "empty value or tombstone")
    try:
        return as_row(_validate_json(value))  # type: ignore[no-any-return]
    except ValidationError as e:
        return _explain(record, value, e)


def decode_all(records: Iterable[SourceRecord]) -> tuple[list[tuple[SourceRecord, Row]], list[Rejection]]:
    """Split records into (record, row) pairs and rejections, keeping input order."""
    good: list[tuple[SourceRecord, Row]] = []
    bad: list[Rejection] = []
    for rec in records:
        out = decode(rec)
        if isinstance(out, Rejection):
            bad.append(out)
        else:
            good.append((rec, out))
    return good, bad


def _explain(record: SourceRecord, value: bytes, err: ValidationError) -> Rejection:
    """Slow path, rejects only: say precisely which decode step failed."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as e:
        return Rejection(record, "decode", "InvalidUtf8", f"value is not UTF-8: {e.reason} at byte {e.start}")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return Rejection(record, "decode", "InvalidJson", f"value is not JSON: {e.msg} at {e.lineno}:{e.colno}")
    except RecursionError:
        return Rejection(record, "decode", "InvalidJson", "value is not JSON: nested too deeply")
    if not isinstance(obj, dict):
        return Rejection(record, "decode", "NotAnObject", f"value is JSON {type(obj).__name__}, not an object")
    return Rejection(record, "validate", "ValidationError", format_validation_error(err))


def format_validation_error(err: ValidationError) -> str:
    """One line per field: 'field: message'; the input value is left out (it is in the DLQ)."""
    parts = []
    for e in err.errors(include_url=False, include_input=False):
        loc = ".".join(str(x) for x in e["loc"]) or "record"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)
