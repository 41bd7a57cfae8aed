"""Cluster scenario: the active controller SIGKILLed under a steady stream (in this cluster
every node is a broker too); the quorum elects another, the node is restarted later."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from chaos_tests.cluster_faults import ClusterRun, wait_in_sync, wait_new_controller
from chaos_tests.harness import Scenario

pytestmark = pytest.mark.chaos


def test_active_controller_sigkill_loses_nothing(cluster_chaos: Callable[..., Scenario]) -> None:
    sc = cluster_chaos()
    run = ClusterRun.begin(sc)
    for i in range(sc.profile.n(1)):
        wait_in_sync()
        run.supervise(sc.wait_progress)
        roles = run.roles()
        victim = roles.controller
        with sc.fault("controller_sigkill", roles.of(victim)) as f:
            run.kill(victim, roles)
        successor = wait_new_controller(victim)
        sc.extra[f"election_{i}_s"] = time.monotonic() - f.started
        sc.note(f"node {successor} is the active controller")
        run.committed_everywhere_since(f)
        run.bring_back(victim, f, sc.rng.uniform(12.0, 20.0))
    run.end()
    run.assert_no_sink_restart()
