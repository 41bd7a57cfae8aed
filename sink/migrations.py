"""Numbered SQL migrations (sql/NNN_*.sql) and the TimescaleDB policies derived from settings.

``migrate(settings)`` runs at every start (and from ``kafka-timescale-sink migrate``):

1. Validate the TIMESCALE_* interval settings (PostgreSQL parses them; errors name the env var).
2. Find out whether TimescaleDB can be used; TIMESCALEDB_REQUIRED=true makes "no" fatal.
3. Apply each pending migration once, in its own transaction, under an advisory lock keyed
   on the schema (replicas starting together wait for each other instead of racing), and
   record it with its checksum in ``schema_migrations``.  A file that starts with
   ``-- requires: timescaledb`` is skipped, and not recorded, without TimescaleDB.
4. With TimescaleDB: re-set the chunk interval and the compression, retention and refresh
   policies wherever they differ from the settings (``sink.timescale.reconcile``), and log
   each change once its transaction committed.
5. With TIMESCALE_WRITER_ROLE: give that role exactly the runtime privileges on the schema's
   objects (``sink.grants.grant_runtime``), in one transaction; the same again is a no-op.

Every object is named in ``TIMESCALE_SCHEMA`` (the ledger ``schema_migrations`` too): another
schema's tables, reachable through the search path, are never read or written.

Values from settings reach SQL only as quoted literals (psycopg ``sql.Literal``) or bound
parameters.  Errors sink.errors calls retryable (SQLSTATE 08/40/53/57/58, lock timeouts after
LOCK_TIMEOUT, ended sessions, no SQLSTATE) propagate as psycopg errors for the caller to
retry; everything else fatal is a ``MigrationError``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from sink import timescale
from sink.catalog import relation_exists, scalar, schema_exists
from sink.errors import INSUFFICIENT_PRIVILEGE, db_error_is_retryable, pg_message
from sink.grants import grant_runtime
from sink.logs import get_logger
from sink.settings import ConfigError, Settings
from sink.timescale import MIN_REFRESH_WINDOW, RETENTION_MARGIN, TimescalePolicies, TimescaleVersionError
from sink.upsert import WriteMode, updated_columns
from sink.writer import TABLE

log = get_logger(__name__)

SQL_DIR_ENV = "SINK_SQL_DIR"
LEDGER = "schema_migrations"
AGGREGATE = "iot_measurements_hourly"  # 003's view: the runtime role has no business with it

_NAME = re.compile(r"^(\d{3,})_[a-z0-9_]+\.sql$")
_REQUIRES = re.compile(r"^--\s*requires:\s*(.+?)\s*$")
# psql variable syntax, :'name' -> quoted literal; the look-behind leaves "::" casts alone.
_VARIABLE = re.compile(r"(?<!:):'([A-Za-z_][A-Za-z0-9_]*)'")
# A migration's DDL waits for its table lock behind every open transaction on the table (a long
# dashboard query), and every writer queues behind the waiting DDL: give up after a few
# seconds and retry, rather than stall the writers.  Also bounds the wait for the advisory lock
# of a replica that is migrating (retried the same way).
LOCK_TIMEOUT = "5s"


class MigrationError(RuntimeError):
    """The schema cannot be brought up to date; the message says why and what to change."""


class PolicySettingError(MigrationError, ConfigError):
    """A TIMESCALE_* value the database refuses as an interval (or out of range): a bad setting,
    so the command exits 2 like any other invalid setting.  Only the database parses intervals
    the way TimescaleDB will, so this is found when migrations run, not when settings load."""


@dataclass(frozen=True)
class Migration:
    """One sql/NNN_name.sql file."""

    name: str
    number: int
    text: str
    checksum: str
    requires_timescaledb: bool


@dataclass(frozen=True)
class MigrationReport:
    """What one ``migrate()`` call did."""

    applied: tuple[str, ...]
    timescaledb: bool
    skipped: tuple[str, ...] = ()


# --------------------------------------------------------------------------- files


def sql_dir() -> Path:
    """``$SINK_SQL_DIR``, else ``sql/`` next to the ``sink`` package (the repository layout)."""
    configured = os.environ.get(SQL_DIR_ENV)
    return Path(configured) if configured else Path(__file__).resolve().parent.parent / "sql"


def load_migrations(directory: Path) -> list[Migration]:
    """The directory's NNN_name.sql files in numeric order; a misnamed .sql file is an error."""
    if not directory.is_dir():
        raise MigrationError(f"migrations directory {directory} does not exist (set {SQL_DIR_ENV})")
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path}: migration files are named NNN_lower_case_name.sql")
        number = int(match.group(1))
        if number in found:
            raise MigrationError(f"{path.name} and {found[number].name} share the number {number}")
        raw = path.read_bytes()
        text = raw.decode("utf-8")
        checksum = hashlib.sha256(raw).hexdigest()
        found[number] = Migration(path.name, number, text, checksum, _requires_timescaledb(path.name, text))
    return [found[n] for n in sorted(found)]


