"""When written batches' offsets are due for a Kafka commit (pure: the clock is injected).

Written batches wait, while the next batch is being written, up to the commit interval so that
several share one Kafka commit (transaction); a sink that has caught up with its topic gains
nothing by waiting and commits at once.  Rows are always in PostgreSQL before this counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sink.batcher import Clock


@dataclass(frozen=True)
class CommitPolicy:
    """The longest a written batch waits for others to share its commit; 0 = commit each alone."""

    interval: float

    def __post_init__(self) -> None:
        if self.interval < 0:
            raise ValueError("the commit interval is >= 0")


class CommitPolicyState:
    """The bookkeeping behind CommitPolicy: since when something waits, and whether the last
    consume caught up with the topic."""

    def __init__(self, policy: CommitPolicy, clock: Clock) -> None:
        self.policy = policy
        self._clock = clock
        self._since: float | None = None  # when the oldest uncommitted written batch was written
        self.caught_up = True  # the last consume returned less than it asked for

    def written(self) -> None:
        """A batch is written and waits for its commit."""
        if self._since is None:
            self._since = self._clock()

    def committed(self) -> None:
        """Every waiting batch was committed (or given up)."""
        self._since = None

    def consumed(self, caught_up: bool) -> None:
        self.caught_up = caught_up

    def due(self) -> bool:
        return self._since is not None and (self.caught_up or self.time_left() <= 0)

    def time_left(self) -> float:
        """Seconds until the oldest waiting batch is due (inf when none waits): a poll bound."""
        if self._since is None:
            return math.inf
        return max(0.0, self._since + self.policy.interval - self._clock())
