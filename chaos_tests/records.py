"""What the chaos producer sends, and what the sink must make of each record (pure, seeded).

Valid measurements come in the encodings the model accepts (epoch s/ms/µs, ISO with Z or an
offset, numeric strings, booleans, null); invalid ones cover every DLQ kind.  The expected row
of a valid record is computed with `sink.decode` itself, so the test and the sink agree on
conversion and the test checks delivery, not parsing.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

from sink.decode import decode
from sink.model import PRIMARY_KEY, Row
from sink.types import Rejection, SourceRecord

Expect = Literal["row", "dlq"]

# The CHECK constraint scenarios add to the table so that some records pass validation and are
# rejected by the database (stage "write", isolated by bisection).
WRITE_POISON_CONSTRAINT = "CHECK (value IS NULL OR value < 1e12)"
_WRITE_POISON_VALUE = 5e12
_PK_LEN = len(PRIMARY_KEY)


@dataclass(frozen=True, slots=True)
class Planned:
    """One record to produce and the outcome the sink owes it."""

    seq: int  # replays share the sequence number of the record they repeat
    key: bytes
    value: bytes | None
    expect: Expect
    stage: str | None  # expected DLQ stage (decode / validate / write) when expect == "dlq"
    row: Row | None  # the row sink.decode makes of it (write poison has one too)
    kind: str  # "valid", "replay", "correction", "write_poison" or the invalid kind

    @property
    def pk(self) -> tuple[Any, ...] | None:
        return None if self.row is None else self.row[:_PK_LEN]


def _iso(ms: int, offset_minutes: int) -> str:
    dt = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    if offset_minutes == 0:
        return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return dt.astimezone(timezone(timedelta(minutes=offset_minutes))).isoformat(timespec="milliseconds")


class RecordFactory:
    """Makes Planned records from a seeded Random; not thread-safe (one producer owns it)."""

    def __init__(self, rng: random.Random, run_id: str) -> None:
        self._rng = rng
        self._run = run_id[:12]
        self._seq = 0
        # Distinct instants per sequence number, in a recent-ish range that varies per seed.
        self._base_ms = 1_700_000_000_000 + rng.randrange(0, 10**10)
        self._sent: list[Planned] = []
        self._pks: dict[tuple[Any, ...], Row] = {}

    # ------------------------------------------------------------------ valid

    def _measurement(self, seq: int) -> dict[str, Any]:
        rng = self._rng
        ms = self._base_ms + seq
        ts_kind = rng.randrange(6)
        ts: Any
        if ts_kind == 0:
            ts = ms  # epoch milliseconds
        elif ts_kind == 1:
            ts = ms / 1000  # epoch seconds with a fraction
        elif ts_kind == 2:
            ts = str(ms)  # numeric string
        elif ts_kind == 3:
            ts = _iso(ms, 0)
        elif ts_kind == 4:
            ts = _iso(ms, rng.choice([-300, 60, 330]))
        else:
            ts = ms * 1000  # epoch microseconds
        value: Any = rng.choice([
            round(rng.uniform(-1000, 1000), 3),
            rng.randrange(-50, 50),
            str(round(rng.uniform(0, 100), 2)),
            rng.random() < 0.5,
            None,
            "",
        ])
        rec: dict[str, Any] = {
            "timestamp": ts,
            "mac_address": f"{self._run}-d{seq % 13}",
            "mode": rng.choice(["analog", "digital", None]),
            "data_point_label": rng.choice(["temperature", "humidity", "voltage"]),
            "pin": rng.choice([seq % 4, str(seq % 8), None]),
            "value": value,
            "unit": rng.choice(["C", "%", "V", None]),
            "original_topic": f"chaos/{seq}",
        }
        if rng.random() < 0.2:
            rec["extra_field"] = "ignored"
        return rec

    def _planned(self, seq: int, key: bytes, value: bytes | None, kind: str, expect: Expect,
                 stage: str | None = None) -> Planned:
        outcome = decode(SourceRecord("chaos", 0, 0, key, value))
        if isinstance(outcome, Rejection):
            if expect == "row" or kind == "write_poison":
                raise AssertionError(f"harness bug: {kind} record {value!r} rejected: {outcome.message}")
            return Planned(seq, key, value, "dlq", stage or outcome.stage, None, kind)
        if expect == "dlq" and kind != "write_poison":
            raise AssertionError(f"harness bug: {kind} record {value!r} passed validation")
        pk = outcome[:_PK_LEN]
        # Rows of one key are all the same, but for corrections (WRITE_MODE=update scenarios).
        earlier = self._pks.setdefault(pk, outcome) if expect == "row" and kind != "correction" else None
        if earlier is not None and earlier != outcome:
            raise AssertionError(f"harness bug: two different rows share primary key {pk}")
        return Planned(seq, key, value, expect, stage, outcome, kind)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def valid(self) -> Planned:
        seq = self._next_seq()
        value = json.dumps(self._measurement(seq)).encode()
        p = self._planned(seq, f"k{seq}".encode(), value, "valid", "row")
        self._sent.append(p)
        return p

    def write_poison(self) -> Planned:
        """Valid for the model, rejected by WRITE_POISON_CONSTRAINT (stage write)."""
        seq = self._next_seq()
        rec = self._measurement(seq)
        rec["value"] = _WRITE_POISON_VALUE
        p = self._planned(seq, f"k{seq}".encode(), json.dumps(rec).encode(), "write_poison", "dlq", "write")
        self._sent.append(p)
        return p

    # ------------------------------------------------------------------ invalid

    INVALID_KINDS = ("tombstone", "empty", "not_utf8", "not_json", "not_object", "missing_device",
                     "bad_timestamp", "nan_value", "too_long", "nul_char", "infinite_ts", "schema_drift")

    def invalid(self, kind: str | None = None) -> Planned:
        seq = self._next_seq()
        kind = kind or self._rng.choice(self.INVALID_KINDS)
        base = self._measurement(seq)
        value: bytes | None
        if kind == "tombstone":
            value = None
        elif kind == "empty":
            value = b""
        elif kind == "not_utf8":
            value = b"\xff\xfe" + json.dumps(base).encode()
        elif kind == "not_json":
            value = json.dumps(base).encode()[:-3]
        elif kind == "not_object":
            value = json.dumps([base]).encode()
        elif kind == "missing_device":
            del base["mac_address"]
            value = json.dumps(base).encode()
        elif kind == "bad_timestamp":
            base["timestamp"] = "yesterday"
            value = json.dumps(base).encode()
        elif kind == "nan_value":
            base["value"] = "NaN"
            value = json.dumps(base).encode()
        elif kind == "too_long":
            base["mac_address"] = "x" * 51
            value = json.dumps(base).encode()
        elif kind == "nul_char":
            base["mac_address"] = "a\u0000b"
            value = json.dumps(base).encode()
        elif kind == "infinite_ts":
            base["timestamp"] = "__ts__"
            value = json.dumps(base).replace('"__ts__"', "1e400").encode()  # a JSON number, infinite as float
        elif kind == "schema_drift":
            # What a bad deploy upstream looks like: a renamed key, everything else fine.
            base["device"] = base.pop("mac_address")
            value = json.dumps(base).encode()
        else:
            raise ValueError(f"unknown invalid kind {kind}")
        p = self._planned(seq, f"k{seq}".encode(), value, kind, "dlq")
        self._sent.append(p)
        return p

    # ------------------------------------------------------------------ replays and mixes

    def replay(self) -> Planned:
        """An exact repeat (key and value) of an earlier record: same outcome, a new offset."""
        if not self._sent:
            return self.valid()
        orig = self._rng.choice(self._sent)
        return Planned(orig.seq, orig.key, orig.value, orig.expect, orig.stage, orig.row,
                       "replay" if orig.expect == "row" else orig.kind)

    def correction(self) -> Planned:
        """An earlier row's record with another value: same key (same partition when routed by
        key), a new row that WRITE_MODE=update must end with if nothing later corrects it."""
        rows = [p for p in self._sent if p.expect == "row" and p.value is not None]
        if not rows:
            return self.valid()
        orig = self._rng.choice(rows)
        assert orig.value is not None
        rec = json.loads(orig.value)
        rec["value"] = round(self._rng.uniform(-1000, 1000), 3)
        p = self._planned(orig.seq, orig.key, json.dumps(rec).encode(), "correction", "row")
        self._sent.append(p)
        return p

    def mixed(self, invalid: float = 0.0, replay: float = 0.0, write_poison: float = 0.0,
              correction: float = 0.0) -> Planned:
        x = self._rng.random()
        if x < invalid:
            return self.invalid()
        if x < invalid + replay:
            return self.replay()
        if x < invalid + replay + write_poison:
            return self.write_poison()
        if x < invalid + replay + write_poison + correction:
            return self.correction()
        return self.valid()
