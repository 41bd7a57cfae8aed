"""Fixtures over the real local Kafka broker and PostgreSQL (started by dev/services.py),
shared by tests/ and chaos_tests/ (which overrides `schema` with a more forceful teardown)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

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
def topic(infra: None) -> Iterator[str]:
    """A fresh 3-partition input topic (and its DLQ topic) for one test."""
    services.start_kafka()  # a no-op when running; restarts a broker an earlier test left down
    name = testkit.unique_name("t")
    testkit.create_topic(name, partitions=3)
    testkit.create_topic(f"{name}.dlq", partitions=3)
    yield name
    testkit.delete_topics([name, f"{name}.dlq"])


@pytest.fixture
def schema(infra: None) -> Iterator[str]:
    """A fresh PostgreSQL schema; the sink creates iot_measurements in it via migrations."""
    services.start_postgres()  # a no-op when running
    name = testkit.unique_name("s")
    testkit.create_schema(name)
    yield name
    testkit.drop_schema(name)


@pytest.fixture
def group() -> str:
    return testkit.unique_name("g")


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    return tmp_path / "logs"
