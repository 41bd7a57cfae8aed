"""Value types that flow through the pipeline: source records, rejections, write results."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

Headers = tuple[tuple[str, bytes | None], ...]


class UnreadableHeaders(tuple[tuple[str, bytes | None], ...]):
    """A record's headers that the Kafka client could not read: a header name that is not UTF-8
    (Kafka's are bytes on the wire) makes confluent-kafka fail on all of them.  Empty, so the
    sink reads the record without them; a DLQ record says so (with `reason`) in their place."""

    reason: str

    def __new__(cls, reason: str) -> UnreadableHeaders:
        self = super().__new__(cls, ())
        self.reason = reason
        return self


class SourceRecord(NamedTuple):
    """One Kafka record as consumed, detached from librdkafka's Message.

    A NamedTuple, not a frozen dataclass: one is built per consumed record, and a frozen
    dataclass costs several times as much to construct (immutable all the same)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers = ()
    timestamp_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Rejection:
    """A record that will not be written: why, and at which stage (decode, validate, write)."""

    record: SourceRecord
    stage: str
    error_class: str
    message: str
    sqlstate: str | None = None


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Outcome of one committed write: which input rows were new, which updated a row
    (WRITE_MODE=update), and which changed nothing (duplicates)."""

    inserted: int
    duplicates: int
    duplicate_indexes: tuple[int, ...] = field(default=())
    # Seconds in the INSERT statement (the database's work and its result): the rest of a write
    # is the client's (COPY into the stage, waiting for the previous batch, commit).
    insert_s: float = 0.0
    updated: int = 0
    updated_indexes: tuple[int, ...] = field(default=())


class InsertTurn(Protocol):
    """A batch's place in the order of INSERTs when batches are written side by side: the writer
    waits for its turn between its COPY and its INSERT, and says when its INSERT went through."""

    def wait(self, keepalive: Callable[[], None]) -> None: ...

    def passed(self) -> None: ...
