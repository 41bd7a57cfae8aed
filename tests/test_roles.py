"""The shipped least-privilege split for real: deploy/postgres/sink-roles.sql makes an owner and a
runtime role in the local database, `migrate` runs as the owner and grants the runtime role, and
`run` and `sink-dlq replay` work as the runtime role, which can write rows and nothing else.  A
role that lacks a privilege stops the sink with exit 1 naming it, not a retry loop."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dev import services, testkit
from sink.envelope import H_CLASS, H_STAGE

pytestmark = [pytest.mark.integration, pytest.mark.both_servers]

ROLES_SQL = testkit.ROOT / "deploy" / "postgres" / "sink-roles.sql"
CONSTRAINT = "roles_test_value_below_1000"
# Every table privilege PostgreSQL has: the runtime role must hold exactly SELECT and INSERT.
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")


@dataclass(frozen=True)
class Roles:
    schema: str
    owner: str
    owner_password: str
    writer: str
    writer_password: str

    def connect(self, role: str) -> psycopg.Connection[Any]:
        password = self.owner_password if role == self.owner else self.writer_password
        return psycopg.connect(services.conninfo(user=role, password=password)
                               + f" options='-c search_path={self.schema},public'", autocommit=True)

    def env(self, role: str, topic: str, group: str, password_file: Path | None = None, **overrides: Any
            ) -> dict[str, str]:
        """The sink's environment as `role`; with password_file, the password comes from it."""
        password = self.owner_password if role == self.owner else self.writer_password
        env = testkit.sink_env(self.schema, topic, group, timescale_user=role, timescale_password=password,
                               **overrides)
        if password_file is not None:
            password_file.write_text(password + "\n")
            del env["TIMESCALE_PASSWORD"]
            env["TIMESCALE_PASSWORD_FILE"] = str(password_file)
        return env


def init_roles(roles: Roles) -> None:
    """The TimescaleDB image's initialisation, done by hand: the script, as the superuser."""
    services.psql_admin_script(ROLES_SQL.read_text(), {
        "owner_role": roles.owner, "owner_password": roles.owner_password,
        "writer_role": roles.writer, "writer_password": roles.writer_password, "schema": roles.schema})


@pytest.fixture
def roles(infra: None) -> Iterator[Roles]:
    """Fresh roles and schema per test (unique names: nothing depends on a leftover), made by the
    shipped script, run twice as a re-run would; all dropped afterwards, pass or fail."""
    r = Roles(testkit.unique_name("iot"), testkit.unique_name("own"), secrets.token_hex(12),
              testkit.unique_name("wri"), secrets.token_hex(12))
    if services.TIMESCALEDB:  # as the image does: the extension exists before the owner migrates
        services.psql_admin("CREATE EXTENSION IF NOT EXISTS timescaledb WITH SCHEMA public")
    try:
        init_roles(r)
        init_roles(r)
        yield r
    finally:
        services.psql_admin(f'DROP SCHEMA IF EXISTS "{r.schema}" CASCADE')
        for role in (r.owner, r.writer):
            if services.psql_admin(f"SELECT 1 FROM pg_roles WHERE rolname = '{role}'", db="postgres") == "1":
                services.psql_admin(f'DROP OWNED BY "{role}"')
                services.psql_admin(f'DROP ROLE "{role}"', db="postgres")


def sink_command(*args: str, env: dict[str, str], expect: int | None = 0, timeout: float = 120
                 ) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, *args], env=env, cwd=testkit.ROOT, capture_output=True, text=True,
                         timeout=timeout)
    if expect is not None:
        assert res.returncode == expect, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def migrate(roles: Roles, topic: str, group: str, **overrides: Any) -> list[dict[str, Any]]:
    """`migrate` as the owner, granting the runtime role; its JSON log lines."""
    res = sink_command("-m", "sink", "migrate", env=roles.env(roles.owner, topic, group,
                                                              timescale_writer_role=roles.writer, **overrides))
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def writer_privileges(roles: Roles, table: str = "iot_measurements") -> set[str]:
    qualified = f'"{roles.schema}".{table}'
    held = services.psql_admin(" UNION ALL ".join(
        f"SELECT '{p}' WHERE has_table_privilege('{roles.writer}', '{qualified}', '{p}')" for p in TABLE_PRIVILEGES))
    return set(held.split())


