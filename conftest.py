"""Fixtures over the real local Kafka broker and PostgreSQL (started by dev/services.py),
shared by tests/ and chaos_tests/ (which overrides `schema` with a more forceful teardown)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, settings

from dev import services, testkit

# Property tests assert outcomes, not speed: on a loaded 2-core machine Hypothesis's timing checks
# (a 200 ms deadline per example, "input generation is slow") fail runs that found nothing wrong.
settings.register_profile("sink", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("sink")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # pytest stops truncating assertion explanations when CI is set: a failing comparison of two
    # large results then spends minutes in difflib and megabytes of log, and a failing CI run
    # looks like a hung one.  Truncate under CI too (limits in pyproject.toml); -vv shows all.
    # A private name: tests/test_assertion_output.py fails if a pytest upgrade moves it.
    from _pytest.assertion import truncate

    truncate.running_on_ci = lambda: False


def pytest_report_header() -> str:
    where = "TimescaleDB (local build)" if services.TIMESCALEDB else "plain PostgreSQL"
    return f"database server: {where} on 127.0.0.1:{services.PG_PORT}"


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marks
def pytest_itemcollected(item: pytest.Item) -> None:
    """Every test that needs the real broker or database (the `infra` fixture, directly or
    through `topic`/`schema`) is marked `integration` here, once, so `-m "not integration"`
    runs exactly the tests that need neither."""
    if "infra" in getattr(item, "fixturenames", ()) and item.get_closest_marker("integration") is None:
        item.add_marker(pytest.mark.integration)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Against plain PostgreSQL every test runs but the TimescaleDB suite (`timescaledb`); against
    the TimescaleDB build (DEV_PG_FLAVOR=timescaledb, run by dev/test where one is built) only the
    TimescaleDB suite and the tests marked `both_servers`, less those asserting plain mode."""

    def runs_here(item: pytest.Item) -> bool:
        marks = {m.name for m in item.iter_markers()}
        if services.TIMESCALEDB:
            return "timescaledb" in marks or ("both_servers" in marks and "plain_postgres" not in marks)
        return "timescaledb" not in marks

    keep = [item for item in items if runs_here(item)]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if not runs_here(item)])
        items[:] = keep


@pytest.fixture(scope="session")
def infra() -> Iterator[None]:
    """Start (or reuse) the local broker and database; missing ones fail the run, never skip.
    The session works in a fresh database of its own, dropped at the end, pass or fail."""
    try:
        services.start_kafka()
        services.start_postgres()
        database = testkit.open_suite_database()
    except services.ServiceError as e:
        pytest.fail(f"local Kafka/PostgreSQL could not be started (CI={os.environ.get('CI')}): {e}")
    try:
        yield
    finally:
        services.start_postgres()  # a no-op when running; a chaos test may have left it down
        testkit.close_suite_database(database)


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


@pytest.fixture
def sinks(schema: str, topic: str, group: str, logdir: Path) -> Iterator[Any]:
    """Start the real sink as a process (env overrides as keyword arguments); killed at the end."""
    started: list[testkit.SinkProcess] = []

    def start(**env: Any) -> testkit.SinkProcess:
        s = testkit.SinkProcess(testkit.sink_env(schema, topic, group, **env),
                                logdir / f"sink-{len(started)}.log").start()
        started.append(s)
        return s

    yield start
    for s in started:
        if s.alive():
            s.kill()


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """A test that configures logging (a command's main() run in-process: bench.run sets ERROR)
    leaves it as it found it: later tests capture warnings and info lines."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
