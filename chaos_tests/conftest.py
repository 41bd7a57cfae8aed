"""Fixtures over the real local Kafka broker and PostgreSQL (started by dev/services.py), and
the chaos scenario fixture with its summary in pytest's terminal report."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chaos_tests import faults, harness
from dev import services, testkit


@pytest.fixture(scope="session")
def infra() -> Iterator[None]:
    """Start (or reuse) the local broker and database; missing ones fail the run, never skip."""
    try:
        services.start_kafka()
        services.start_postgres()
    except services.ServiceError as e:
        pytest.fail(f"local Kafka/PostgreSQL could not be started (CI={os.environ.get('CI')}): {e}")
    yield


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
def group() -> str:
    return testkit.unique_name("g")


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    return tmp_path / "logs"


@pytest.fixture
def chaos(request: pytest.FixtureRequest, infra: None, schema: str, group: str,
          logdir: Path) -> Iterator[Callable[..., harness.Scenario]]:
    """make(partitions=3) -> a Scenario on a fresh input topic (+ .dlq) with that many
    partitions; torn down after the test (sinks killed, broker and database running again)."""
    made: list[harness.Scenario] = []
    topics: list[str] = []

    def make(partitions: int = 3) -> harness.Scenario:
        name = testkit.unique_name("t")
        testkit.create_topic(name, partitions=partitions)
        testkit.create_topic(f"{name}.dlq", partitions=partitions)
        topics.extend([name, f"{name}.dlq"])
        sc = harness.Scenario(request.node.name.removeprefix("test_"), name, schema, group, logdir, partitions)
        made.append(sc)
        return sc

    yield make
    for sc in made:
        sc.close()
    faults.ensure_services()
    testkit.delete_topics(topics)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if harness.SUMMARIES:
        terminalreporter.section(f"chaos (CHAOS_SEED={harness.SEED} reproduces the fault plans)")
        for line in harness.SUMMARIES:
            terminalreporter.write_line(line)
