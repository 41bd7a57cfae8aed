"""Scenario 5: a rebalance storm.  Three sinks in one group on a 6-partition topic; instances
are added and SIGKILLed while data flows."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from chaos_tests.harness import Scenario
from dev import testkit

pytestmark = pytest.mark.chaos


def test_instances_joining_and_sigkilled_while_data_flows_lose_nothing(chaos: Callable[..., Scenario]) -> None:
    sc = chaos(partitions=6)
    alive: list[testkit.SinkProcess] = [sc.sink() for _ in range(3)]
    sc.producer.stream(lambda: sc.factory.mixed(invalid=0.04, replay=0.04), None, rate=400)
    sc.wait_progress(90)
    for _ in range(sc.profile.n(6)):
        time.sleep(sc.rng.uniform(1.0, 4.0))
        # Keep between 1 and 5 members; otherwise a coin flip between joining and dying.
        join = len(alive) <= 1 or (len(alive) < 5 and sc.rng.random() < 0.5)
        if join:
            with sc.fault("join", f"{len(alive) + 1} members"):
                alive.append(sc.sink())
        else:
            victim = sc.rng.choice(alive)
            with sc.fault("sigkill", f"pid {victim.pid}, {len(alive) - 1} members left"):
                victim.kill()
                alive.remove(victim)
    sc.wait_progress(90)
    sc.producer.stop_stream()
    sc.assert_invariants()
    crashed = [s for s in sc.sinks if s not in alive and s.proc is not None and s.proc.returncode != -9]
    assert not crashed, f"sink(s) exited on their own: {[(s.pid, s.proc and s.proc.returncode) for s in crashed]}"
    for s in alive:
        sc.wait_assigned(s)
        assert s.stop() == 0


def test_partitions_that_return_after_a_rebalance_during_a_database_stall_are_consumed(
        chaos: Callable[..., Scenario]) -> None:
    """Instance A pauses its partitions while its writes fail; B joins and takes half of them;
    the database recovers; B dies and A gets B's partitions back.  A must consume them.

    The writes fail on a SHARE lock held on the table for longer than the writer's lock_timeout:
    unlike a stopped database it lets B start (its migrations and connection need no more)."""
    sc = chaos(partitions=6)
    a = sc.sink()
    sc.producer.stream(lambda: sc.factory.mixed(invalid=0.03, replay=0.03), None, rate=300)
    sc.wait_table()
    sc.wait_progress(90)
    with sc.fault("table_share_lock", "while a second instance joins"), \
            testkit.connect(sc.schema, autocommit=False) as conn:
        conn.execute("LOCK TABLE iot_measurements IN SHARE MODE")
        testkit.wait_for(lambda: any(e["event"] == "consumer_paused" for e in a.events()), 60,
                         what="instance A pausing (its write hit the lock timeout)")
        b = sc.sink()
        testkit.wait_for(lambda: any(e["event"] == "partitions_assigned" for e in b.events()), 60,
                         what="instance B joining")
        time.sleep(sc.rng.uniform(0.5, 2.0))
        conn.rollback()
    sc.wait_progress(60)
    b_partitions = set(_assigned(b)[-1])
    assert b_partitions, "instance B was assigned no partition"
    with sc.fault("sigkill", f"instance B; its partitions {sorted(b_partitions)} go back to A"):
        b.kill()
        a_seen = len(a.events())  # A's log lines so far: what follows is after the kill
    sc.producer.stop_stream()
    sc.producer.wait()
    # Records that only A can consume: B may have committed everything it had before it died.
    for p in range(sc.partitions):
        sc.producer.send((sc.factory.valid() for _ in range(5)), partition=p)
    sc.extra["catch_up_s"] = sc.wait_caught_up(45)  # session timeout (6 s) + a few batches
    sc.assert_invariants()
    after = a.events()[a_seen:]
    assigned = _assigned(a, after)
    assert assigned and b_partitions <= set(assigned[-1]), f"A was not given B's partitions back: {assigned}"
    # A itself committed B's former partitions up to their end (the records sent after the kill).
    ends = testkit.end_offsets(sc.topic)
    committed_by_a = testkit.covered_offsets(e for e in after if e["event"] == "batch_committed")
    assert {p: committed_by_a.get(p) for p in b_partitions} == {p: ends[p] for p in b_partitions}
    assert a.stop() == 0


def _assigned(sink: testkit.SinkProcess, events: list[dict[str, Any]] | None = None) -> list[list[int]]:
    """The partitions of each partitions_assigned line (the whole assignment: eager rebalancing)."""
    return [e["partitions"] for e in (sink.events() if events is None else events)
            if e["event"] == "partitions_assigned"]
