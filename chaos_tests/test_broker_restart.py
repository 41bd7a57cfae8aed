"""Scenario 4: the Kafka broker SIGKILLed mid-stream and restarted on the same data directory."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from chaos_tests.faults import await_event, kill_broker
from chaos_tests.harness import Scenario
from dev import services

pytestmark = pytest.mark.chaos

# When the broker dies: right after the sink logged a rejected record, i.e. as it starts the
# Kafka transaction that publishes the batch's DLQ records and commits its offsets; or at random.
KILL_MODES = ("before_commit", "random")


def test_broker_sigkill_and_restart_mid_stream_loses_nothing(chaos: Callable[..., Scenario]) -> None:
    sc = chaos()
    sink = sc.sink()
    sc.producer.stream(lambda: sc.factory.mixed(invalid=0.05, replay=0.03), None, rate=300)
    # Every kill mode at least once (CI: once each), in turn.
    for i in range(sc.profile.n(len(KILL_MODES))):
        mode = KILL_MODES[i % len(KILL_MODES)]
        # The hang of the fault before can come late (a call made after the broker is back).
        sink = sc.supervise(sink, sc.wait_progress, deadline=time.monotonic() + 150)
        if mode == "before_commit":
            trigger = await_event(sink, ("record_rejected",), 20)
            assert trigger != "timeout", "the sink never logged the event to kill the broker on (before_commit)"
        else:
            time.sleep(sc.rng.uniform(0.2, 3.0))
            trigger = "random"
        down = sc.rng.uniform(0.0, 3.0)
        with sc.fault("broker_sigkill", f"{mode} (on {trigger}), down {down:.1f}s + restart"):
            kill_broker()
            time.sleep(down)
            services.start_kafka()
        # A consumer rejoins in seconds.  An abandoned transaction of the sink's may hold its
        # committed offsets unstable until transaction.timeout.ms (10 s) expires.  If a
        # librdkafka call ignores its timeout (librdkafka#5456; the re-bootstrap that made every
        # restart do so, #5511, is off in sink/outbox.py), the sink's watchdog exits with 75
        # after its deadline; like compose's `restart: unless-stopped`, we start it again.
        sink = sc.supervise(sink, sc.wait_progress, deadline=time.monotonic() + 150)
    sc.producer.stop_stream()
    # The hang can also come late (a call made after the broker is back): supervise the drain too.
    sink = sc.supervise(sink, sc.wait_caught_up, deadline=time.monotonic() + 240)
    sc.assert_invariants()
    assert sink.alive(), "the sink exited when the broker went away instead of retrying"
    assert sink.stop() == 0

