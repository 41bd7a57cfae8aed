"""Numbered SQL migrations (sql/NNN_*.sql) and the TimescaleDB policies derived from settings.

``migrate(settings)`` runs at every start (and from ``kafka-timescale-sink migrate``):

1. Validate the TIMESCALE_* interval settings (PostgreSQL parses them; errors name the env var).
2. Find out whether TimescaleDB can be used; TIMESCALEDB_REQUIRED=true makes "no" fatal.
3. Apply each pending migration once, in its own transaction, under an advisory lock keyed
   on the schema (replicas starting together wait for each other instead of racing), and
   record it with its checksum in ``schema_migrations``.  A file that starts with
   ``-- requires: timescaledb`` is skipped, and not recorded, without TimescaleDB.
4. With TimescaleDB: re-set the chunk interval and the compression, retention and refresh
   policies wherever they differ from the settings.

Values from settings reach SQL only as quoted literals (psycopg ``sql.Literal``) or bound
parameters.  Connection-class errors (SQLSTATE 08/40/53/57/58, or no SQLSTATE) and lock
timeouts (55P03, after LOCK_TIMEOUT) propagate as psycopg errors for the caller to retry;
everything else fatal is a ``MigrationError``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from sink.logs import get_logger
from sink.settings import ConfigError, Settings

log = get_logger(__name__)

TABLE = "iot_measurements"
HOURLY_VIEW = "iot_measurements_hourly"
SQL_DIR_ENV = "SINK_SQL_DIR"

# 2.11 added unique constraints and ON CONFLICT DO NOTHING on compressed chunks; 2.18.1
# fixed an INSERT ... ON CONFLICT DO NOTHING into a compressed chunk that silently dropped
# the rows after the first conflict (timescale/timescaledb#7672), which would lose data.
MIN_TIMESCALEDB = (2, 18, 1)

# The hourly aggregate re-reads this window at each refresh.  Refreshing over raw rows that
# retention already dropped deletes their aggregates, so retention must be longer than the
# window by a margin (a refresh and a drop run at different times).
REFRESH_START_OFFSET = "7 days"
REFRESH_END_OFFSET = "1 hour"
RETENTION_MARGIN = "1 day"

_DISABLED = frozenset({"0", "off"})
_NAME = re.compile(r"^(\d{3,})_[a-z0-9_]+\.sql$")
_REQUIRES = re.compile(r"^--\s*requires:\s*(.+?)\s*$")
# psql variable syntax, :'name' -> quoted literal; the look-behind leaves "::" casts alone.
_VARIABLE = re.compile(r"(?<!:):'([A-Za-z_][A-Za-z0-9_]*)'")
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57", "58"})
# lock_not_available: a lock not granted within LOCK_TIMEOUT; the caller retries later.
_TRANSIENT_SQLSTATES = frozenset({"55P03"})
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


@dataclass(frozen=True)
class TimescalePolicies:
    """The TIMESCALE_* settings as the policies they ask for; None means disabled."""

    chunk_interval: str
    compress_after: str | None
    retention: str | None
    refresh_interval: str

    @classmethod
    def from_settings(cls, settings: Settings) -> TimescalePolicies:
        def optional(value: str) -> str | None:
            return None if value.strip().lower() in _DISABLED else value

        return cls(
            chunk_interval=settings.timescale_chunk_interval,
            compress_after=optional(settings.timescale_compress_after),
            retention=optional(settings.timescale_retention),
            refresh_interval=settings.timescale_cagg_refresh_interval,
        )


@dataclass(frozen=True)
class _Timescale:
    available: bool
    version: str | None = None
    reason: str = ""


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


# --------------------------------------------------------------------------- policy SQL


def _call(function: str, *args: sql.Composable, **named: sql.Composable) -> sql.Composed:
    # Function and argument names are this module's constants; only values are Literals.
    parts = [*args, *(sql.SQL("{} => {}").format(sql.SQL(k), v) for k, v in named.items())]
    return sql.SQL("SELECT {}({})").format(sql.SQL(function), sql.SQL(", ").join(parts))


def _interval(value: str) -> sql.Composed:
    return sql.SQL("{}::interval").format(sql.Literal(value))


_TRUE = sql.SQL("true")


def set_chunk_interval_sql(interval: str) -> sql.Composed:
    return _call("set_chunk_time_interval", sql.Literal(TABLE), _interval(interval))


def add_compression_policy_sql(compress_after: str) -> sql.Composed:
    return _call("add_compression_policy", sql.Literal(TABLE), compress_after=_interval(compress_after))


def remove_compression_policy_sql() -> sql.Composed:
    return _call("remove_compression_policy", sql.Literal(TABLE), if_exists=_TRUE)


def add_retention_policy_sql(drop_after: str) -> sql.Composed:
    return _call("add_retention_policy", sql.Literal(TABLE), drop_after=_interval(drop_after))


def remove_retention_policy_sql() -> sql.Composed:
    return _call("remove_retention_policy", sql.Literal(TABLE), if_exists=_TRUE)


def add_refresh_policy_sql(schedule_interval: str) -> sql.Composed:
    return _call(
        "add_continuous_aggregate_policy",
        sql.Literal(HOURLY_VIEW),
        start_offset=_interval(REFRESH_START_OFFSET),
        end_offset=_interval(REFRESH_END_OFFSET),
        schedule_interval=_interval(schedule_interval),
    )


def remove_refresh_policy_sql() -> sql.Composed:
    return _call("remove_continuous_aggregate_policy", sql.Literal(HOURLY_VIEW), if_exists=_TRUE)


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
            ts = _timescale(conn)
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
                _reconcile(conn, schema, policies)
                log.info("timescaledb_enabled", version=ts.version, schema=schema)
            else:
                log.warning(
                    "timescaledb_unavailable",
                    reason=f"{ts.reason}; TimescaleDB features are off (plain table: no hypertable, "
                    "compression, retention or hourly aggregate)",
                    skipped=skipped,
                )
        except psycopg.Error as e:
            if _transient(e):
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
            positive = _scalar(conn, "SELECT %s::interval > interval '0'", [value])
        except psycopg.DataError as e:
            raise PolicySettingError(f"{env}={value!r} is not a PostgreSQL interval: {_describe(e)}") from None
        if not positive:
            hint = " (0 or off disables it)" if env in {"TIMESCALE_COMPRESS_AFTER", "TIMESCALE_RETENTION"} else ""
            raise PolicySettingError(f"{env}={value!r} must be a positive interval{hint}")
    if p.retention is not None and not _scalar(
        conn,
        "SELECT %s::interval >= %s::interval + %s::interval",
        [p.retention, REFRESH_START_OFFSET, RETENTION_MARGIN],
    ):
        raise PolicySettingError(
            f"TIMESCALE_RETENTION={p.retention!r} must be at least {REFRESH_START_OFFSET} + {RETENTION_MARGIN}: "
            f"the hourly aggregate re-reads the last {REFRESH_START_OFFSET}, and a refresh over dropped raw "
            "rows deletes their aggregates (use a longer retention, or 0/off)"
        )


def _timescale(conn: psycopg.Connection[Any]) -> _Timescale:
    row = conn.execute(
        "SELECT e.extversion, n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace"
        " WHERE e.extname = 'timescaledb'"
    ).fetchone()
    if row is not None:
        version, ext_schema = str(row[0]), str(row[1])
        if not _at_least_minimum(version):
            # Already in use: its hypertable takes the sink's inserts, so this is not optional.
            raise MigrationError(
                f"TimescaleDB {version} is installed; the sink needs >= {_minimum()} "
                "(INSERT ... ON CONFLICT DO NOTHING into compressed chunks, see docs/schema.md): "
                "run ALTER EXTENSION timescaledb UPDATE after upgrading the package"
            )
        # The functions must resolve whichever schema the extension was created in.
        conn.execute(
            "SELECT set_config('search_path', current_setting('search_path') || ', ' || quote_ident(%s), false)"
            " WHERE NOT %s = ANY (current_schemas(false))",
            [ext_schema, ext_schema],
        )
        return _Timescale(True, version)
    row = conn.execute("SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone()
    if row is None:
        return _Timescale(False, reason="the timescaledb extension is not installed on the database server")
    version = str(row[0])
    if not _at_least_minimum(version):
        return _Timescale(False, reason=f"the server offers TimescaleDB {version}, older than {_minimum()}")
    try:
        preload = _scalar(conn, "SELECT current_setting('shared_preload_libraries')")
    except psycopg.errors.InsufficientPrivilege:
        preload = None  # only superusers may read it; CREATE EXTENSION will say if it is missing
    if preload is not None and "timescaledb" not in str(preload):
        return _Timescale(False, reason="timescaledb is installed but not in shared_preload_libraries")
    return _Timescale(True, version)


def _bootstrap(conn: psycopg.Connection[Any], schema: str) -> dict[str, str]:
    with conn.transaction():
        _lock(conn, schema)
        # Checked first: CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when
        # the schema exists, which a migration role limited to its schema does not have.
        if _scalar(conn, "SELECT to_regnamespace(%s) IS NULL", [schema]):
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        current = _scalar(conn, "SELECT current_schema()")
        if current != schema:
            raise MigrationError(f"TIMESCALE_SCHEMA={schema!r} but the connection's current schema is {current!r}")
        if _scalar(conn, "SELECT to_regclass('schema_migrations') IS NULL"):
            conn.execute(
                "CREATE TABLE schema_migrations ("
                " name text PRIMARY KEY, checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
        rows = conn.execute("SELECT name, checksum FROM schema_migrations").fetchall()
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
        row = conn.execute("SELECT checksum FROM schema_migrations WHERE name = %s", [m.name]).fetchone()
        if row is not None:
            _check_checksum(m, str(row[0]))
            return False
        try:
            conn.execute(render(m.text, variables, conn))
        except psycopg.Error as e:
            if _transient(e):
                raise
            raise MigrationError(f"{m.name} failed: {_describe(e)}") from e
        conn.execute("INSERT INTO schema_migrations (name, checksum) VALUES (%s, %s)", [m.name, m.checksum])
    return True


def _reconcile(conn: psycopg.Connection[Any], schema: str, p: TimescalePolicies) -> None:
    with conn.transaction():
        _lock(conn, schema)
        same_interval = conn.execute(
            "SELECT time_interval = %s::interval FROM timescaledb_information.dimensions"
            " WHERE hypertable_schema = current_schema() AND hypertable_name = %s AND dimension_number = 1",
            [p.chunk_interval, TABLE],
        ).fetchone()
        if same_interval is None:
            return  # not a hypertable (a reduced SINK_SQL_DIR): no policies to keep
        if not same_interval[0]:
            conn.execute(set_chunk_interval_sql(p.chunk_interval))
            log.info("timescale_policy_set", policy="chunk_interval", value=p.chunk_interval)
        _reconcile_job(conn, "compression", _table_jobs(conn, "policy_compression", "compress_after", p.compress_after),
                       p.compress_after, add_compression_policy_sql, remove_compression_policy_sql())
        _reconcile_job(conn, "retention", _table_jobs(conn, "policy_retention", "drop_after", p.retention),
                       p.retention, add_retention_policy_sql, remove_retention_policy_sql())
        if _scalar(
            conn,
            "SELECT count(*) FROM timescaledb_information.continuous_aggregates"
            " WHERE view_schema = current_schema() AND view_name = %s",
            [HOURLY_VIEW],
        ):
            jobs = conn.execute(
                "SELECT j.job_id, j.schedule_interval = %s::interval"
                " AND (j.config ->> 'start_offset')::interval = %s::interval"
                " AND (j.config ->> 'end_offset')::interval = %s::interval"
                " FROM timescaledb_information.jobs j"
                " JOIN timescaledb_information.continuous_aggregates c"
                " ON j.hypertable_schema = c.materialization_hypertable_schema"
                " AND j.hypertable_name = c.materialization_hypertable_name"
                " WHERE j.proc_name = 'policy_refresh_continuous_aggregate'"
                " AND c.view_schema = current_schema() AND c.view_name = %s",
                [p.refresh_interval, REFRESH_START_OFFSET, REFRESH_END_OFFSET, HOURLY_VIEW],
            ).fetchall()
            _reconcile_job(conn, "hourly_refresh", jobs, p.refresh_interval, add_refresh_policy_sql,
                           remove_refresh_policy_sql())


def _table_jobs(conn: psycopg.Connection[Any], proc: str, key: str, want: str | None) -> list[tuple[Any, ...]]:
    # (job_id, matches): TimescaleDB keeps the interval as text in the job's config.
    return conn.execute(
        "SELECT job_id, (config ->> %s)::interval = %s::interval FROM timescaledb_information.jobs"
        " WHERE proc_name = %s AND hypertable_schema = current_schema() AND hypertable_name = %s",
        [key, want, proc, TABLE],
    ).fetchall()


def _reconcile_job(
    conn: psycopg.Connection[Any],
    policy: str,
    jobs: list[tuple[Any, ...]],
    want: str | None,
    add: Callable[[str], sql.Composed],
    remove: sql.Composed,
) -> None:
    if want is not None and len(jobs) == 1 and jobs[0][1]:
        return
    if not jobs and want is None:
        return
    # A policy's interval cannot be edited in place: remove it and add the new one.
    if jobs:
        conn.execute(remove)
    if want is not None:
        conn.execute(add(want))
    log.info("timescale_policy_set", policy=policy, value=want if want is not None else "off")


# --------------------------------------------------------------------------- helpers


def _lock(conn: psycopg.Connection[Any], schema: str) -> None:
    # Held until the transaction ends; every migration and reconciliation takes it.
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [f"kafka-timescale-sink:schema:{schema}"])


def _scalar(conn: psycopg.Connection[Any], query: str, params: list[Any] | None = None) -> Any:
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def _transient(e: psycopg.Error) -> bool:
    if e.sqlstate is None:
        return isinstance(e, psycopg.OperationalError | psycopg.InterfaceError)
    return e.sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES or e.sqlstate in _TRANSIENT_SQLSTATES


def _describe(e: psycopg.Error) -> str:
    message = e.diag.message_primary or str(e).strip()
    return f"{message} (SQLSTATE {e.sqlstate})" if e.sqlstate else message


def _parse_version(version: str) -> tuple[int, ...] | None:
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return tuple(int(x) for x in match.groups()) if match else None


def _at_least_minimum(version: str) -> bool:
    parsed = _parse_version(version)
    return parsed is not None and parsed >= MIN_TIMESCALEDB


def _minimum() -> str:
    return ".".join(str(x) for x in MIN_TIMESCALEDB)
