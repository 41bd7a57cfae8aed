"""The DLQ circuit breaker: if bad code or a bad deploy sends *everything* to the DLQ,
stopping beats rerouting the whole topic into it."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class DlqBreakerPolicy:
    """Trip when more than `ratio` of the last `window` records, or `consecutive` records in a
    row, went to the DLQ.  `window` must be reached before the ratio counts, so a single
    early reject does not stop a fresh sink."""

    enabled: bool = True
    ratio: float = 0.5
    window: int = 1000
    consecutive: int = 500

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ValueError("ratio must be in (0, 1]")
        if self.window < 1 or self.consecutive < 1:
            raise ValueError("window and consecutive must be >= 1")


class DlqBreaker:
    """Mutable bookkeeping for a DlqBreakerPolicy."""

    def __init__(self, policy: DlqBreakerPolicy) -> None:
        self.policy = policy
        self._recent: deque[bool] = deque(maxlen=policy.window)
        self._bad_in_window = 0
        self._streak = 0
        self.tripped_reason: str | None = None

    def feed(self, outcomes: list[bool]) -> str | None:
        """Feed a batch's outcomes in offset order (True = DLQ'd) before its DLQ records are
        published; returns why the breaker trips, or None.  Once tripped it stays tripped."""
        if not self.policy.enabled:
            return None
        bad = outcomes.count(True)
        p = self.policy
        if self.tripped_reason is not None or (self._streak + bad < p.consecutive
                                               and self._bad_in_window + bad <= p.ratio * p.window):
            # Nothing in this batch can trip the breaker (or it already is): the streak cannot
            # reach the limit and the share cannot pass it, so update both in bulk.
            if outcomes:
                self._recent.extend(outcomes)
                self._bad_in_window = sum(self._recent)
                if bad < len(outcomes):  # the streak is the rejects after the batch's last good record
                    self._streak = outcomes[::-1].index(False)
                else:  # all rejects: the streak goes on
                    self._streak += len(outcomes)
            return self.tripped_reason
        for is_bad in outcomes:
            if len(self._recent) == self._recent.maxlen and self._recent[0]:
                self._bad_in_window -= 1
            self._recent.append(is_bad)
            self._bad_in_window += is_bad
            self._streak = self._streak + 1 if is_bad else 0
            if self.tripped_reason is None:
                self.tripped_reason = self._reason()
        return self.tripped_reason

    def _reason(self) -> str | None:
        p = self.policy
        if self._streak >= p.consecutive:
            return f"{self._streak} consecutive records went to the DLQ (limit {p.consecutive})"
        if len(self._recent) == p.window and self._bad_in_window / p.window > p.ratio:
            return f"{self._bad_in_window} of the last {p.window} records went to the DLQ (limit {p.ratio:.0%})"
        return None

    @property
    def dlq_share(self) -> float:
        return self._bad_in_window / len(self._recent) if self._recent else 0.0
