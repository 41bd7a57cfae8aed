"""Cluster scenario: the sink reaches the cluster through a TCP proxy per node; one node (the
group coordinator, and in soak mode each node in turn) is cut off from clients for 30 s: its
connections reset, new ones refused, while it stays in the cluster leading its partitions."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from chaos_tests.cluster_faults import ClusterRun, proxies, wait_in_sync
from chaos_tests.harness import Scenario
from dev import cluster

pytestmark = pytest.mark.chaos

CUT_OFF_S = 30.0


def test_node_cut_off_from_clients_for_30s_loses_nothing(cluster_chaos: Callable[..., Scenario]) -> None:
    sc = cluster_chaos()
    with proxies() as proxy:
        run = ClusterRun.begin(sc, kafka_bootstrap_servers=cluster.proxied_bootstrap())
        for i in range(sc.profile.n(1)):
            wait_in_sync()
            run.supervise(sc.wait_progress)
            roles = run.roles()
            victim = roles.group_coordinator if i == 0 else cluster.NODES[i % len(cluster.NODES)]
            with sc.fault("cut_off", f"{roles.of(victim)} for {CUT_OFF_S:.0f}s") as f:
                f.detail += f", {proxy[victim].cut_off(CUT_OFF_S)} connections reset"
            run.supervise(sc.wait_progress)
        run.end()
    # Not asserted: whether the sink needed its watchdog here (sink_restarts in the summary).
