"""Scenario 6: a flood of invalid records mixed into valid ones is DLQ'd exactly once; a
deploy-like burst of nothing but invalid records trips the DLQ breaker, which stops the sink
before it drains the topic into the DLQ."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from chaos_tests.harness import Scenario
from chaos_tests.records import WRITE_POISON_CONSTRAINT
from dev import testkit
from sink.cli import EXIT_FATAL

pytestmark = pytest.mark.chaos

# The DLQ breaker's defaults, which these sinks run with: DLQ_BREAKER_CONSECUTIVE, and the
# window of DLQ_BREAKER_WINDOW records of which more than DLQ_BREAKER_RATIO (50%) trips it.
BREAKER_CONSECUTIVE = 500
WINDOW = 1000


def test_poison_flood_lands_in_the_dlq_exactly_once_and_every_valid_row_lands(
        chaos: Callable[..., Scenario]) -> None:
    sc = chaos()
    sink = sc.sink()
    sc.wait_table()
    # Rows the model accepts and the database refuses: isolated by bisection (stage "write").
    with testkit.connect(sc.schema) as conn:
        conn.execute(f"ALTER TABLE iot_measurements ADD CONSTRAINT chaos_value_limit {WRITE_POISON_CONSTRAINT}")
    n = sc.profile.n(1500)
    sc.producer.send(sc.factory.mixed(invalid=0.02, replay=0.02) for _ in range(n))
    # The flood: about a third bad (decode, validate and write stage; replays repeat bad ones
    # too), well under the breaker's 50% of a 1000-record window ...
    sc.producer.send(sc.factory.mixed(invalid=0.28, write_poison=0.04, replay=0.05) for _ in range(2 * n))
    # ... a clean stretch as long as that window ...
    sc.producer.send(sc.factory.valid() for _ in range(WINDOW))
    # ... a burst of nothing but invalid records, under the consecutive limit ...
    sc.producer.send((sc.factory.invalid() for _ in range(BREAKER_CONSECUTIVE // 3)), partition=sc.rng.randrange(3))
    # ... and back to normal.
    sc.producer.send(sc.factory.mixed(invalid=0.02, replay=0.02) for _ in range(n))
    out = sc.assert_invariants()
    assert out.dlq > n // 2  # the flood did reach the DLQ
    assert sink.alive(), "the sink stopped on a flood the breaker should tolerate"
    stages = {e.get("stage") for e in sink.events() if e.get("event") == "record_rejected"}
    assert stages == {"decode", "validate", "write"}
    assert sink.stop() == 0


def test_deploy_like_burst_trips_the_dlq_breaker_and_the_sink_stops_without_draining(
        chaos: Callable[..., Scenario]) -> None:
    sc = chaos()
    sink = sc.sink()
    sc.producer.send(sc.factory.mixed(invalid=0.01) for _ in range(1000))
    sc.wait_caught_up(90)
    burst = sc.profile.n(3000)
    # An upstream deploy renamed a field: every record from now on fails validation.
    sc.producer.send(sc.factory.invalid("schema_drift") for _ in range(burst))
    sc.producer.send(sc.factory.valid() for _ in range(200))
    with sc.fault("breaker_trip", "upstream schema drift"):
        code = sink.wait(90)
    assert code == EXIT_FATAL, f"the sink exited with {code}, not {EXIT_FATAL}, on a burst of invalid records only"
    names = [e["event"] for e in sink.events()]
    assert "dlq_breaker_tripped" in names and "fatal_error" in names
    # A supervisor restarts it: it must trip again instead of carrying on (or failing otherwise).
    again = sc.sink()
    with sc.fault("breaker_trip", "after a restart"):
        code_again = again.wait(90)
    assert code_again == EXIT_FATAL, f"the restarted sink exited with {code_again}, not {EXIT_FATAL}"
    names_again = [e["event"] for e in again.events()]
    assert "dlq_breaker_tripped" in names_again and "fatal_error" in names_again, names_again[-5:]
    committed = testkit.committed_offsets(sc.group, sc.topic)
    ends = testkit.end_offsets(sc.topic)
    out = sc.finish(upto=committed)
    left = sum(ends.values()) - sum(committed.values())
    sc.note(f"breaker: exit codes {code}, {code_again}; DLQ'd {out.dlq} of the {burst} burst records; "
            f"{left} records left uncommitted")
    sc.extra["dlq_per_start"] = out.dlq / 2
    sc.assert_invariants(upto=committed)
    # Each start DLQs less than the consecutive limit before it stops.
    assert out.dlq < 2 * BREAKER_CONSECUTIVE, f"{out.dlq} records went to the DLQ in two starts"
    assert left > burst - 2 * BREAKER_CONSECUTIVE, "the topic was drained into the DLQ"
