"""The chaos scenario fixture (with its summary in pytest's terminal report) and a `schema`
whose teardown ends leftover sessions; the shared fixtures are in the root conftest.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chaos_tests import faults, harness
from dev import testkit


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
