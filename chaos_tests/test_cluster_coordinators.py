"""Cluster scenarios: the node coordinating the sink's consumer group, and separately the node
coordinating its transactional id, SIGKILLed the moment the sink starts a Kafka transaction with
DLQ records in it (after `record_rejected`); restarted once the sink has committed without it.
The group coordinator's death can hang send_offsets_to_transaction() (librdkafka#5456): the
watchdog's exit 75 and restart are allowed there, and counted (sink_restarts)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from chaos_tests.cluster_faults import ClusterRun, Roles, wait_in_sync
from chaos_tests.faults import await_event
from chaos_tests.harness import Scenario

pytestmark = pytest.mark.chaos


def test_group_coordinator_sigkill_mid_transaction_loses_nothing(cluster_chaos: Callable[..., Scenario]) -> None:
    _kill_coordinator(cluster_chaos(), lambda r: r.group_coordinator, "group_coordinator_sigkill")


def test_transaction_coordinator_sigkill_mid_transaction_loses_nothing(
        cluster_chaos: Callable[..., Scenario]) -> None:
    _kill_coordinator(cluster_chaos(), lambda r: r.transaction_coordinator, "txn_coordinator_sigkill")


def _kill_coordinator(sc: Scenario, which: Callable[[Roles], int], kind: str) -> None:
    run = ClusterRun.begin(sc)
    for _ in range(sc.profile.n(1)):
        wait_in_sync()
        run.supervise(sc.wait_progress)
        roles = run.roles()
        # ClusterRun chose a transactional id coordinated elsewhere: one coordinator dies, not both.
        assert roles.group_coordinator != roles.transaction_coordinator, roles
        victim = which(roles)
        trigger = await_event(run.sink, ("record_rejected",), 30)
        assert trigger != "timeout", "the sink never logged a rejected record to kill the coordinator on"
        # Spread over the transaction (begin, produce, send offsets, commit: tens of ms).
        time.sleep(sc.rng.uniform(0.0, 0.04))
        with sc.fault(kind, f"{roles.of(victim)} (on {trigger})") as f:
            run.kill(victim, roles)
        run.committed_everywhere_since(f)  # with a new coordinator, the node still down
        run.bring_back(victim, f, sc.rng.uniform(12.0, 20.0))
    run.end()
    run.assert_no_sink_restart()
