"""The retry policy and its one tenacity builder: the loop, the start-up and the DLQ replay retry
RetryableError with the same exponential backoff and jitter, each with its own sleep and stop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, stop_never
from tenacity.wait import wait_exponential_jitter

from sink.errors import RetryableError
from sink.settings import Settings


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry; ``attempts == 0`` retries for ever.  The defaults are
    the DLQ replay's bounded policy; the sink's come from the RETRY_* settings."""

    attempts: int = 8
    initial_backoff: float = 0.5
    max_backoff: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 0 or self.initial_backoff <= 0 or self.max_backoff < self.initial_backoff:
            raise ValueError("attempts >= 0 and 0 < initial_backoff <= max_backoff")

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        """RETRY_MAX_ATTEMPTS, RETRY_INITIAL_BACKOFF, RETRY_MAX_BACKOFF."""
        return cls(settings.retry_max_attempts, settings.retry_initial_backoff, settings.retry_max_backoff)


def retrying(policy: RetryPolicy, *, sleep: Callable[[float], None],
             before_sleep: Callable[[RetryCallState], None],
             give_up: Callable[[], bool] = lambda: False) -> Retrying:
    """Retry RetryableError under ``policy``; ``give_up()`` ends the retries early (a shutdown).

    reraise: once the attempts are used up the caller sees the last RetryableError itself."""
    attempts = stop_never if policy.attempts == 0 else stop_after_attempt(policy.attempts)

    def stop(state: RetryCallState) -> bool:
        return bool(attempts(state)) or give_up()

    return Retrying(
        retry=retry_if_exception_type(RetryableError),
        wait=wait_exponential_jitter(multiplier=policy.initial_backoff, max=policy.max_backoff,
                                     jitter=policy.initial_backoff),
        stop=stop,
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
