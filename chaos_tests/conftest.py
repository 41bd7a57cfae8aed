"""The chaos scenario fixtures (with their summary in pytest's terminal report): `chaos` on the
single broker, `cluster_chaos` on the 3-node cluster; a `schema` whose teardown ends leftover
sessions.  The shared fixtures are in the root conftest.py."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chaos_tests import cluster_faults, faults, harness
from dev import cluster, services, testkit


@pytest.fixture
def schema(infra: None) -> Iterator[str]:
    """A fresh PostgreSQL schema; the sink creates iot_measurements in it via migrations."""
    name = testkit.unique_name("s")
    testkit.create_schema(name)
    yield name
    faults.ensure_services()
    # A session the test left behind (a half-open connection's backend, say) may still hold
    # locks in the schema: end the sink's sessions first, so DROP SCHEMA cannot hang.
    faults.terminate_sink_backends(busy_only=False)
    with testkit.connect() as conn:
        conn.execute("SET lock_timeout = '30s'")
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def chaos(request: pytest.FixtureRequest, infra: None, schema: str, group: str,
          logdir: Path) -> Iterator[Callable[..., harness.Scenario]]:
    """make(partitions=3) -> a Scenario on a fresh input topic (+ .dlq) with that many
    partitions; torn down after the test (sinks killed, broker and database running again)."""
    made: list[harness.Scenario] = []
    yield _maker(request, schema, group, logdir, made, replication_factor=1)
    for sc in made:
        sc.close()
    faults.ensure_services()
    testkit.delete_topics([t for sc in made for t in (sc.topic, sc.dlq.topic)])


def _maker(request: pytest.FixtureRequest, schema: str, group: str, logdir: Path, made: list[harness.Scenario],
           replication_factor: int) -> Callable[..., harness.Scenario]:
    def make(partitions: int = 3) -> harness.Scenario:
        name = testkit.unique_name("t")
        for topic in (name, f"{name}.dlq"):
            testkit.create_topic(topic, partitions=partitions, replication_factor=replication_factor)
        sc = harness.Scenario(request.node.name.removeprefix("test_"), name, schema, group, logdir, partitions)
        made.append(sc)
        return sc

    return make


@pytest.fixture(scope="session")
def kafka_cluster(infra: None) -> Iterator[str]:
    """The 3-node cluster (dev/cluster.py), started for the session's cluster scenarios and
    stopped after them if this session started it; a cluster that cannot start fails the test."""
    started = not cluster.running_nodes()
    try:
        t0 = time.monotonic()
        bootstrap = cluster.start()
        in_sync = cluster_faults.wait_in_sync()
        print(f"[chaos] cluster up in {time.monotonic() - t0:.1f}s (in sync after {in_sync:.1f}s), "
              f"RSS MiB {[k // 1024 for k in cluster.rss_kib().values()]}", file=sys.stderr, flush=True)
    except services.ServiceError as e:
        pytest.fail(f"the local 3-node Kafka cluster could not be started (CI={os.environ.get('CI')}): {e}")
    yield bootstrap
    if started:
        cluster.stop()


@pytest.fixture
def cluster_chaos(request: pytest.FixtureRequest, kafka_cluster: str, schema: str, group: str, logdir: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., harness.Scenario]]:
    """make(partitions=3) -> a Scenario on the 3-node cluster: its input topic and DLQ with
    replication factor 3 (min.insync.replicas=2), and every harness client (producer, checker,
    DLQ reader, testkit helpers, the sinks) bootstrapped at the cluster.  Torn down with every
    node running again and the cluster in sync for the next test."""
    monkeypatch.setattr(services, "KAFKA_BOOTSTRAP", kafka_cluster)
    cluster_faults.wait_in_sync()
    made: list[harness.Scenario] = []
    yield _maker(request, schema, group, logdir, made, replication_factor=len(cluster.NODES))
    for sc in made:
        sc.close()
    cluster.start()
    cluster_faults.wait_in_sync()
    testkit.delete_topics([t for sc in made for t in (sc.topic, sc.dlq.topic)])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if harness.SUMMARIES:
        terminalreporter.section(f"chaos (CHAOS_SEED={harness.SEED} reproduces the fault plans)")
        for line in harness.SUMMARIES:
            terminalreporter.write_line(line)
