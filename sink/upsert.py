"""WRITE_MODE=update: which record of a key a batch writes, and the version that guards it.

Pure: the write stage and the DLQ replay call it before their writer; no I/O here.

Order is the contract.  Within one partition, Kafka's order decides: the record at the higher
offset wins.  Between partitions Kafka promises no order; the rule, deterministic across
redeliveries, is that each partition's last record of the key competes and the one with the
newer Kafka timestamp wins (equal timestamps: the higher partition number).  Corrections for
one device belong in one partition (keyed by device) for Kafka's own order to hold.

With the version guard (WRITE_VERSION=kafka_timestamp) every written row carries its record's
Kafka timestamp in ``source_version``, and an update only goes through when the incoming
version is not older than the stored one: a DLQ replay or a lagging replica re-applying an
older record leaves a newer correction alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sink.model import COLUMNS, PRIMARY_KEY, Row, row_key
from sink.settings import Settings
from sink.types import SourceRecord

VERSION_COLUMN = "source_version"


@dataclass(frozen=True)
class WriteMode:
    """ignore: INSERT ... ON CONFLICT DO NOTHING (the first record of a key stays).
    update: ON CONFLICT DO UPDATE of the other columns, only where something differs;
    versioned: the update is guarded by the record's Kafka timestamp (source_version)."""

    update: bool = False
    versioned: bool = False

    @classmethod
    def of(cls, mode: Literal["ignore", "update"], version: Literal["kafka_timestamp", "none"]) -> WriteMode:
        update = mode == "update"
        return cls(update=update, versioned=update and version == "kafka_timestamp")

    @classmethod
    def from_settings(cls, s: Settings) -> WriteMode:
        return cls.of(s.write_mode, s.write_version)


IGNORE = WriteMode()


def updated_columns(mode: WriteMode) -> tuple[str, ...]:
    """The columns an update writes, which the runtime role needs UPDATE on (none in ignore mode)."""
    if not mode.update:
        return ()
    others = tuple(c for c in COLUMNS if c not in PRIMARY_KEY)
    return (*others, VERSION_COLUMN) if mode.versioned else others


def latest_per_key(rows: Sequence[Row], sources: Sequence[SourceRecord]) -> list[int]:
    """The indexes (ascending) of the rows that win for their key (module docstring's rule):
    DO UPDATE cannot touch a row twice in one statement, so a batch sends one row per key."""
    keys = list(map(row_key, rows))
    if len(set(keys)) == len(keys):  # the usual batch: every key once
        return list(range(len(rows)))
    last: dict[object, dict[int, int]] = {}  # key -> partition -> index of its highest offset
    for i, key in enumerate(keys):
        per_partition = last.setdefault(key, {})
        j = per_partition.get(sources[i].partition)
        if j is None or sources[i].offset > sources[j].offset:
            per_partition[sources[i].partition] = i
    return sorted(max(candidates.values(), key=lambda i: (sources[i].timestamp_ms or 0, sources[i].partition))
                  for candidates in last.values())


def versioned(rows: Sequence[Row], versions: Sequence[int | None]) -> list[Row]:
    """Each row with its version appended (the writer's last column, source_version)."""
    return [(*row, version) for row, version in zip(rows, versions, strict=True)]
