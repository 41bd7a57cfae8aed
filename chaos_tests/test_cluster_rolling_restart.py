"""Cluster scenario: a rolling restart of all three nodes under a steady stream, one at a time,
each a clean shutdown, with the cluster fully in sync before and after every step."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from chaos_tests.cluster_faults import ClusterRun, wait_in_sync
from chaos_tests.harness import Scenario
from dev import cluster

pytestmark = pytest.mark.chaos


def test_rolling_restart_of_every_node_loses_nothing_and_needs_no_sink_restart(
        cluster_chaos: Callable[..., Scenario]) -> None:
    sc = cluster_chaos()
    run = ClusterRun.begin(sc)
    for _ in range(sc.profile.n(1)):
        # As operators do: the active controller last, so the quorum elects a leader once.
        controller = cluster.active_controller()
        for node_id in [n for n in cluster.NODES if n != controller] + [controller]:
            wait_in_sync()
            with sc.fault("clean_restart", run.roles().of(node_id)):
                cluster.stop_node(node_id)
                cluster.start_node(node_id)
                sc.extra[f"in_sync_after_node{node_id}_s"] = wait_in_sync()
            run.supervise(sc.wait_progress)
    run.end()
    run.assert_no_sink_restart()
