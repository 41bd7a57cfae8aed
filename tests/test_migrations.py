"""Migrations on the real PostgreSQL (plain mode, no TimescaleDB here) and the TimescaleDB SQL rendering."""

from __future__ import annotations

import hashlib
import shutil
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from structlog.testing import capture_logs

from dev import services, testkit
from sink import migrations, timescale
from sink.errors import RetryableError, classify_db_error
from sink.migrations import MigrationError, MigrationReport, load_migrations, migrate, render
from sink.model import COLUMNS, PRIMARY_KEY
from sink.settings import Settings
from sink.timescale import Availability, TimescalePolicies, preloaded
from sink.upsert import VERSION_COLUMN

REPO_SQL = Path(__file__).resolve().parent.parent / "sql"
BASE = "001_iot_measurements.sql"
TIMESCALE_FILES = ("002_timescaledb_hypertable.sql", "003_timescaledb_hourly_aggregate.sql")
VERSION = "004_source_version.sql"
EVIL = "1 day'; DROP TABLE iot_measurements; --"
# What migrate() does on a fresh schema of the server under test.
EXPECTED_FIRST_RUN = (
    MigrationReport(applied=(BASE, *TIMESCALE_FILES, VERSION), timescaledb=True) if services.TIMESCALEDB
    else MigrationReport(applied=(BASE, VERSION), timescaledb=False, skipped=TIMESCALE_FILES)
)


@pytest.fixture(autouse=True)
def _repo_sql_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(migrations.SQL_DIR_ENV, raising=False)


def settings_for(schema: str, **overrides: Any) -> Settings:
    return testkit.db_settings(schema, **overrides)


def recorded(schema: str) -> list[tuple[Any, ...]]:
    with testkit.connect(schema) as conn:
        return conn.execute("SELECT name, checksum, applied_at FROM schema_migrations ORDER BY name").fetchall()


def table_exists(schema: str, name: str) -> bool:
    with testkit.connect() as conn:
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [f"{schema}.{name}"]).fetchone()
    return bool(row and row[0])


# --------------------------------------------------------------------------- real PostgreSQL


@pytest.mark.both_servers
def test_first_run_creates_the_spec_table_and_records_the_migration(schema: str) -> None:
    report = migrate(settings_for(schema))

    assert report == EXPECTED_FIRST_RUN
    with testkit.connect(schema) as conn:
        columns = conn.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = 'iot_measurements' ORDER BY ordinal_position",
            [schema],
        ).fetchall()
        pk = conn.execute(
            "SELECT a.attname FROM pg_index i"
            " JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) ON true"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
            " WHERE i.indrelid = 'iot_measurements'::regclass AND i.indisprimary ORDER BY k.n"
        ).fetchall()
        indexes = dict(
            conn.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = 'iot_measurements'",
                [schema],
            ).fetchall()
        )
    # The insert follows the model's fields, so the table must have exactly those columns, and
    # the version WRITE_MODE=update guards its updates with.
    assert tuple(c for (c,) in columns) == (*COLUMNS, VERSION_COLUMN)
    assert tuple(c for (c,) in pk) == PRIMARY_KEY
    assert 'USING btree (device_id, "timestamp" DESC)' in indexes["idx_iot_device_id"]
    assert 'USING btree (component_type, "timestamp" DESC)' in indexes["idx_iot_component"]
    assert 'USING btree (connector_mode, "timestamp" DESC)' in indexes["idx_iot_mode"]
    assert [(name, checksum) for name, checksum, _ in recorded(schema)] == [
        (f, hashlib.sha256((REPO_SQL / f).read_bytes()).hexdigest()) for f in EXPECTED_FIRST_RUN.applied]


@pytest.mark.both_servers
def test_second_run_applies_nothing_and_says_up_to_date(schema: str) -> None:
    migrate(settings_for(schema))
    before = recorded(schema)

    with capture_logs() as logs:
        report = migrate(settings_for(schema))

    assert report.applied == ()
    assert recorded(schema) == before  # same rows, same applied_at
    assert [e["event"] for e in logs if e["event"].startswith("migration")] == ["migrations_up_to_date"]


