"""Scenario 1: the sink SIGKILLed at random moments and restarted, several times in one run."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from chaos_tests.faults import kill_on_event
from chaos_tests.harness import Scenario
from dev import testkit

pytestmark = pytest.mark.chaos

# Where the kill lands, aimed at by tailing the sink's log (each event is logged right before
# the step named here):
#   after_db_commit  batch_written: the database transaction committed, offsets not yet;
#   mid_dlq          record_rejected: the batch's DLQ records are about to be produced in the
#                    Kafka transaction that also commits the offsets;
#   mid_batch        shortly after batch_committed: the next batch is being consumed/written;
#   random           a random moment.
KILL_MODES = ("after_db_commit", "mid_dlq", "mid_batch", "random")


def kill_aimed(sc: Scenario, sink: testkit.SinkProcess, mode: str) -> str:
    """SIGKILL the sink at the moment `mode` names (KILL_MODES); what set it off."""
    if mode == "after_db_commit":
        return kill_on_event(sink, ("batch_written",), 20)
    if mode == "mid_dlq":
        # Spread over the transaction (begin, produce, send offsets, commit: tens of ms).
        return kill_on_event(sink, ("record_rejected",), 20, delay=sc.rng.uniform(0.0, 0.04))
    if mode == "mid_batch":
        return kill_on_event(sink, ("batch_committed",), 20, delay=sc.rng.uniform(0.0, 0.3))
    time.sleep(sc.rng.uniform(0.1, 2.0))
    sink.kill()
    return "random"


def test_sigkill_at_random_moments_loses_nothing_and_duplicates_nothing(chaos: Callable[..., Scenario]) -> None:
    sc = chaos()
    modes = [KILL_MODES[i % len(KILL_MODES)] for i in range(sc.profile.n(4))]
    sc.rng.shuffle(modes)
    sink = sc.sink()
    sc.producer.stream(lambda: sc.factory.mixed(invalid=0.05, replay=0.03), None, rate=300)
    for mode in modes:
        sc.wait_progress(90)  # the (re)started sink is working
        time.sleep(sc.rng.uniform(0.0, 1.0))
        with sc.fault("sigkill", mode) as f:
            trigger = kill_aimed(sc, sink, mode)
            f.detail = f"{mode} (on {trigger})"
            assert trigger != "timeout", f"the sink never logged the event to kill it on ({mode})"
            time.sleep(sc.rng.uniform(0.0, 1.5))  # down for a moment, as under a supervisor
            sink = sc.sink()
    sc.wait_progress(90)
    sc.producer.stop_stream()
    sc.assert_invariants()
    sc.wait_assigned(sink)  # SIGTERM before the handler is installed would just kill it
    assert sink.stop() == 0


def test_update_mode_killed_and_restarted_ends_with_every_key_s_last_record(chaos: Callable[..., Scenario]) -> None:
    # WRITE_MODE=update with corrections: a key's records (routed by key, one partition) end as
    # its last record's row, whatever the kills re-deliver; the same invariants otherwise.
    sc = chaos()
    sc.latest_wins = True
    sc.producer.by_key = True
    sink = sc.sink(write_mode="update")
    sc.producer.stream(lambda: sc.factory.mixed(invalid=0.05, replay=0.03, correction=0.15), None, rate=300)
    for mode in [KILL_MODES[i % len(KILL_MODES)] for i in range(sc.profile.n(2))]:
        sc.wait_progress(90)
        time.sleep(sc.rng.uniform(0.0, 1.0))
        with sc.fault("sigkill", mode) as f:
            trigger = kill_aimed(sc, sink, mode)
            f.detail = f"{mode} (on {trigger})"
            assert trigger != "timeout", f"the sink never logged the event to kill it on ({mode})"
            time.sleep(sc.rng.uniform(0.0, 1.5))
            sink = sc.sink(write_mode="update")
    sc.wait_progress(90)
    sc.producer.stop_stream()
    out = sc.assert_invariants()
    corrections = sum(1 for r in sc.ledger.all() if r.planned.kind == "correction")
    updated = sum(e.get("updated", 0) for e in sc.events("batch_written"))
    assert corrections > 0 and updated > 0, (corrections, updated)
    sc.note(f"corrections={corrections} updated={updated} rows={out.rows}")
    sc.wait_assigned(sink)
    assert sink.stop() == 0
