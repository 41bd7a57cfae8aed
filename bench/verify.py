"""Did the sink do the right thing?  Rows, DLQ and committed offsets against the dataset's oracle."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from bench.data import Dataset, pk_of
from dev import testkit


@dataclass(frozen=True)
class Verdict:
    rows_expected: int
    rows_found: int
    rows_missing: int  # expected primary keys absent from the table
    rows_unexpected: int  # rows whose key or content no valid record produced
    dlq_expected: int
    dlq_found: int
    offsets_committed: dict[int, int]
    offsets_end: dict[int, int]

    @property
    def ok(self) -> bool:
        return (self.rows_missing == 0 and self.rows_unexpected == 0 and self.rows_found == self.rows_expected
                and self.dlq_found == self.dlq_expected and self.offsets_committed == self.offsets_end)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def verify(data: Dataset, *, schema: str, topic: str, group: str, dlq_topic: str,
           ends: Mapping[int, int]) -> Verdict:
    """Every valid distinct row present and nothing else, every invalid record in the DLQ exactly
    once (read_committed), and the group's offsets at the end of every partition."""
    found = testkit.rows(schema)
    keys = set()
    unexpected = 0
    for row in found:
        key = pk_of(row)
        keys.add(key)
        if row not in data.expected.get(key, frozenset()):
            unexpected += 1
    missing = sum(1 for k in data.expected if k not in keys)
    dlq = testkit.read_all(dlq_topic, timeout=60)
    return Verdict(rows_expected=len(data.expected), rows_found=len(found), rows_missing=missing,
                   rows_unexpected=unexpected, dlq_expected=data.invalid, dlq_found=len(dlq),
                   offsets_committed=testkit.committed_offsets(group, topic),
                   offsets_end={p: o for p, o in ends.items() if o > 0})