@pytest.mark.both_servers
def test_concurrent_starts_on_a_fresh_schema_do_not_race(infra: None) -> None:
    schema = testkit.unique_name("s")  # not created beforehand: the replicas race on CREATE SCHEMA too
    replicas = 4
    barrier = threading.Barrier(replicas)
    reports: list[MigrationReport] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            barrier.wait(timeout=10)
            for attempt in range(20):  # as the sink's start retries a lock not granted in 5 s (55P03)
                try:
                    reports.append(migrate(settings_for(schema)))
                    return
                except psycopg.errors.LockNotAvailable:
                    if attempt == 19:
                        raise
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(replicas)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == []
        assert len(reports) == replicas
        # Each file applied by exactly one replica (which one takes which file is the race's).
        assert sorted(f for r in reports for f in r.applied) == list(EXPECTED_FIRST_RUN.applied)
        assert [name for name, _, _ in recorded(schema)] == list(EXPECTED_FIRST_RUN.applied)
    finally:
        testkit.drop_schema(schema)


@pytest.mark.plain_postgres
def test_timescaledb_required_fails_clearly_and_changes_nothing(schema: str) -> None:
    expected = r"TIMESCALEDB_REQUIRED=true but TimescaleDB cannot be used: .*not installed"
    with pytest.raises(MigrationError, match=expected):
        migrate(settings_for(schema, timescaledb_required=True))

    assert not table_exists(schema, "iot_measurements")
    assert not table_exists(schema, "schema_migrations")


@pytest.mark.plain_postgres
def test_timescaledb_migrations_are_skipped_unrecorded_and_a_warning_says_features_are_off(schema: str) -> None:
    with capture_logs() as logs:
        report = migrate(settings_for(schema))

    assert report.timescaledb is False
    assert report.skipped == TIMESCALE_FILES
    assert [name for name, _, _ in recorded(schema)] == [BASE, VERSION]
    assert not table_exists(schema, "iot_measurements_hourly")
    [warning] = [e for e in logs if e["event"] == "timescaledb_unavailable"]
    assert warning["log_level"] == "warning"
    assert "TimescaleDB features are off" in warning["reason"]
    assert warning["skipped"] == list(TIMESCALE_FILES)
    assert not [e for e in logs if e["event"] in {"timescaledb_enabled", "timescale_policy_set"}]


@pytest.mark.plain_postgres
def test_skipped_timescaledb_migration_applies_on_the_first_start_with_the_extension(
    schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "001_base.sql").write_text("CREATE TABLE base (x int);\n")
    (tmp_path / "002_extra.sql").write_text("-- requires: timescaledb\nCREATE TABLE extra (x int);\n")
    monkeypatch.setenv(migrations.SQL_DIR_ENV, str(tmp_path))

    first = migrate(settings_for(schema))
    # The extension "appears": the seam is the availability probe, the policies need the real thing.
    monkeypatch.setattr(migrations, "_availability", lambda conn: Availability(True, "2.29.1"))
    monkeypatch.setattr(timescale, "reconcile", lambda conn, schema, policies: [])
    second = migrate(settings_for(schema))
    third = migrate(settings_for(schema))

    assert (first.applied, first.skipped) == (("001_base.sql",), ("002_extra.sql",))
    assert (second.applied, second.skipped, second.timescaledb) == (("002_extra.sql",), (), True)
    assert third.applied == ()
    assert table_exists(schema, "extra")


@pytest.mark.both_servers
def test_changed_applied_migration_is_refused(schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sql_dir = tmp_path / "sql"
    shutil.copytree(REPO_SQL, sql_dir)
    monkeypatch.setenv(migrations.SQL_DIR_ENV, str(sql_dir))
    migrate(settings_for(schema))

    with (sql_dir / BASE).open("a") as f:
        f.write("CREATE INDEX idx_sneaky ON iot_measurements (unit);\n")

    with pytest.raises(MigrationError, match=rf"{BASE} was changed after it was applied .*new numbered file"):
        migrate(settings_for(schema))


@pytest.mark.both_servers
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"timescale_chunk_interval": "one day"}, r"TIMESCALE_CHUNK_INTERVAL='one day' is not a PostgreSQL interval"),
        ({"timescale_compress_after": "-1 day"}, r"TIMESCALE_COMPRESS_AFTER='-1 day' must be a positive .*0 or off"),
        ({"timescale_retention": EVIL}, r"TIMESCALE_RETENTION=.* is not a PostgreSQL interval"),
        ({"timescale_retention": "47 hours"}, r"TIMESCALE_RETENTION='47 hours' must be at least 1 day \+ 1 day"),
        ({"timescale_cagg_refresh_interval": "0"}, r"TIMESCALE_CAGG_REFRESH_INTERVAL='0' must be a positive"),
    ],
)
def test_bad_schema_settings_name_the_env_var_before_anything_changes(
    schema: str, overrides: dict[str, str], message: str
) -> None:
    with pytest.raises(MigrationError, match=message):
        migrate(settings_for(schema, **overrides))

    assert not table_exists(schema, "schema_migrations")


