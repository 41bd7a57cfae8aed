"""In-memory stand-ins shared by the unit tests: a clock moved by hand, a table, a DLQ outbox."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sink.errors import PoisonError, RetryableError
from sink.model import Row
from sink.types import InsertTurn, WriteResult

TP = tuple[str, int]


class ManualClock:
    """A monotonic clock the test moves by hand: time-based logic without sleeping."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class TableWriter:
    """An in-memory table with a primary key on the row's first five fields; ``poison`` rows
    fail like a CHECK constraint, ``fail_next`` writes fail as if the database were down."""

    def __init__(self, events: list[str] | None = None) -> None:
        self.rows: dict[tuple[Any, ...], Row] = {}
        self.events = events if events is not None else []
        self.fail_next = 0  # raise RetryableError this many times
        self.poison: Callable[[Row], bool] = lambda row: False
        self.insert_s = 0.0  # what each write says its INSERT took
        self.calls: list[int] = []  # rows per write call

    @property
    def writes(self) -> int:
        return len(self.calls)

    @property
    def connected(self) -> bool:
        return True

    def check(self) -> bool:
        return True

    def write(self, rows: Sequence[Row], turn: InsertTurn | None = None) -> WriteResult:
        self.calls.append(len(rows))
        if turn is not None:
            turn.wait(lambda: None)
        if self.fail_next:
            self.fail_next -= 1
            raise RetryableError("db_write", "connection refused")
        if any(self.poison(r) for r in rows):
            raise PoisonError("CheckViolation", "violates check constraint", "23514")
        dups = []
        for i, r in enumerate(rows):
            if r[:5] in self.rows:
                dups.append(i)
            else:
                self.rows[r[:5]] = r
        self.events.append(f"write:{len(rows)}")
        if turn is not None:
            turn.passed()
        return WriteResult(len(rows) - len(dups), len(dups), tuple(dups), insert_s=self.insert_s)


class ListOutbox:
    """The replay's DLQ/offset outbox as two lists; ``fail_next`` commits fail as retryable."""

    def __init__(self, events: list[str] | None = None) -> None:
        self.events = events if events is not None else []
        self.outputs: list[Any] = []
        self.offsets: dict[TP, int] = {}
        self.fail_next = 0

    def prepare(self) -> None:
        """Nothing to register."""

    def close(self) -> None:
        """Nothing to release."""

    def complete(self, outputs: Sequence[Any], offsets: dict[TP, int]) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise RetryableError("replay_commit", "transaction aborted")
        self.outputs.extend(outputs)
        self.offsets.update(offsets)
        self.events.append(f"commit:{len(outputs)}:{sorted(offsets.items())}")
