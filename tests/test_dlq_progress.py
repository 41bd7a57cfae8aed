"""dlq.progress: log lines at an interval (manual clock), and a bar that renders on a terminal."""

from __future__ import annotations

import io

from rich.console import Console
from structlog.testing import capture_logs

from dlq.progress import BarProgress, LogProgress
from dlq.replay import Counts
from tests.fakes import ManualClock


def test_log_progress_emits_every_interval_and_once_at_the_end() -> None:
    clock = ManualClock()
    with capture_logs() as logs:
        p = LogProgress(total=100, interval=5.0, clock=clock)
        for passed in (10, 20, 30):
            clock.now += 2.0
            p.update(passed, Counts(replayed=passed, inserted=passed))
        p.close()
    lines = [e for e in logs if e["event"] == "dlq_replay_progress"]
    # t=2, 4: nothing; t=6: one line; close: the last one.
    assert [(e["done"], e["total"]) for e in lines] == [(30, 100), (30, 100)]
    assert lines[0]["rate"] == 5.0 and lines[0]["inserted"] == 30


def test_bar_progress_renders_done_total_and_rate_on_a_terminal() -> None:
    out = io.StringIO()
    bar = BarProgress(total=50, console=Console(file=out, force_terminal=True, width=140))
    bar.update(25, Counts(replayed=25, inserted=20, already_present=5))
    bar.close()
    text = out.getvalue()
    assert "25/50" in text and "rec/s" in text and "inserted 20" in text