@pytest.mark.plain_postgres
def test_zero_and_off_disable_compression_and_retention(
    schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No TimescaleDB here: the seam is the availability probe (with only the base migration to
    # apply), and the reconcile step, which must be told to keep no compression and no retention.
    shutil.copy(REPO_SQL / BASE, tmp_path / BASE)
    monkeypatch.setenv(migrations.SQL_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(migrations, "_availability", lambda conn: Availability(True, "2.29.1"))
    reconciled: list[TimescalePolicies] = []
    monkeypatch.setattr(timescale, "reconcile", lambda conn, schema, policies: reconciled.append(policies) or [])

    report = migrate(settings_for(schema, timescale_compress_after="0", timescale_retention="OFF"))

    assert report.applied == (BASE,)
    [policies] = reconciled
    assert policies.compress_after is None
    assert policies.retention is None
    assert policies == TimescalePolicies("1 day", None, None, "30 minutes")


# --------------------------------------------------------------------------- pure


def test_settings_become_policies_with_0_and_off_meaning_disabled() -> None:
    s = Settings(timescale_compress_after=" off ", timescale_retention="0", timescale_chunk_interval="6 hours")

    assert TimescalePolicies.from_settings(s) == TimescalePolicies(
        chunk_interval="6 hours", compress_after=None, retention=None, refresh_interval="30 minutes"
    )
    assert TimescalePolicies.from_settings(Settings()) == TimescalePolicies("1 day", "1 day", "90 days", "30 minutes")


def test_timescaledb_sql_renders_setting_values_as_quoted_literals() -> None:
    text = (REPO_SQL / "002_timescaledb_hypertable.sql").read_text()
    quoted = "'1 day''; DROP TABLE iot_measurements; --'"

    rendered = render(text, {"chunk_interval": EVIL})

    assert f"by_range('timestamp', {quoted}::interval)" in rendered
    assert ":'chunk_interval'" not in rendered
    assert render("SELECT :'v'::interval, '{a}'::text[], x::int", {"v": "a\\b"}) == (
        "SELECT  E'a\\\\b'::interval, '{a}'::text[], x::int"
    )
    table, view = "'\"s\".\"iot_measurements\"'::regclass", "'\"s\".\"iot_measurements_hourly\"'::regclass"
    policies = TimescalePolicies("1 day", "1 day", EVIL, EVIL)
    statements = [
        (timescale.set_chunk_interval_sql("s", EVIL), f"SELECT set_chunk_time_interval({table}, {quoted}::interval)"),
        (
            timescale.add_compression_policy_sql("s", EVIL),
            f"SELECT add_compression_policy({table}, compress_after => {quoted}::interval)",
        ),
        (timescale.remove_compression_policy_sql("s"), f"SELECT remove_compression_policy({table}, if_exists => true)"),
        (
            timescale.add_retention_policy_sql("s", EVIL),
            f"SELECT add_retention_policy({table}, drop_after => {quoted}::interval)",
        ),
        (timescale.remove_retention_policy_sql("s"), f"SELECT remove_retention_policy({table}, if_exists => true)"),
        (
            timescale.add_refresh_policy_sql("s", policies),
            f"SELECT add_continuous_aggregate_policy({view}, start_offset => {quoted}::interval - '1 day'::interval,"
            f" end_offset => '1 hour'::interval, schedule_interval => {quoted}::interval)",
        ),
        (
            timescale.add_refresh_policy_sql("s", replace(policies, retention=None)),
            f"SELECT add_continuous_aggregate_policy({view}, start_offset => NULL::interval,"
            f" end_offset => '1 hour'::interval, schedule_interval => {quoted}::interval)",
        ),
        (
            timescale.remove_refresh_policy_sql("s"),
            f"SELECT remove_continuous_aggregate_policy({view}, if_exists => true)",
        ),
    ]
    for statement, expected in statements:
        assert statement.as_string(None) == expected


def test_unknown_variable_in_a_migration_is_an_error() -> None:
    with pytest.raises(MigrationError, match=r"unknown variable :'retention'"):
        render("SELECT :'retention'::interval", {"chunk_interval": "1 day"})


def test_migration_files_are_numbered_and_timescaledb_ones_are_marked() -> None:
    found = load_migrations(REPO_SQL)

    assert [(m.name, m.requires_timescaledb) for m in found] == [
        (BASE, False), *((f, True) for f in TIMESCALE_FILES), (VERSION, False)]
    # A continuous aggregate created WITH DATA cannot run inside the migration's transaction.
    assert "WITH NO DATA;" in found[2].text


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"1_base.sql": ""}, r"named NNN_lower_case_name\.sql"),
        ({"001_a.sql": "", "001_b.sql": ""}, r"share the number 1"),
        ({"001_a.sql": "-- requires: postgis\nSELECT 1;"}, r"unknown requirement\(s\) \['postgis'\]"),
    ],
)
def test_malformed_migration_directory_is_refused(tmp_path: Path, files: dict[str, str], message: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)

    with pytest.raises(MigrationError, match=message):
        load_migrations(tmp_path)