def _requires_timescaledb(name: str, text: str) -> bool:
    requires: set[str] = set()
    for line in text.splitlines():
        if not line.startswith("--"):
            break  # the marker belongs to the leading comment block only
        match = _REQUIRES.match(line)
        if match:
            requires.update(part.strip() for part in match.group(1).split(","))
    unknown = requires - {"timescaledb"}
    if unknown:
        raise MigrationError(f"{name}: unknown requirement(s) {sorted(unknown)}; only 'timescaledb' is known")
    return bool(requires)


def template_variables(settings: Settings) -> dict[str, str]:
    """The psql variables a migration may use, e.g. ``:'chunk_interval'``."""
    return {"chunk_interval": settings.timescale_chunk_interval}


def render(text: str, variables: Mapping[str, str], context: Any = None) -> str:
    """Replace each ``:'name'`` with the value as a quoted SQL literal, as ``psql -v`` would."""

    def literal(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in variables:
            raise MigrationError(f"unknown variable :'{name}' (known: {sorted(variables)})")
        return sql.Literal(variables[name]).as_string(context)

    return _VARIABLE.sub(literal, text)


# --------------------------------------------------------------------------- migrate


def migrate(settings: Settings) -> MigrationReport:
    """Bring the schema in ``settings.timescale_schema`` up to date; see the module docstring."""
    migrations = load_migrations(sql_dir())
    policies = TimescalePolicies.from_settings(settings)
    schema = settings.timescale_schema
    applied: list[str] = []
    skipped: list[str] = []
    with psycopg.connect(settings.conninfo(), autocommit=True) as conn:
        try:
            conn.execute(sql.SQL("SET lock_timeout = {}").format(LOCK_TIMEOUT))
            # Step 1.
            _validate(conn, policies)
            # Step 2.
            ts = _availability(conn)
            if settings.timescaledb_required and not ts.available:
                raise MigrationError(
                    f"TIMESCALEDB_REQUIRED=true but TimescaleDB cannot be used: {ts.reason} "
                    f"(database {settings.timescale_db!r} on {settings.timescale_host}:{settings.timescale_port})"
                )
            # Step 3.
            recorded = _bootstrap(conn, schema)
            _check_recorded(migrations, recorded)
            variables = template_variables(settings)
            for m in migrations:
                if m.name in recorded:
                    continue
                if m.requires_timescaledb and not ts.available:
                    skipped.append(m.name)
                    continue
                if _apply(conn, schema, m, variables):
                    applied.append(m.name)
                    log.info("migration_applied", file=m.name, checksum=m.checksum)
            if not applied:
                log.info("migrations_up_to_date", schema=schema, recorded=len(recorded))
            # Step 4.
            if ts.available:
                with conn.transaction():
                    _lock(conn, schema)
                    changes = timescale.reconcile(conn, schema, policies)
                for change in changes:  # committed: only now are they true
                    log.info("timescale_policy_set", policy=change.policy, value=change.value)
                log.info("timescaledb_enabled", version=ts.version, schema=schema)
            else:
                log.warning(
                    "timescaledb_unavailable",
                    reason=f"{ts.reason}; TimescaleDB features are off (plain table: no hypertable, "
                    "compression, retention or hourly aggregate)",
                    skipped=skipped,
                )
            # Step 5.
            if settings.timescale_writer_role:
                _grant_writer(conn, schema, settings.timescale_writer_role,
                              updated_columns(WriteMode.from_settings(settings)))
        except psycopg.Error as e:
            if db_error_is_retryable(e):
                raise
            raise MigrationError(f"schema {schema!r}: {_describe(e)}") from e
    return MigrationReport(tuple(applied), ts.available, tuple(skipped))


def _validate(conn: psycopg.Connection[Any], p: TimescalePolicies) -> None:
    checks = [
        ("TIMESCALE_CHUNK_INTERVAL", p.chunk_interval),
        ("TIMESCALE_COMPRESS_AFTER", p.compress_after),
        ("TIMESCALE_RETENTION", p.retention),
        ("TIMESCALE_CAGG_REFRESH_INTERVAL", p.refresh_interval),
    ]
    for env, value in checks:
        if value is None:
            continue
        try:
            positive = scalar(conn, "SELECT %s::interval > interval '0'", [value])
        except psycopg.DataError as e:
            raise PolicySettingError(f"{env}={value!r} is not a PostgreSQL interval: {_describe(e)}") from None
        if not positive:
            hint = " (0 or off disables it)" if env in {"TIMESCALE_COMPRESS_AFTER", "TIMESCALE_RETENTION"} else ""
            raise PolicySettingError(f"{env}={value!r} must be a positive interval{hint}")
    if p.retention is not None and not scalar(
        conn,
        "SELECT %s::interval >= %s::interval + %s::interval",
        [p.retention, MIN_REFRESH_WINDOW, RETENTION_MARGIN],
    ):
        raise PolicySettingError(
            f"TIMESCALE_RETENTION={p.retention!r} must be at least {MIN_REFRESH_WINDOW} + {RETENTION_MARGIN}: "
            f"the hourly aggregate refreshes everything up to {RETENTION_MARGIN} short of the retention, "
            "and a refresh over dropped raw rows deletes their aggregates (use a longer retention, or 0/off)"
        )


def _availability(conn: psycopg.Connection[Any]) -> timescale.Availability:
    try:
        return timescale.availability(conn)
    except TimescaleVersionError as e:
        raise MigrationError(str(e)) from None


def _bootstrap(conn: psycopg.Connection[Any], schema: str) -> dict[str, str]:
    with conn.transaction():
        _lock(conn, schema)
        # Checked first: CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when
        # the schema exists, which a migration role limited to its schema does not have.
        if not schema_exists(conn, schema):
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        current = scalar(conn, "SELECT current_schema()")
        if current != schema:
            raise MigrationError(f"TIMESCALE_SCHEMA={schema!r} but the connection's current schema is {current!r}")
        # Qualified: an unqualified name would find another schema's table through the search path.
        if not relation_exists(conn, schema, LEDGER):
            conn.execute(sql.SQL(
                "CREATE TABLE {} ("
                " name text PRIMARY KEY, checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(_ledger(schema)))
        return _read_ledger(conn, schema)


def recorded_migrations(conn: psycopg.Connection[Any], schema: str) -> dict[str, str]:
    """The ledger: applied migration name -> checksum; empty when there is no ledger yet."""
    return _read_ledger(conn, schema) if relation_exists(conn, schema, LEDGER) else {}


def _read_ledger(conn: psycopg.Connection[Any], schema: str) -> dict[str, str]:
    rows = conn.execute(sql.SQL("SELECT name, checksum FROM {}").format(_ledger(schema))).fetchall()
    return {str(name): str(checksum) for name, checksum in rows}


def _check_recorded(migrations: list[Migration], recorded: Mapping[str, str]) -> None:
    # A recorded name without a file is tolerated: during a rolling upgrade an older replica
    # may start after a newer one applied a migration it does not know yet.
    for m in migrations:
        _check_checksum(m, recorded.get(m.name))


def _check_checksum(m: Migration, recorded: str | None) -> None:
    if recorded is not None and recorded != m.checksum:
        raise MigrationError(
            f"{m.name} was changed after it was applied (recorded checksum {recorded[:12]}, file {m.checksum[:12]}): "
            "applied migrations are immutable, put the change in a new numbered file"
        )


def _apply(conn: psycopg.Connection[Any], schema: str, m: Migration, variables: Mapping[str, str]) -> bool:
    with conn.transaction():
        _lock(conn, schema)
        # Another replica may have applied it while this one waited for the lock.
        row = conn.execute(sql.SQL("SELECT checksum FROM {} WHERE name = %s").format(_ledger(schema)),
                           [m.name]).fetchone()
        if row is not None:
            _check_checksum(m, str(row[0]))
            return False
        try:
            conn.execute(render(m.text, variables, conn))
        except psycopg.Error as e:
            if db_error_is_retryable(e):
                raise
            raise MigrationError(f"{m.name} failed: {_describe(e)}") from e
        conn.execute(sql.SQL("INSERT INTO {} (name, checksum) VALUES (%s, %s)").format(_ledger(schema)),
                     [m.name, m.checksum])
    return True


def _grant_writer(conn: psycopg.Connection[Any], schema: str, role: str, update: tuple[str, ...]) -> None:
    if not scalar(conn, "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s", [role]):
        raise MigrationError(f"TIMESCALE_WRITER_ROLE={role!r}: no such role (create it first, "
                             "see deploy/postgres/sink-roles.sql)")
    with conn.transaction():
        _lock(conn, schema)
        granted = grant_runtime(conn, schema, role, TABLE, LEDGER, (AGGREGATE,), update)
    log.info("writer_role_granted", role=role, schema=schema, privileges=granted)


# --------------------------------------------------------------------------- helpers


def _ledger(schema: str) -> sql.Identifier:
    return sql.Identifier(schema, LEDGER)


def _lock(conn: psycopg.Connection[Any], schema: str) -> None:
    # Held until the transaction ends; every migration and reconciliation takes it.
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [f"kafka-timescale-sink:schema:{schema}"])


def _describe(e: psycopg.Error) -> str:
    if e.sqlstate == INSUFFICIENT_PRIVILEGE:
        return (f"{pg_message(e)} (SQLSTATE {e.sqlstate}): migrations run as the owner of the schema and its "
                "tables (TIMESCALE_USER), not as the runtime role (see docs/security.md)")
    return f"{pg_message(e)} (SQLSTATE {e.sqlstate})" if e.sqlstate else pg_message(e)