def rows(roles: Roles) -> int:
    """Rows in the table, counted by the owner (the suite's own role has no access to the schema)."""
    with roles.connect(roles.owner) as conn:
        row = conn.execute("SELECT count(*) FROM iot_measurements").fetchone()
        return int(row[0]) if row else 0


def measurement(i: int, **extra: Any) -> dict[str, Any]:
    return {"timestamp": 1_700_000_000 + i, "mac_address": f"dev-{i % 5}", "mode": "analog",
            "data_point_label": "temperature", "pin": i % 4, "value": i % 500, "unit": "C", **extra}


def fatal_reason(sink: testkit.SinkProcess) -> str:
    """The reason of the sink's fatal_error line, after asserting it exited 1 without retrying."""
    assert sink.wait(60) == 1, sink.log_text()[-3000:]
    events = sink.events()
    assert "retrying" not in [e["event"] for e in events], "a missing privilege is not retried"
    [fatal] = [e for e in events if e["event"] == "fatal_error"]
    return str(fatal["reason"])


# --------------------------------------------------------------------------- the split end to end


def test_owner_migrates_and_the_runtime_role_writes_dlqs_and_replays_but_changes_nothing_else(
        roles: Roles, topic: str, group: str, logdir: Path, tmp_path: Path) -> None:
    # The deploy step: migrations as the owner, which then owns every table.
    migrate(roles, topic, group)
    owners = services.psql_admin(f"SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = '{roles.schema}'")
    assert owners.split() == [roles.owner]
    assert writer_privileges(roles) == {"SELECT", "INSERT"}
    assert writer_privileges(roles, "schema_migrations") == {"SELECT"}
    with roles.connect(roles.owner) as conn:  # an operator's constraint, to have a record to DLQ
        conn.execute(f"ALTER TABLE iot_measurements ADD CONSTRAINT {CONSTRAINT} CHECK (value < 1000)")

    # The sink as the runtime role, its password from a file, without migrations.
    env = roles.env(roles.writer, topic, group, tmp_path / "writer-password", run_migrations="false")
    sink = testkit.SinkProcess(env, logdir / "sink.log").start()
    try:
        values = [measurement(i) for i in range(120)]
        values[57]["value"] = 5000
        testkit.produce(topic, values, partition=0)
        sink.stop_once_committed(group, topic, {0: 120})
    finally:
        if sink.alive():
            sink.kill()
    assert rows(roles) == 119
    [dlq] = testkit.read_all(f"{topic}.dlq")
    assert (dlq.headers[H_CLASS], dlq.headers[H_STAGE]) == (b"CheckViolation", b"write")
    assert "migration_applied" not in [e["event"] for e in sink.events()]

    # Nothing but inserting and reading: no DDL, no change or removal of rows.
    with roles.connect(roles.writer) as conn:
        conn.execute("CREATE TEMP TABLE scratch (a int)")  # allowed: the batch's staging table is one
        for statement in (f'CREATE TABLE "{roles.schema}".extra (a int)',
                          f'CREATE SCHEMA "{roles.schema}_2"',
                          "CREATE TABLE public.extra (a int)",
                          "UPDATE iot_measurements SET value = 0",
                          "DELETE FROM iot_measurements",
                          "TRUNCATE iot_measurements",
                          "DROP TABLE iot_measurements",
                          f"ALTER TABLE iot_measurements DROP CONSTRAINT {CONSTRAINT}",
                          "DELETE FROM schema_migrations",
                          "INSERT INTO schema_migrations (name, checksum) VALUES ('999_x.sql', 'x')"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    assert rows(roles) == 119

    # The operator fixes the cause; the replay, as the runtime role too, writes the record.
    with roles.connect(roles.owner) as conn:
        conn.execute(f"ALTER TABLE iot_measurements DROP CONSTRAINT {CONSTRAINT}")
    res = sink_command("-m", "dlq", "replay", "--json", env=env)
    summary = json.loads(res.stdout)
    assert summary["outcome"] == "completed" and summary["counts"]["inserted"] == 1, summary
    assert rows(roles) == 120


def test_the_runtime_role_passes_the_preflight_and_may_not_migrate(roles: Roles, topic: str, group: str,
                                                                    tmp_path: Path) -> None:
    migrate(roles, topic, group)
    env = roles.env(roles.writer, topic, group, run_migrations="false")
    report = json.loads(sink_command("-m", "sink", "check", "--json", env=env).stdout)
    checks = {c["check"]: c for c in report["checks"]}
    assert report["would_start"] and checks["privileges"]["status"] == checks["migrations"]["status"] == "ok"

    # A pending migration, applied by the runtime role: refused by the server, fatal at once.
    sql_dir = tmp_path / "sql"
    sql_dir.mkdir()
    for f in (testkit.ROOT / "sql").glob("*.sql"):
        (sql_dir / f.name).write_bytes(f.read_bytes())
    (sql_dir / "900_extra.sql").write_text("CREATE TABLE extra (a int);\n")
    res = sink_command("-m", "sink", "migrate", env={**env, "SINK_SQL_DIR": str(sql_dir)}, expect=1)
    assert "900_extra.sql failed: permission denied for schema" in res.stderr
    assert "42501" in res.stderr and "owner" in res.stderr


def test_migrate_grants_exactly_the_runtime_privileges_again_and_again(roles: Roles, topic: str, group: str) -> None:
    migrate(roles, topic, group)
    services.psql_admin(f'GRANT UPDATE, DELETE ON "{roles.schema}".iot_measurements TO "{roles.writer}"; '
                        f'GRANT CREATE ON SCHEMA "{roles.schema}" TO "{roles.writer}"')
    assert writer_privileges(roles) == {"SELECT", "INSERT", "UPDATE", "DELETE"}

    migrate(roles, topic, group)
    [granted] = [e for e in migrate(roles, topic, group) if e["event"] == "writer_role_granted"]
    assert granted["role"] == roles.writer
    assert granted["privileges"] == [f"USAGE on schema {roles.schema}",
                                     f"SELECT, INSERT on {roles.schema}.iot_measurements",
                                     f"SELECT on {roles.schema}.schema_migrations"]
    assert writer_privileges(roles) == {"SELECT", "INSERT"}
    assert writer_privileges(roles, "schema_migrations") == {"SELECT"}
    schema_privileges = services.psql_admin(
        f"SELECT has_schema_privilege('{roles.writer}', '{roles.schema}', 'USAGE'), "
        f"has_schema_privilege('{roles.writer}', '{roles.schema}', 'CREATE')")
    assert schema_privileges == "t|f"


def test_a_writer_role_that_does_not_exist_stops_migrate(roles: Roles, topic: str, group: str) -> None:
    env = roles.env(roles.owner, topic, group, timescale_writer_role="no_such_role_x")
    res = sink_command("-m", "sink", "migrate", env=env, expect=1)
    assert "TIMESCALE_WRITER_ROLE='no_such_role_x': no such role" in res.stderr


# --------------------------------------------------------------------------- missing privileges


def test_update_mode_without_the_update_grant_exits_1_naming_the_columns(roles: Roles, topic: str, group: str,
                                                                          logdir: Path) -> None:
    migrate(roles, topic, group)  # ignore mode: no UPDATE granted
    env = roles.env(roles.writer, topic, group, run_migrations="false", write_mode="update")
    reason = fatal_reason(testkit.SinkProcess(env, logdir / "sink.log").start())
    table = f"{roles.schema}.iot_measurements"
    assert f"role {roles.writer} lacks UPDATE (value, unit, topic, source_version) on {table}:" in reason
    assert f"GRANT UPDATE (value, unit, topic, source_version) ON {table} TO {roles.writer};" in reason


def test_a_runtime_role_without_insert_exits_1_naming_the_grant(roles: Roles, topic: str, group: str,
                                                               logdir: Path) -> None:
    migrate(roles, topic, group)
    services.psql_admin(f'REVOKE INSERT ON "{roles.schema}".iot_measurements FROM "{roles.writer}"')
    testkit.produce(topic, [measurement(i) for i in range(10)], partition=0)
    env = roles.env(roles.writer, topic, group, run_migrations="false")
    reason = fatal_reason(testkit.SinkProcess(env, logdir / "sink.log").start())
    assert f"role {roles.writer} lacks INSERT on {roles.schema}.iot_measurements:" in reason
    assert f"GRANT INSERT ON {roles.schema}.iot_measurements TO {roles.writer};" in reason
    assert testkit.committed_offsets(group, topic) == {}

    # sink-dlq replay opens the same writer: the same message, exit 1.  Without TEMPORARY on the
    # database (held by PUBLIC by default, so taken from PUBLIC for a moment) both are named.
    database = f'DATABASE "{services.PG_DB}"'
    services.psql_admin(f'REVOKE TEMPORARY ON {database} FROM PUBLIC, "{roles.writer}"')
    try:
        res = sink_command("-m", "dlq", "replay", env=env, expect=1)
    finally:
        services.psql_admin(f"GRANT TEMPORARY ON {database} TO PUBLIC")
    assert (f"lacks INSERT on {roles.schema}.iot_measurements, TEMPORARY on database {services.PG_DB} "
            "(the batch's staging table)") in res.stderr
    assert f"GRANT TEMPORARY ON DATABASE {services.PG_DB} TO {roles.writer};" in res.stderr


def test_a_privilege_revoked_while_running_stops_the_sink_without_committing(roles: Roles, topic: str, group: str,
                                                                          logdir: Path) -> None:
    migrate(roles, topic, group)
    env = roles.env(roles.writer, topic, group, run_migrations="false")
    sink = testkit.SinkProcess(env, logdir / "sink.log").start()
    try:
        testkit.produce(topic, [measurement(i) for i in range(50)], partition=0)
        testkit.wait_for(lambda: testkit.committed_offsets(group, topic) == {0: 50}, 60, what="first commit")
        services.psql_admin(f'REVOKE INSERT ON "{roles.schema}".iot_measurements FROM "{roles.writer}"')
        testkit.produce(topic, [measurement(i) for i in range(50, 80)], partition=0)
        reason = fatal_reason(sink)
    finally:
        if sink.alive():
            sink.kill()
    assert reason.startswith("insufficient privilege [42501]: permission denied for table iot_measurements")
    assert "docs/security.md" in reason
    assert testkit.committed_offsets(group, topic) == {0: 50}
    assert testkit.read_all(f"{topic}.dlq") == []
    assert rows(roles) == 50


def test_update_mode_grants_update_of_the_overwritten_columns_only(roles: Roles, topic: str, group: str,
                                                                   logdir: Path) -> None:
    [granted] = [e for e in migrate(roles, topic, group, write_mode="update") if e["event"] == "writer_role_granted"]
    # TimescaleDB's compressed hypertable takes no column grants: there UPDATE is table-wide.
    table = f"{roles.schema}.iot_measurements"
    update = (f"UPDATE on {table} (TimescaleDB: column grants do not reach compressed chunks)"
              if services.TIMESCALEDB else f"UPDATE (value, unit, topic, source_version) on {table}")
    assert update in granted["privileges"]
    testkit.produce(topic, [measurement(1), measurement(1, value=7)], partition=0)
    sink = testkit.SinkProcess(roles.env(roles.writer, topic, group, run_migrations="false", write_mode="update"),
                               logdir / "sink-update.log").start()
    try:
        testkit.wait_drained(group, topic)
        assert sink.stop() == 0
    finally:
        if sink.alive():
            sink.kill()
    with roles.connect(roles.owner) as conn:
        assert conn.execute("SELECT value FROM iot_measurements").fetchall() == [(7.0,)]
    if not services.TIMESCALEDB:
        with roles.connect(roles.writer) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE iot_measurements SET device_id = 'x'")  # a key column: never
    migrate(roles, topic, group)  # back to ignore mode: the UPDATE goes
    held = services.psql_admin(f"SELECT has_column_privilege('{roles.writer}', '\"{roles.schema}\".iot_measurements',"
                               " 'value', 'UPDATE')")
    assert held == "f"