def test_requirement_marker_only_counts_in_the_leading_comment_block(tmp_path: Path) -> None:
    (tmp_path / "001_a.sql").write_text("SELECT 1;\n-- requires: timescaledb\n")

    [m] = load_migrations(tmp_path)

    assert m.requires_timescaledb is False


class RecordingConnection:
    """Stands in for the connection in the policy decision: records what would be executed."""

    def __init__(self) -> None:
        self.executed: list[str] = []

    def execute(self, statement: Any, params: Any = None) -> None:
        self.executed.append(statement.as_string(None))


@pytest.mark.parametrize(
    ("jobs", "want", "expected"),
    [
        ([], None, []),
        ([(1000, True)], "1 day", []),
        ([], "1 day", ["add 1 day"]),
        ([(1000, False)], "2 days", ["remove", "add 2 days"]),
        ([(1000, None)], "2 days", ["remove", "add 2 days"]),  # config without the key
        ([(1000, True), (1001, True)], "1 day", ["remove", "add 1 day"]),  # duplicates collapse to one
        ([(1000, True)], None, ["remove"]),
    ],
)
def test_policy_is_reset_only_when_it_differs_from_the_setting(
    jobs: list[tuple[Any, ...]], want: str | None, expected: list[str]
) -> None:
    conn = RecordingConnection()

    changes = timescale.reconcile_job(
        conn,  # type: ignore[arg-type]  # the decision only calls execute()
        "retention",
        jobs,
        want,
        lambda value: sql.SQL("add {}").format(sql.SQL(value)),
        sql.Composed([sql.SQL("remove")]),
    )

    assert conn.executed == expected
    assert changes == ([timescale.PolicyChange("retention", want or "off")] if expected else [])


@pytest.mark.both_servers
def test_a_lock_not_granted_in_time_is_a_retryable_error_not_a_wait_for_ever(schema: str) -> None:
    # Another replica migrating (or DDL queued behind a long reader) holds what a migration needs:
    # give up after LOCK_TIMEOUT and let the caller retry, instead of waiting with every writer
    # queued behind it.
    migrate(settings_for(schema))
    with testkit.connect(schema) as holder:
        holder.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", [f"kafka-timescale-sink:schema:{schema}"])
        err = testkit.call_bounded(lambda: migrate(settings_for(schema)), 30,
                                   "migrate() still waiting for the lock after 30 s")
    assert isinstance(err, psycopg.Error) and err.sqlstate == "55P03"  # not a MigrationError: retried
    assert isinstance(classify_db_error(err, "migrate"), RetryableError)


@pytest.mark.both_servers
def test_preloaded_says_whether_the_server_loaded_timescaledb() -> None:
    with testkit.connect() as conn:
        assert preloaded(conn) is services.TIMESCALEDB


@pytest.mark.parametrize("error", [psycopg.errors.ObjectInUse, psycopg.errors.IdleInTransactionSessionTimeout,
                                   psycopg.errors.LockNotAvailable, psycopg.errors.AdminShutdown])
def test_a_migration_failing_as_the_writer_would_retry_is_retried_not_fatal(
    schema: str, monkeypatch: pytest.MonkeyPatch, error: type[psycopg.Error]
) -> None:
    # One classifier: what sink.errors calls retryable propagates for the caller's retry.
    def fail(*args: Any) -> str:
        raise error("in use")

    monkeypatch.setattr(migrations, "render", fail)
    with pytest.raises(error):
        migrate(settings_for(schema))
    assert isinstance(classify_db_error(error("in use"), "migrate"), RetryableError)
