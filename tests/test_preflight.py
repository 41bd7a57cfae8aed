"""`kafka-timescale-sink check` against the real broker and database, each problem made for real:
a ready setup passes, and a missing topic, a missing privilege, pending or changed migrations and
unreachable servers are each named with what to do, exit 1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dev import services, testkit

pytestmark = [pytest.mark.integration, pytest.mark.both_servers]


def check(schema: str, topic: str, group: str, *args: str, **env: Any) -> tuple[int, Any]:
    res = subprocess.run([sys.executable, "-m", "sink", "check", "--json", *args], capture_output=True, text=True,
                         env=testkit.sink_env(schema, topic, group, **env), cwd=testkit.ROOT, timeout=120)
    return res.returncode, json.loads(res.stdout) if res.stdout.strip() else res.stderr


def by_check(report: Any) -> dict[str, dict[str, str]]:
    return {c["check"]: c for c in report["checks"]}


def migrate(schema: str, topic: str, group: str, **env: Any) -> None:
    res = subprocess.run([sys.executable, "-m", "sink", "migrate"], capture_output=True, text=True,
                         env=testkit.sink_env(schema, topic, group, **env), cwd=testkit.ROOT, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_ready_setup_passes_every_check(schema: str, topic: str, group: str) -> None:
    migrate(schema, topic, group)
    code, report = check(schema, topic, group)
    assert code == 0 and report["would_start"], report
    checks = by_check(report)
    assert set(checks) == {"broker", "input_topic", "dlq_topic", "group", "transactions", "server", "timescaledb",
                           "migrations", "privileges"}
    assert checks["input_topic"]["detail"].endswith("3 partition(s)")
    assert checks["migrations"]["status"] == checks["privileges"]["status"] == "ok"
    expected_ts = "ok" if services.TIMESCALEDB else "note"
    assert checks["timescaledb"]["status"] == expected_ts


def test_the_table_for_people_names_the_problem_and_the_fix(schema: str, topic: str, group: str) -> None:
    res = subprocess.run([sys.executable, "-m", "sink", "check"], capture_output=True, text=True, timeout=120,
                         env=testkit.sink_env(schema, "no_such_topic_x", group), cwd=testkit.ROOT)
    assert res.returncode == 1
    assert "PROBLEM  kafka input_topic" in res.stdout and "-> create no_such_topic_x" in res.stdout
    assert "would NOT start" in res.stdout


def test_a_missing_input_topic_is_a_problem(schema: str, group: str) -> None:
    missing = testkit.unique_name("missing")
    code, report = check(schema, missing, group)
    assert code == 1 and not report["would_start"]
    assert by_check(report)["input_topic"]["status"] == "problem"
    assert f"create {missing}" in by_check(report)["input_topic"]["fix"]


def test_pending_migrations_are_a_problem_only_when_the_sink_will_not_apply_them(schema: str, topic: str,
                                                                                   group: str) -> None:
    code, report = check(schema, topic, group, RUN_MIGRATIONS="false")
    assert code == 1 and by_check(report)["migrations"]["status"] == "problem"
    assert "001_" in by_check(report)["migrations"]["detail"]
    code, report = check(schema, topic, group, RUN_MIGRATIONS="true")
    assert code == 0 and by_check(report)["migrations"]["status"] == "note", report


def test_a_migration_changed_after_it_was_applied_is_a_problem(schema: str, topic: str, group: str,
                                                               tmp_path: Path) -> None:
    migrate(schema, topic, group)
    changed = tmp_path / "sql"
    shutil.copytree(testkit.ROOT / "sql", changed)
    first = sorted(changed.glob("001_*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited\n")
    code, report = check(schema, topic, group, SINK_SQL_DIR=str(changed))
    assert code == 1
    assert by_check(report)["migrations"]["status"] == "problem" and first.name in by_check(report)["migrations"][
        "detail"]


@pytest.fixture
def reader_role(schema: str, topic: str, group: str) -> Any:
    """A login role that may read the sink's table but not insert into it."""
    migrate(schema, topic, group)
    role = testkit.unique_name("r")
    db = services.PG_DB
    services.psql_admin(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'", db="postgres")
    services.psql_admin(f"GRANT CONNECT, TEMPORARY ON DATABASE \"{db}\" TO {role}; "
                        f"GRANT USAGE ON SCHEMA {schema} TO {role}; "
                        f"GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role}", db=db)
    yield role
    services.psql_admin(f"DROP OWNED BY {role}", db=db)
    services.psql_admin(f"DROP ROLE {role}", db="postgres")


def test_a_missing_privilege_is_named_with_the_grant(schema: str, topic: str, group: str, reader_role: str) -> None:
    code, report = check(schema, topic, group, TIMESCALE_USER=reader_role, TIMESCALE_PASSWORD="pw",
                         RUN_MIGRATIONS="false")
    assert code == 1, report
    privileges = by_check(report)["privileges"]
    assert privileges["status"] == "problem" and "INSERT" in privileges["detail"]
    assert f"GRANT INSERT ON {schema}.iot_measurements TO {reader_role};" in privileges["fix"]
    assert "SELECT" not in privileges["detail"]


def test_unreachable_servers_are_problems_found_in_seconds(schema: str, topic: str, group: str) -> None:
    started = time.monotonic()
    code, report = check(schema, topic, group, KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{testkit.closed_port()}",
                         TIMESCALE_PORT=str(testkit.closed_port()))
    assert code == 1
    checks = by_check(report)
    assert checks["broker"]["status"] == checks["server"]["status"] == "problem"
    assert "KAFKA_BOOTSTRAP_SERVERS" in checks["broker"]["fix"] and "TIMESCALE_HOST" in checks["server"]["fix"]
    assert time.monotonic() - started < 60
