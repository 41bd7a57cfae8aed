"""Did the sink do the right thing?  Rows, DLQ and committed offsets against the dataset's oracle."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from bench.data import PARTITIONS, Dataset
from dev import testkit
from sink.envelope import H_OFFSET, H_PARTITION, H_TOPIC
from sink.model import row_key


@dataclass(frozen=True)
class Verdict:
    rows_expected: int
    rows_found: int
    rows_missing: int  # expected primary keys absent from the table
    rows_unexpected: int  # rows whose key or content no valid record produced
    dlq_expected: int
    dlq_found: int
    dlq_missing: int  # invalid records (topic, partition, offset) with no DLQ record
    dlq_repeated: int  # DLQ records beyond the first for the same invalid record
    dlq_unexpected: int  # DLQ records whose origin headers name no invalid record
    offsets_committed: dict[int, int]
    offsets_end: dict[int, int]

    @property
    def ok(self) -> bool:
        return (self.rows_missing == 0 and self.rows_unexpected == 0 and self.rows_found == self.rows_expected
                and self.dlq_found == self.dlq_expected and self.dlq_missing == self.dlq_repeated
                == self.dlq_unexpected == 0 and self.offsets_committed == self.offsets_end)

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
        key = row_key(row)
        keys.add(key)
        if row not in data.expected.get(key, frozenset()):
            unexpected += 1
    missing = sum(1 for k in data.expected if k not in keys)
    dlq = testkit.read_all(dlq_topic, timeout=60)
    expected_origins: Counter[tuple[str, int, int] | None] = Counter((topic, p, o) for p, o in invalid_positions(data))
    origins = Counter(_origin(r.headers) for r in dlq)
    return Verdict(rows_expected=len(data.expected), rows_found=len(found), rows_missing=missing,
                   rows_unexpected=unexpected, dlq_expected=data.invalid, dlq_found=len(dlq),
                   dlq_missing=(expected_origins - origins).total(),
                   dlq_repeated=sum(n - 1 for o, n in origins.items() if o in expected_origins),
                   dlq_unexpected=sum(n for o, n in origins.items() if o not in expected_origins),
                   offsets_committed=testkit.committed_offsets(group, topic),
                   offsets_end={p: o for p, o in ends.items() if o > 0})


def invalid_positions(data: Dataset) -> list[tuple[int, int]]:
    """(partition, offset) of each invalid value in the pre-loaded topic: bench.data.preload sends
    value i to partition i % PARTITIONS of a fresh topic, in order, from one idempotent producer,
    so it lands at offset i // PARTITIONS.  Invalid as the oracle (make_dataset) decided."""
    return [(i % PARTITIONS, i // PARTITIONS) for i in data.invalid_indexes]


def _origin(headers: Mapping[str, bytes]) -> tuple[str, int, int] | None:
    """(topic, partition, offset) a DLQ record's headers point back to; None if unreadable."""
    try:
        return headers[H_TOPIC].decode(), int(headers[H_PARTITION]), int(headers[H_OFFSET])
    except (KeyError, TypeError, ValueError):  # UnicodeDecodeError is a ValueError
        return None
