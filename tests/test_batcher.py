"""Batcher: a batch is due at BATCH_SIZE records or BATCH_TIMEOUT after its first record (manual clock)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sink.batcher import Batch, Batcher
from sink.types import Rejection, SourceRecord
from tests.fakes import ManualClock


def rec(offset: int, partition: int = 0, topic: str = "in") -> SourceRecord:
    return SourceRecord(topic, partition, offset, None, b"{}")


def row(offset: int) -> tuple[int]:
    return (offset,)


def reject(r: SourceRecord) -> Rejection:
    return Rejection(r, "decode", "InvalidJson", "nope")


def batch_of(pairs: list[tuple[SourceRecord, Any]]) -> Batch:
    """A batch holding these (record, row or rejection) pairs, added one by one."""
    b = Batcher(size=100_000, timeout=1.0)
    for r, outcome in pairs:
        b.add(r, outcome)
    return b.batch


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def test_empty_batch_is_never_due_even_long_after_the_timeout(clock: ManualClock) -> None:
    b = Batcher(size=10, timeout=1.0, clock=clock)
    clock.advance(3600)
    assert not b.due()
    assert b.time_left() == 1.0


def test_batch_is_due_when_it_reaches_the_size(clock: ManualClock) -> None:
    b = Batcher(size=3, timeout=60.0, clock=clock)
    b.add(rec(0), row(0))
    b.add(rec(1), row(1))
    assert not b.due()
    b.add(rec(2), reject(rec(2)))  # rejections count towards the size too
    assert b.due()


def test_batch_is_due_after_timeout_without_sleeping(clock: ManualClock) -> None:
    b = Batcher(size=1000, timeout=5.0, clock=clock)
    b.add(rec(0), row(0))
    clock.advance(4.999)
    assert not b.due()
    assert b.time_left() == pytest.approx(0.001)
    clock.advance(0.001)
    assert b.due()


def test_timeout_runs_from_the_first_record_not_from_the_last(clock: ManualClock) -> None:
    b = Batcher(size=1000, timeout=5.0, clock=clock)
    b.add(rec(0), row(0))
    clock.advance(3)
    b.add(rec(1), row(1))
    clock.advance(2)
    assert b.due()


def test_idle_time_before_the_first_record_does_not_count(clock: ManualClock) -> None:
    b = Batcher(size=1000, timeout=5.0, clock=clock)
    clock.advance(100)
    b.add(rec(0), row(0))
    assert not b.due()
    assert b.time_left() == 5.0


def test_take_hands_over_the_batch_and_starts_a_fresh_one(clock: ManualClock) -> None:
    b = Batcher(size=2, timeout=5.0, clock=clock)
    b.add(rec(0), row(0))
    b.add(rec(1), row(1))
    first_id = b.batch.batch_id
    taken = b.take()
    assert taken.rows == [row(0), row(1)]
    assert len(b.batch) == 0
    assert b.batch.batch_id != first_id
    assert not b.due()
    clock.advance(10)
    assert b.time_left() == 5.0  # the new batch's timer starts with its first record


def test_room_counts_down_to_zero(clock: ManualClock) -> None:
    b = Batcher(size=2, timeout=5.0, clock=clock)
    assert b.room() == 2
    b.add(rec(0), row(0))
    assert b.room() == 1
    b.add(rec(1), reject(rec(1)))
    assert b.room() == 0
    b.add(rec(2), row(2))
    assert b.room() == 0


@pytest.mark.parametrize(("size", "timeout"), [(0, 1.0), (-1, 1.0), (1, 0.0), (1, -1.0)])
def test_invalid_size_or_timeout_is_refused(size: int, timeout: float) -> None:
    with pytest.raises(ValueError, match="batch size"):
        Batcher(size=size, timeout=timeout)


def test_rows_and_rejections_are_kept_apart_with_their_sources(clock: ManualClock) -> None:
    b = Batcher(size=10, timeout=1.0, clock=clock)
    b.add(rec(0), row(0))
    b.add(rec(1), reject(rec(1)))
    b.add(rec(2), row(2))
    batch = b.batch
    assert batch.rows == [row(0), row(2)]
    assert [s.offset for s in batch.row_sources] == [0, 2]
    assert [j.record.offset for j in batch.rejections] == [1]
    assert len(batch) == 3


def test_commit_offsets_are_last_offset_plus_one_per_partition_over_rows_and_rejections() -> None:
    batch = batch_of([(rec(10, 0), row(10)), (rec(11, 0), reject(rec(11, 0))), (rec(5, 1), row(5)),
                      (rec(3, 0, topic="other"), row(3))])
    assert batch.commit_offsets() == {("in", 0): 12, ("in", 1): 6, ("other", 0): 4}


def test_commit_offset_covers_a_rejection_at_the_end_of_the_batch() -> None:
    batch = batch_of([(rec(10), row(10)), (rec(11), reject(rec(11)))])
    assert batch.commit_offsets() == {("in", 0): 12}


def test_revoked_partition_records_are_dropped_and_not_committed(clock: ManualClock) -> None:
    b = Batcher(size=100, timeout=5.0, clock=clock)
    b.add(rec(0, 0), row(0))
    b.add(rec(50, 1), row(50))
    b.add(rec(51, 1), reject(rec(51, 1)))
    b.add(rec(1, 0), reject(rec(1, 0)))
    assert b.drop_partitions([("in", 1), ("in", 7)]) == 2
    batch = b.batch
    assert batch.rows == [row(0)]
    assert [s.partition for s in batch.row_sources] == [0]
    assert [j.record.offset for j in batch.rejections] == [1]
    assert batch.commit_offsets() == {("in", 0): 2}


def test_dropping_a_partition_the_batch_does_not_hold_changes_nothing(clock: ManualClock) -> None:
    b = Batcher(size=100, timeout=5.0, clock=clock)
    b.add(rec(0), row(0))
    assert b.drop_partitions([("in", 3), ("other", 0)]) == 0
    assert b.batch.rows == [row(0)]


def test_batch_emptied_by_revocation_is_not_due_and_its_timer_restarts(clock: ManualClock) -> None:
    b = Batcher(size=100, timeout=5.0, clock=clock)
    b.add(rec(0), row(0))
    clock.advance(4)
    b.drop_partitions([("in", 0)])
    clock.advance(10)
    assert not b.due()
    b.add(rec(9, 1), row(9))
    assert not b.due()  # the timer starts at this record, not at the dropped one
    clock.advance(5)
    assert b.due()


records = st.lists(
    st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 3), st.integers(0, 10_000), st.booleans()), max_size=50
)


@given(records)
def test_commit_offsets_equal_max_offset_plus_one_for_any_records(items: list[tuple[str, int, int, bool]]) -> None:
    batch = batch_of([(rec(o, p, t), reject(rec(o, p, t)) if bad else row(o)) for t, p, o, bad in items])
    expected: dict[tuple[str, int], int] = {}
    for topic, partition, offset, _ in items:
        expected[(topic, partition)] = max(expected.get((topic, partition), 0), offset + 1)
    assert batch.commit_offsets() == expected
    assert len(batch) == len(items)


@given(records, st.sets(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 3))))
def test_drop_partitions_keeps_exactly_the_other_partitions(
    items: list[tuple[str, int, int, bool]], revoked: set[tuple[str, int]]
) -> None:
    batch = batch_of([(rec(o, p, t), reject(rec(o, p, t)) if bad else row(o)) for t, p, o, bad in items])
    kept = [i for i in items if (i[0], i[1]) not in revoked]
    assert batch.drop_partitions(revoked) == len(items) - len(kept)
    assert len(batch) == len(kept)
    assert [row(i[2]) for i in kept if not i[3]] == batch.rows
    assert not set(batch.commit_offsets()) & revoked


# Whole-second gaps keep the comparison free of float rounding.
@given(st.integers(1, 20), st.lists(st.integers(0, 3), max_size=30))
def test_batch_is_due_exactly_when_full_or_timed_out(size: int, gaps: list[int]) -> None:
    clock = ManualClock(0.0)
    b = Batcher(size=size, timeout=5.0, clock=clock)
    first_at: float | None = None
    for i, gap in enumerate(gaps):
        clock.advance(gap)
        if b.due():
            b.take()
            first_at = None
        b.add(rec(i), row(i))
        first_at = clock.now if first_at is None else first_at
        assert b.due() == (len(b.batch) >= size or clock.now - first_at >= 5.0)


@given(st.lists(st.lists(st.tuples(st.integers(0, 2), st.booleans()), max_size=30), max_size=6))
def test_add_all_keeps_rows_rejections_and_each_partitions_offset_range(chunks: list[list[tuple[int, bool]]]) -> None:
    """Chunks as consume() returns them (each partition in offset order, partitions interleaved)."""
    b = Batcher(size=10_000, timeout=1.0)
    next_offset = {0: 5, 1: 0, 2: 100}
    rows, sources, rejections, ranges = [], [], [], {}
    for chunk in chunks:
        records, outcomes = [], []
        for partition, bad in chunk:
            r = rec(next_offset[partition], partition)
            next_offset[partition] += 1
            records.append(r)
            outcomes.append(reject(r) if bad else row(r.offset))
            if bad:
                rejections.append(outcomes[-1])
            else:
                rows.append(outcomes[-1])
                sources.append(r)
            lo_hi = ranges.setdefault(("in", partition), [r.offset, r.offset])
            lo_hi[1] = r.offset
        b.add_all(records, outcomes)
    got = b.batch
    assert (got.rows, got.row_sources, got.rejections, got.ranges) == (rows, sources, rejections, ranges)
    assert len(got) == sum(len(c) for c in chunks)
