"""Cluster scenario: the node leading the most input partitions SIGKILLed under a steady
stream, kept down past the broker session timeout (its leadership moves), then restarted."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from chaos_tests.cluster_faults import ClusterRun, wait_in_sync
from chaos_tests.harness import Scenario

pytestmark = pytest.mark.chaos


def test_leader_sigkill_moves_partitions_and_loses_nothing(cluster_chaos: Callable[..., Scenario]) -> None:
    sc = cluster_chaos()
    run = ClusterRun.begin(sc)
    for _ in range(sc.profile.n(1)):
        wait_in_sync()
        run.supervise(sc.wait_progress)
        roles = run.roles()
        victim = roles.busiest_leader()
        # Longer than broker.session.timeout.ms (9 s): the controller fences the node and its
        # partitions get new leaders among the two in-sync replicas left.
        down = sc.rng.uniform(12.0, 20.0)
        with sc.fault("sigkill", f"{roles.of(victim)}, down {down:.0f}s") as f:
            run.kill(victim, roles)
        run.committed_everywhere_since(f)  # on the new leaders, with the node still down
        run.bring_back(victim, f, down)
    run.end()
    run.assert_no_sink_restart()
