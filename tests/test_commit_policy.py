"""When written batches are due for their Kafka commit."""

from __future__ import annotations

import math

import pytest

from sink.commit_policy import CommitPolicy, CommitPolicyState
from tests.fakes import ManualClock


def state(interval: float = 0.5) -> tuple[CommitPolicyState, ManualClock]:
    clock = ManualClock()
    return CommitPolicyState(CommitPolicy(interval), clock), clock


def test_nothing_written_is_never_due_and_never_bounds_a_poll() -> None:
    s, clock = state()
    clock.advance(10)
    assert not s.due()
    assert s.time_left() == math.inf


def test_a_sink_that_caught_up_commits_at_once() -> None:
    s, _ = state()
    s.consumed(caught_up=True)
    s.written()
    assert s.due()


def test_under_a_backlog_the_oldest_written_batch_waits_the_interval() -> None:
    s, clock = state(0.5)
    s.consumed(caught_up=False)
    s.written()
    clock.advance(0.3)
    s.written()  # a later batch does not restart the wait
    assert not s.due() and s.time_left() == pytest.approx(0.2)
    clock.advance(0.2)
    assert s.due() and s.time_left() == 0.0


def test_after_a_commit_the_wait_starts_with_the_next_written_batch() -> None:
    s, clock = state(0.5)
    s.consumed(caught_up=False)
    s.written()
    clock.advance(1.0)
    s.committed()
    assert not s.due()
    s.written()
    assert not s.due() and s.time_left() == pytest.approx(0.5)


def test_interval_zero_commits_every_batch_alone_and_negative_is_refused() -> None:
    s, _ = state(0.0)
    s.consumed(caught_up=False)
    s.written()
    assert s.due()
    with pytest.raises(ValueError, match=">= 0"):
        CommitPolicy(-1)
