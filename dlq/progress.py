"""Replay progress: a rich progress bar on a terminal, `dlq_replay_progress` log lines otherwise."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

from dlq.replay import Counts
from sink.logs import get_logger

log = get_logger("dlq.progress")


class ProgressReporter(Protocol):
    def update(self, passed: int, counts: Counts) -> None: ...

    def close(self) -> None: ...


class _RateColumn(ProgressColumn):
    """Records per second (rich's own speed column is for bytes)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- rec/s" if speed is None else f"{speed:,.0f} rec/s", style="progress.data.speed")


class BarProgress:
    """For people: done/total (DLQ offsets passed), rate, elapsed, and the running counts."""

    def __init__(self, total: int, console: Console | None = None) -> None:
        self._progress = Progress(
            TextColumn("replay"), BarColumn(), MofNCompleteColumn(), _RateColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[counts]}"),
            console=console or Console(stderr=True), transient=False,
        )
        self._task = self._progress.add_task("replay", total=total, counts="")
        self._progress.start()

    def update(self, passed: int, counts: Counts) -> None:
        text = (f"inserted {counts.inserted}  updated {counts.updated}  present {counts.already_present}  "
                f"failed {counts.failed_again}  skipped {counts.skipped}")
        self._progress.update(self._task, completed=passed, counts=text)

    def close(self) -> None:
        self._progress.stop()


class LogProgress:
    """For logs: one line every `interval` seconds, and one at the end (the clock is injected)."""

    def __init__(self, total: int, interval: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._total = total
        self._interval = interval
        self._clock = clock
        self._start = clock()
        self._last = self._start
        self._passed = 0
        self._counts: dict[str, Any] = {}

    def update(self, passed: int, counts: Counts) -> None:
        self._passed, self._counts = passed, counts.as_dict()
        if self._clock() - self._last >= self._interval:
            self._emit()

    def _emit(self) -> None:
        now = self._clock()
        self._last = now
        elapsed = now - self._start
        rate = self._passed / elapsed if elapsed > 0 else 0.0
        log.info("dlq_replay_progress", done=self._passed, total=self._total, rate=round(rate, 1), **self._counts)

    def close(self) -> None:
        self._emit()


def reporter(total: int, tty: bool, interval: float = 5.0) -> ProgressReporter:
    return BarProgress(total) if tty else LogProgress(total, interval)
