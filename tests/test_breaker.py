"""DLQ breaker: trips on N consecutive DLQ records or on more than a share of a full window, and stays tripped."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sink.breaker import DlqBreaker, DlqBreakerPolicy

BAD, GOOD = True, False


def breaker(**policy: object) -> DlqBreaker:
    return DlqBreaker(DlqBreakerPolicy(**policy))  # type: ignore[arg-type]


def test_default_policy_is_enabled() -> None:
    assert DlqBreakerPolicy().enabled


def test_consecutive_limit_trips_at_exactly_n_records() -> None:
    b = breaker(consecutive=5, window=1000)
    assert b.feed([BAD] * 4) is None
    reason = b.feed([BAD])
    assert reason is not None
    assert "5 consecutive" in reason


def test_a_good_record_resets_the_streak() -> None:
    b = breaker(consecutive=3, window=1000)
    assert b.feed([BAD, BAD, GOOD, BAD, BAD, GOOD, BAD, BAD]) is None


def test_streak_spans_batches() -> None:
    b = breaker(consecutive=4, window=1000)
    assert b.feed([GOOD, BAD, BAD]) is None
    assert b.feed([BAD, BAD]) is not None


def test_streak_spans_batches_that_are_all_rejects() -> None:
    b = breaker(consecutive=4, window=1000)
    assert b.feed([GOOD, BAD]) is None
    assert b.feed([BAD]) is None
    assert b.feed([BAD]) is None
    assert b.feed([BAD]) is not None


def test_ratio_does_not_count_before_the_window_is_full() -> None:
    b = breaker(ratio=0.1, window=100, consecutive=1000)
    assert b.feed([BAD] * 99) is None


def test_ratio_trips_when_a_full_window_holds_more_than_the_share() -> None:
    b = breaker(ratio=0.5, window=10, consecutive=1000)
    assert b.feed([GOOD, BAD] * 4 + [GOOD]) is None  # 4 of 9: window not full yet
    reason = b.feed([BAD, BAD])  # last 10: 6 bad of 10
    assert reason is not None
    assert "6 of the last 10" in reason


def test_exactly_the_ratio_does_not_trip() -> None:
    b = breaker(ratio=0.5, window=10, consecutive=1000)
    assert b.feed([GOOD, BAD] * 5) is None
    assert b.dlq_share == 0.5


def test_old_rejects_slide_out_of_the_window() -> None:
    b = breaker(ratio=0.5, window=10, consecutive=1000)
    assert b.feed([BAD] * 5 + [GOOD] * 5) is None
    assert b.feed([BAD] * 5) is None  # last 10: five goods then five bads = 50%
    assert b.dlq_share == 0.5
    assert b.feed([BAD]) is not None  # 6 of the last 10


def test_trip_mid_batch_is_reported_even_if_the_batch_ends_well() -> None:
    b = breaker(consecutive=3, window=1000)
    assert b.feed([BAD, BAD, BAD, GOOD, GOOD]) is not None


def test_once_tripped_it_stays_tripped_with_the_first_reason() -> None:
    b = breaker(consecutive=2, window=1000)
    first = b.feed([BAD, BAD])
    assert first is not None
    assert b.feed([GOOD] * 100) == first
    assert b.tripped_reason == first


def test_disabled_breaker_never_trips() -> None:
    b = breaker(enabled=False, consecutive=1, window=1, ratio=0.01)
    assert b.feed([BAD] * 10_000) is None
    assert b.tripped_reason is None


@pytest.mark.parametrize(
    "policy",
    [{"ratio": 0.0}, {"ratio": -0.1}, {"ratio": 1.01}, {"window": 0}, {"consecutive": 0}],
)
def test_invalid_policy_is_refused(policy: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        DlqBreakerPolicy(**policy)  # type: ignore[arg-type]


def test_ratio_of_one_is_allowed_and_never_trips_on_ratio() -> None:
    b = breaker(ratio=1.0, window=5, consecutive=1000)
    assert b.feed([BAD] * 50) is None


def test_policy_is_frozen() -> None:
    policy = DlqBreakerPolicy()
    with pytest.raises(AttributeError):
        policy.ratio = 0.9  # type: ignore[misc]


def test_dlq_share_is_zero_before_any_record() -> None:
    assert breaker().dlq_share == 0.0


def reference_trip_index(outcomes: list[bool], ratio: float, window: int, consecutive: int) -> int | None:
    """The first record index at which the policy trips, computed the slow, obvious way."""
    recent: deque[bool] = deque(maxlen=window)
    streak = 0
    for i, is_bad in enumerate(outcomes):
        recent.append(is_bad)
        streak = streak + 1 if is_bad else 0
        if streak >= consecutive or (len(recent) == window and sum(recent) / window > ratio):
            return i
    return None


@given(
    st.lists(st.lists(st.booleans(), max_size=30), max_size=10),
    st.sampled_from([0.1, 0.25, 0.5, 0.75, 1.0]),
    st.integers(1, 20),
    st.integers(1, 25),
)
def test_breaker_matches_a_reference_model_for_any_batches(
    batches: list[list[bool]], ratio: float, window: int, consecutive: int
) -> None:
    b = breaker(ratio=ratio, window=window, consecutive=consecutive)
    flat = [x for batch in batches for x in batch]
    trip_at = reference_trip_index(flat, ratio, window, consecutive)
    seen = 0
    for batch in batches:
        seen += len(batch)
        tripped = b.feed(batch) is not None
        assert tripped == (trip_at is not None and trip_at < seen)
    tail = flat[-window:]
    assert b.dlq_share == pytest.approx(sum(tail) / len(tail) if tail else 0.0)
