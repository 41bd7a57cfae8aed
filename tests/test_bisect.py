"""write_isolating_poison: bisection isolates exactly the rows the database rejects, writes every
good row exactly once, and its number of writes stays bounded (fake writer, no database)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sink.bisect import write_isolating_poison
from sink.errors import FatalError, PoisonError, RetryableError


class FakeTable:
    """A writer that rejects any segment holding a bad row (like a CHECK constraint: all or nothing)."""

    def __init__(self, bad: set[int], fail_on_call: dict[int, Exception] | None = None) -> None:
        self.bad = bad
        self.fail_on_call = fail_on_call or {}
        self.calls: list[list[int]] = []
        self.committed: list[int] = []

    def write(self, rows: Sequence[int]) -> list[int]:
        self.calls.append(list(rows))
        if len(self.calls) in self.fail_on_call:
            raise self.fail_on_call[len(self.calls)]
        poison = [r for r in rows if r in self.bad]
        if poison:
            raise PoisonError("CheckViolation", f"row {poison[0]} violates check", "23514")
        self.committed.extend(rows)
        return list(rows)


def write_bound(n: int, k: int, max_splits: int) -> int:
    """Upper bound on write() calls for n rows of which k are bad.

    Every split follows a failed write of a segment of >= 2 rows, and adds the 2 writes of its
    halves; the first write of the whole batch is 1.  Segments at one depth are disjoint, so at most
    k of them hold a bad row, and a segment of >= 2 rows sits at depth <= ceil(log2 n) - 1: so
    splits <= k * ceil(log2 n).  A binary split tree over n rows has at most n - 1 splits, and the
    budget caps them at max_splits.  Once the budget is spent, each failed segment is written row by
    row; those segments are disjoint, so that adds at most n writes.  Hence:

        writes <= 1 + 2 * min(max_splits, n - 1, k * ceil(log2 n))  (+ n if the budget was reached)
    """
    if n == 0:
        return 0
    splits = min(max_splits, n - 1, k * math.ceil(math.log2(n))) if n > 1 else 0
    return 1 + 2 * splits + (n if splits == max_splits else 0)


def test_clean_batch_is_written_in_one_statement() -> None:
    table = FakeTable(bad=set())
    out = write_isolating_poison(list(range(100)), table.write)
    assert out.writes == 1 == len(table.calls)
    assert out.poison == []
    assert out.written == [(0, 100, list(range(100)))]


def test_empty_batch_writes_nothing() -> None:
    table = FakeTable(bad=set())
    nothing: list[int] = []
    out = write_isolating_poison(nothing, table.write)
    assert (out.writes, out.written, out.poison, table.calls) == (0, [], [], [])


def test_single_poison_row_is_isolated_and_its_batch_mates_are_written() -> None:
    table = FakeTable(bad={37})
    out = write_isolating_poison(list(range(100)), table.write)
    assert [i for i, _ in out.poison] == [37]
    assert sorted(table.committed) == [i for i in range(100) if i != 37]


def test_poison_keeps_the_database_error() -> None:
    table = FakeTable(bad={1})
    out = write_isolating_poison([0, 1, 2], table.write)
    [(index, err)] = out.poison
    assert index == 1
    assert (err.error_class, err.sqlstate, err.message) == ("CheckViolation", "23514", "row 1 violates check")


def test_single_row_batch_that_fails_is_poison_without_a_split() -> None:
    table = FakeTable(bad={0})
    out = write_isolating_poison([0], table.write)
    assert out.writes == 1
    assert [i for i, _ in out.poison] == [0]


def test_retryable_error_propagates_without_splitting() -> None:
    table = FakeTable(bad=set(), fail_on_call={1: RetryableError("db_write", "[08006] connection lost")})
    with pytest.raises(RetryableError):
        write_isolating_poison(list(range(10)), table.write)
    assert len(table.calls) == 1


def test_retryable_error_during_bisection_propagates() -> None:
    table = FakeTable(bad={3}, fail_on_call={3: RetryableError("db_write", "[57P01] admin shutdown")})
    with pytest.raises(RetryableError):
        write_isolating_poison(list(range(10)), table.write)
    assert len(table.calls) == 3


def test_fatal_error_propagates_unchanged() -> None:
    fatal = FatalError("database error [42P01] UndefinedTable")
    table = FakeTable(bad=set(), fail_on_call={1: fatal})
    with pytest.raises(FatalError) as info:
        write_isolating_poison([1, 2], table.write)
    assert info.value is fatal


def test_all_bad_batch_costs_at_most_n_plus_the_split_budget() -> None:
    n, max_splits = 1000, 64
    table = FakeTable(bad=set(range(n)))
    out = write_isolating_poison(list(range(n)), table.write, max_splits=max_splits)
    assert len(out.poison) == n
    assert out.writes <= 1 + 2 * max_splits + n


def test_zero_split_budget_goes_row_by_row_after_the_first_failure() -> None:
    table = FakeTable(bad={2})
    out = write_isolating_poison(list(range(5)), table.write, max_splits=0)
    assert table.calls == [[0, 1, 2, 3, 4], [0], [1], [2], [3], [4]]
    assert [i for i, _ in out.poison] == [2]


def test_earlier_rows_are_written_first() -> None:
    table = FakeTable(bad={0, 5})
    write_isolating_poison(list(range(8)), table.write)
    assert table.committed == [1, 2, 3, 4, 6, 7]


@given(
    st.integers(min_value=0, max_value=300).flatmap(
        lambda n: st.tuples(st.just(n), st.sets(st.integers(0, max(n - 1, 0)), max_size=n) if n else st.just(set()))
    ),
    st.integers(min_value=0, max_value=80),
)
def test_bisection_isolates_exactly_the_poison_and_writes_every_good_row_once(
    case: tuple[int, set[int]], max_splits: int
) -> None:
    n, bad = case
    table = FakeTable(bad=bad)
    out = write_isolating_poison(list(range(n)), table.write, max_splits=max_splits)

    assert [i for i, _ in out.poison] == sorted(bad)
    good = [i for i in range(n) if i not in bad]
    assert table.committed == good  # each good row once, in offset order
    # The reported segments are exactly what was committed, and their results belong to them.
    assert [i for start, length, res in out.written for i in res] == good
    assert all(res == list(range(start, start + length)) for start, length, res in out.written)
    assert out.writes == len(table.calls) <= write_bound(n, len(bad), max_splits)


@given(st.integers(2, 2000), st.integers(1, 8), st.data())
def test_few_poison_rows_cost_logarithmically_many_writes(n: int, k: int, data: st.DataObject) -> None:
    bad = data.draw(st.sets(st.integers(0, n - 1), min_size=min(k, n), max_size=min(k, n)))
    table = FakeTable(bad=bad)
    out = write_isolating_poison(list(range(n)), table.write, max_splits=10**9)
    assert out.writes <= 1 + 2 * len(bad) * math.ceil(math.log2(n))
