"""Scenario 7: a slow database (a lock held on the table for several seconds, once longer
than the writer's lock_timeout): backpressure, bounded memory, no loss."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from chaos_tests.faults import RssSampler
from chaos_tests.harness import Scenario
from dev import testkit

pytestmark = pytest.mark.chaos

MiB = 1024
WRITER_LOCK_TIMEOUT = 10.0  # sink/writer.py SESSION_SETTINGS["lock_timeout"]


def test_table_locked_for_seconds_backpressures_with_bounded_memory_and_loses_nothing(
        chaos: Callable[..., Scenario]) -> None:
    sc = chaos()
    sink = sc.sink()
    rss = RssSampler(sink.pid)
    sc.producer.stream(lambda: sc.factory.mixed(invalid=0.02, replay=0.03), None, rate=500)
    sc.wait_table()
    # Short locks (the write waits) and one longer than lock_timeout (the write fails with
    # 55P03 and is retried).
    holds = [sc.rng.uniform(3.0, 7.0) for _ in range(sc.profile.n(2))] + [WRITER_LOCK_TIMEOUT + sc.rng.uniform(1, 3)]
    sc.rng.shuffle(holds)
    growth = []
    windows: list[tuple[float, datetime, datetime]] = []  # (hold, locked, unlocked), wall clock as the log's
    for hold in holds:
        sc.wait_progress(90)
        time.sleep(sc.rng.uniform(0.2, 1.5))
        with sc.fault("table_lock", f"ACCESS EXCLUSIVE for {hold:.1f}s"), \
                testkit.connect(sc.schema, autocommit=False) as conn:
            conn.execute("LOCK TABLE iot_measurements IN ACCESS EXCLUSIVE MODE")
            t_lock = time.monotonic()
            locked = datetime.now(UTC)
            before = sc.checker.committed.copy()
            time.sleep(hold)
            stuck = sc.checker.committed == before
            # Taken before the rollback: the server releases the lock before it answers, so
            # the sink's waiting INSERT (and its consumer_resumed line) can beat our next clock read.
            releasing = datetime.now(UTC)
            conn.rollback()
            t_unlock = time.monotonic()
            windows.append((hold, locked, releasing))
        assert rss.peak(t_lock, t_unlock) > 0, "no RSS sample while the table was locked"
        growth.append(rss.peak(t_lock, t_unlock) - rss.at(t_lock))
        sc.note(f"lock {hold:.1f}s: RSS {rss.at(t_lock) / MiB:.0f} -> peak {rss.peak(t_lock, t_unlock) / MiB:.0f} MiB, "
                f"commits {'held back' if stuck else 'advanced (DLQ-only batches?)'}")
    sc.wait_progress(90)
    sc.producer.stop_stream()
    rss.stop()
    sc.extra["rss_growth_mib"] = max(growth) // MiB
    sc.assert_invariants()
    events = sink.events()
    reasons = [str(e.get("reason")) for e in events if e["event"] == "retrying"]
    assert any("55P03" in r for r in reasons), f"no lock-timeout retry logged: {reasons[:3]}"
    # Backpressure: while its write was failing on the lock held past lock_timeout, the sink
    # paused consumption (instead of reading on into memory), and resumed once the write went in.
    [(_, locked, releasing)] = [w for w in windows if w[0] > WRITER_LOCK_TIMEOUT]
    paused = [_when(e) for e in events if e["event"] == "consumer_paused"]
    resumed = [_when(e) for e in events if e["event"] == "consumer_resumed"]
    assert any(locked <= t <= releasing for t in paused), (
        f"no consumer_paused while the table was locked ({locked} .. {releasing}): {paused}")
    assert not any(locked <= t <= releasing for t in resumed), (
        f"consumption resumed while the write still failed on the lock ({locked} .. {releasing}): {resumed}")
    assert any(t > releasing for t in resumed), f"never resumed after the lock was released at {releasing}: {resumed}"
    assert max(growth) < 64 * MiB, f"RSS grew by {max(growth) / MiB:.0f} MiB while the table was locked"
    assert sink.stop() == 0


def _when(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["timestamp"])
