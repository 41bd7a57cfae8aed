"""The IotMeasurement model: what a valid record is, and how input values are converted.

Rules (documented in the README, tested in tests/test_model.py):

* ``timestamp``: ISO 8601 with ``Z`` or an offset (a naive one is UTC), or Unix epoch time as
  a number or numeric string.  The epoch unit is picked by magnitude: ``|x| < 1e11`` seconds
  (up to year 5138), ``< 1e14`` milliseconds, ``< 1e17`` microseconds; anything larger is
  rejected.  Stored as UTC.  Years 1..9999 only (Python's range, inside PostgreSQL's).
* ``value``: numbers, numeric strings, booleans (1.0/0.0) and null.  An empty string is null.
  NaN and +/-Infinity are rejected (to the DLQ): they are sensor faults, and one NaN turns
  every ``avg()`` over it into NaN.
* Strings fit their VARCHAR column (length in characters, as PostgreSQL counts), contain no
  NUL character and are valid Unicode.  Numbers are accepted for string fields (``pin: 3``),
  finite ones only.
  An explicit null in a field with a default takes the default (``pin_position`` is part of
  the primary key, so it cannot be NULL).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from operator import attrgetter, itemgetter
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_to_datetime(x: float | int) -> datetime:
    """Epoch seconds/milliseconds/microseconds (by magnitude) -> aware UTC datetime.

    Integers are converted exactly (no float rounding of large millisecond/microsecond values).
    Each number type has its own branch: this runs once per record with an epoch timestamp.
    """
    if isinstance(x, int):
        ai = -x if x < 0 else x
        if ai < 100_000_000_000:
            micros = x * 1_000_000
        elif ai < 100_000_000_000_000:
            micros = x * 1_000
        elif ai < 100_000_000_000_000_000:
            micros = x
        else:
            raise ValueError("epoch timestamp too large (seconds, milliseconds or microseconds expected)")
    else:
        if math.isnan(x) or math.isinf(x):
            raise ValueError("timestamp must be a finite number")
        ax = abs(x)
        if ax >= 1e17:
            raise ValueError("epoch timestamp too large (seconds, milliseconds or microseconds expected)")
        micros = round(x * (1_000_000 if ax < 1e11 else 1_000 if ax < 1e14 else 1))
    try:
        return _EPOCH + timedelta(0, 0, micros)  # positional: cheaper than microseconds= on this hot path
    except OverflowError:
        raise ValueError("timestamp out of range") from None


def _number_from_string(s: str) -> float | int | None:
    t = s.strip()
    if not t:
        return None
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        return None


def convert_timestamp(v: Any) -> Any:
    """Epoch numbers and numeric strings -> datetime; anything else unchanged (for pydantic's parser).

    Shared with sink/decode.py's fast path, like convert_value and to_utc: one copy of each rule."""
    if isinstance(v, bool):
        raise ValueError("timestamp must be a date-time string or epoch number, not a boolean")
    if isinstance(v, int):
        return epoch_to_datetime(v)
    if isinstance(v, float | Decimal):
        try:
            return epoch_to_datetime(float(v))
        except OverflowError:
            raise ValueError("epoch timestamp too large") from None
    if isinstance(v, str):
        n = _number_from_string(v)
        if n is not None:
            return epoch_to_datetime(n)
    return v  # ISO strings and datetimes: pydantic's own (Rust) parser


def to_utc(v: datetime) -> datetime:
    try:
        return v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)
    except OverflowError:
        raise ValueError("timestamp out of range") from None


def convert_value(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, int | float | Decimal):
        try:
            f = float(v)
        except OverflowError:
            raise ValueError("value is out of range for double precision") from None
    elif isinstance(v, str):
        if not v.strip():
            return None
        try:
            f = float(v.strip())
        except ValueError:
            raise ValueError("value must be a number, a numeric string, a boolean or null") from None
    else:
        raise ValueError("value must be a number, a numeric string, a boolean or null")
    if math.isnan(f) or math.isinf(f):
        raise ValueError("value must be finite (NaN and Infinity are rejected)")
    return f


def _clean_text(v: str) -> str:
    if "\x00" in v:
        raise ValueError("must not contain NUL characters")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (lone surrogate)") from None
    return v


def _number_to_text(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):  # NaN, 1e400: a fault, not a device called "nan"
        raise ValueError("must be text or a finite number (NaN and Infinity are rejected)")
    if isinstance(v, int | float) and not isinstance(v, bool):
        return str(v)
    return v


Timestamp = Annotated[datetime, BeforeValidator(convert_timestamp), AfterValidator(to_utc)]
Value = Annotated[float | None, BeforeValidator(convert_value)]


def _text(max_length: int, min_length: int = 0) -> Any:
    return Annotated[
        str,
        StringConstraints(min_length=min_length, max_length=max_length),
        BeforeValidator(_number_to_text),
        AfterValidator(_clean_text),
    ]


NULL_TAKES_DEFAULT: tuple[str, ...] = ("connector_mode", "component_type", "pin_position", "unit", "topic")
"""Fields where an explicit null means the field's default (elsewhere null is an error or None)."""


class IotMeasurement(BaseModel):
    """One row of ``iot_measurements``; field order is the table's column order."""

    model_config = ConfigDict(
        frozen=True, validate_by_name=True, validate_by_alias=True, extra="ignore", allow_inf_nan=False
    )

    timestamp: Timestamp
    device_id: _text(50, min_length=1) = Field(..., alias="mac_address")  # type: ignore[valid-type]
    connector_mode: _text(50) = Field("unknown", alias="mode")  # type: ignore[valid-type]
    component_type: _text(50) = Field("unknown", alias="data_point_label")  # type: ignore[valid-type]
    pin_position: _text(10) = Field("-1", alias="pin")  # type: ignore[valid-type]
    value: Value = None
    unit: _text(20) = ""  # type: ignore[valid-type]
    topic: _text(255) = Field("", alias="original_topic")  # type: ignore[valid-type]

    @field_validator(*NULL_TAKES_DEFAULT, mode="wrap")
    @classmethod
    def _null_means_default(cls, v: Any, handler: Any, info: Any) -> Any:
        if v is None:
            return cls.model_fields[info.field_name].default
        return handler(v)


COLUMNS: tuple[str, ...] = tuple(IotMeasurement.model_fields)
"""Table columns, from the model: the insert statement follows the model's fields."""

PRIMARY_KEY: tuple[str, ...] = ("timestamp", "device_id", "connector_mode", "component_type", "pin_position")

Row = tuple[Any, ...]
as_row: Any = attrgetter(*COLUMNS)
"""IotMeasurement -> Row tuple in COLUMNS order (attrgetter: no per-field Python loop)."""
row_key: Any = itemgetter(*(COLUMNS.index(c) for c in PRIMARY_KEY))
"""Row -> its primary key tuple."""
