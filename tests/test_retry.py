"""The one retry builder: backoff within bounds, the attempts limit, and an early give-up."""

from __future__ import annotations

import pytest

from sink.errors import FatalError, RetryableError
from sink.retry import RetryPolicy, retrying
from sink.settings import Settings


def flaky(failures: int) -> tuple[list[int], object]:
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= failures:
            raise RetryableError("db_write", "down")
        return "ok"

    return calls, fn


def test_retryable_errors_are_retried_with_growing_bounded_sleeps_until_success() -> None:
    sleeps: list[float] = []
    calls, fn = flaky(6)

    result = retrying(RetryPolicy(0, 0.5, 2.0), sleep=sleeps.append, before_sleep=lambda s: None)(fn)

    assert result == "ok" and len(calls) == 7
    assert len(sleeps) == 6 and all(0.5 <= s <= 2.5 for s in sleeps)  # jitter adds up to the initial backoff
    assert sleeps[-1] >= 2.0  # reached the cap


def test_the_last_retryable_error_surfaces_once_the_attempts_are_used_up() -> None:
    calls, fn = flaky(10)

    with pytest.raises(RetryableError):
        retrying(RetryPolicy(3, 0.1, 0.1), sleep=lambda s: None, before_sleep=lambda s: None)(fn)
    assert len(calls) == 3


def test_give_up_ends_retrying_for_ever_and_other_errors_are_not_retried() -> None:
    calls, fn = flaky(100)
    with pytest.raises(RetryableError):
        retrying(RetryPolicy(0, 0.1, 0.1), sleep=lambda s: None, before_sleep=lambda s: None,
                 give_up=lambda: len(calls) >= 5)(fn)
    assert len(calls) == 5

    def fatal() -> None:
        calls.append(1)
        raise FatalError("no")

    calls.clear()
    with pytest.raises(FatalError):
        retrying(RetryPolicy(0, 0.1, 0.1), sleep=lambda s: None, before_sleep=lambda s: None)(fatal)
    assert len(calls) == 1


def test_the_policy_comes_from_the_retry_settings_and_refuses_nonsense() -> None:
    s = Settings(retry_max_attempts=4, retry_initial_backoff=0.2, retry_max_backoff=3.0)
    assert RetryPolicy.from_settings(s) == RetryPolicy(4, 0.2, 3.0)
    with pytest.raises(ValueError, match="initial_backoff"):
        RetryPolicy(1, 2.0, 1.0)
