"""TimescaleDB: is it usable, the policies the TIMESCALE_* settings ask for, and their reconciliation.

Every object is named in the sink's schema (``"schema"."iot_measurements"``): a policy call
or a catalog lookup never resolves through the search path to another schema's table.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from sink.catalog import scalar
from sink.settings import Settings

TABLE = "iot_measurements"
HOURLY_VIEW = "iot_measurements_hourly"

# 2.11 added unique constraints and ON CONFLICT DO NOTHING on compressed chunks; 2.18.1
# fixed an INSERT ... ON CONFLICT DO NOTHING into a compressed chunk that silently dropped
# the rows after the first conflict (timescale/timescaledb#7672), which would lose data.
MIN_TIMESCALEDB = (2, 18, 1)

# The refresh policy re-reads every bucket back to RETENTION_MARGIN short of the retention (all
# history without retention), so late rows and backfills of any age the table keeps reach the
# aggregate.  A refresh only recomputes the buckets that writes invalidated, so the wide window
# costs nothing while old data stays untouched.  It must stop short of the retention: a refresh
# over raw rows that retention already dropped deletes their aggregates.
REFRESH_END_OFFSET = "1 hour"
RETENTION_MARGIN = "1 day"
# The window (start - end offset) must hold two buckets; a day keeps the arithmetic readable.
MIN_REFRESH_WINDOW = "1 day"

# Defined by TimescaleDB's loader library, PGC_POSTMASTER: it exists with its integer type only
# when the library was loaded at server start.  pg_settings shows it to every role, unlike
# shared_preload_libraries (superusers and pg_read_all_settings only).
_PRELOAD_PROBE = "timescaledb.max_background_workers"

_DISABLED = frozenset({"0", "off"})


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

    @property
    def refresh_start_offset(self) -> sql.Composable:
        """How far back each refresh reaches: RETENTION_MARGIN short of the retention, or all
        history (NULL) without one."""
        if self.retention is None:
            return sql.SQL("NULL::interval")
        return sql.SQL("{}::interval - {}::interval").format(sql.Literal(self.retention), sql.Literal(RETENTION_MARGIN))


@dataclass(frozen=True)
class Availability:
    """Can TimescaleDB be used in this database, and if not, why."""

    available: bool
    version: str | None = None
    reason: str = ""


class TimescaleVersionError(RuntimeError):
    """The extension is created but older than the sink supports."""


# --------------------------------------------------------------------------- detection


def availability(conn: psycopg.Connection[Any]) -> Availability:
    """Created (or creatable) in a new enough version, and preloaded by the server.

    Appends the extension's schema to the session's search_path when it is not on it, so the
    migrations' unqualified TimescaleDB function calls resolve."""
    row = conn.execute(
        "SELECT e.extversion, n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace"
        " WHERE e.extname = 'timescaledb'"
    ).fetchone()
    if row is not None:
        version, ext_schema = str(row[0]), str(row[1])
        if not at_least_minimum(version):
            # Already in use: its hypertable takes the sink's inserts, so this is not optional.
            raise TimescaleVersionError(
                f"TimescaleDB {version} is installed; the sink needs >= {minimum()} "
                "(INSERT ... ON CONFLICT DO NOTHING into compressed chunks, see docs/schema.md): "
                "run ALTER EXTENSION timescaledb UPDATE after upgrading the package"
            )
        conn.execute(
            "SELECT set_config('search_path', current_setting('search_path') || ', ' || quote_ident(%s), false)"
            " WHERE NOT %s = ANY (current_schemas(false))",
            [ext_schema, ext_schema],
        )
        if not preloaded(conn):
            return Availability(False, version, "timescaledb is created but the server did not preload it "
                                "(shared_preload_libraries)")
        return Availability(True, version)
    row = conn.execute("SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone()
    if row is None:
        return Availability(False, reason="the timescaledb extension is not installed on the database server")
    version = str(row[0])
    if not at_least_minimum(version):
        return Availability(False, reason=f"the server offers TimescaleDB {version}, older than {minimum()}")
    if not preloaded(conn):
        return Availability(False, reason="timescaledb is installed but not in shared_preload_libraries")
    return Availability(True, version)


def preloaded(conn: psycopg.Connection[Any]) -> bool:
    """Did the server load TimescaleDB at start?  Answers for any role (see _PRELOAD_PROBE)."""
    row = conn.execute("SELECT vartype FROM pg_settings WHERE name = %s", [_PRELOAD_PROBE]).fetchone()
    return row is not None and row[0] == "integer"


def _parse_version(version: str) -> tuple[int, ...] | None:
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return tuple(int(x) for x in match.groups()) if match else None


def at_least_minimum(version: str) -> bool:
    parsed = _parse_version(version)
    return parsed is not None and parsed >= MIN_TIMESCALEDB


def minimum() -> str:
    return ".".join(str(x) for x in MIN_TIMESCALEDB)


# --------------------------------------------------------------------------- policy SQL


def _regclass(schema: str, name: str) -> sql.Composed:
    # The qualified, quoted name as the text of a regclass argument: never the search path.
    qualified = f'"{schema}"."{name}"'  # the schema setting is a lower-case identifier (settings.py)
    return sql.SQL("{}::regclass").format(sql.Literal(qualified))


def _call(function: str, *args: sql.Composable, **named: sql.Composable) -> sql.Composed:
    # Function and argument names are this module's constants; only values are Literals.
    parts = [*args, *(sql.SQL("{} => {}").format(sql.SQL(k), v) for k, v in named.items())]
    return sql.SQL("SELECT {}({})").format(sql.SQL(function), sql.SQL(", ").join(parts))


def _interval(value: str) -> sql.Composed:
    return sql.SQL("{}::interval").format(sql.Literal(value))


_TRUE = sql.SQL("true")


def set_chunk_interval_sql(schema: str, interval: str) -> sql.Composed:
    return _call("set_chunk_time_interval", _regclass(schema, TABLE), _interval(interval))


def add_compression_policy_sql(schema: str, compress_after: str) -> sql.Composed:
    return _call("add_compression_policy", _regclass(schema, TABLE), compress_after=_interval(compress_after))


def remove_compression_policy_sql(schema: str) -> sql.Composed:
    return _call("remove_compression_policy", _regclass(schema, TABLE), if_exists=_TRUE)


def add_retention_policy_sql(schema: str, drop_after: str) -> sql.Composed:
    return _call("add_retention_policy", _regclass(schema, TABLE), drop_after=_interval(drop_after))


def remove_retention_policy_sql(schema: str) -> sql.Composed:
    return _call("remove_retention_policy", _regclass(schema, TABLE), if_exists=_TRUE)


def add_refresh_policy_sql(schema: str, p: TimescalePolicies) -> sql.Composed:
    return _call(
        "add_continuous_aggregate_policy",
        _regclass(schema, HOURLY_VIEW),
        start_offset=p.refresh_start_offset,
        end_offset=_interval(REFRESH_END_OFFSET),
        schedule_interval=_interval(p.refresh_interval),
    )


def remove_refresh_policy_sql(schema: str) -> sql.Composed:
    return _call("remove_continuous_aggregate_policy", _regclass(schema, HOURLY_VIEW), if_exists=_TRUE)


# --------------------------------------------------------------------------- reconciliation


@dataclass(frozen=True)
class PolicyChange:
    """One policy re-set by reconcile(); logged once its transaction committed."""

    policy: str
    value: str


def reconcile(conn: psycopg.Connection[Any], schema: str, p: TimescalePolicies) -> list[PolicyChange]:
    """Re-set the chunk interval and every policy that differs from the settings.

    Runs inside the caller's transaction; returns what it changed (the caller logs it after the
    commit, so a rolled-back change is never reported)."""
    changes: list[PolicyChange] = []
    same_interval = conn.execute(
        "SELECT time_interval = %s::interval FROM timescaledb_information.dimensions"
        " WHERE hypertable_schema = %s AND hypertable_name = %s AND dimension_number = 1",
        [p.chunk_interval, schema, TABLE],
    ).fetchone()
    if same_interval is None:
        return changes  # not a hypertable (a reduced SINK_SQL_DIR): no policies to keep
    if not same_interval[0]:
        conn.execute(set_chunk_interval_sql(schema, p.chunk_interval))
        changes.append(PolicyChange("chunk_interval", p.chunk_interval))
    changes += reconcile_job(conn, "compression",
                             _table_jobs(conn, schema, "policy_compression", "compress_after", p.compress_after),
                             p.compress_after, lambda v: add_compression_policy_sql(schema, v),
                             remove_compression_policy_sql(schema))
    changes += reconcile_job(conn, "retention",
                             _table_jobs(conn, schema, "policy_retention", "drop_after", p.retention),
                             p.retention, lambda v: add_retention_policy_sql(schema, v),
                             remove_retention_policy_sql(schema))
    if scalar(conn, "SELECT count(*) FROM timescaledb_information.continuous_aggregates"
                     " WHERE view_schema = %s AND view_name = %s", [schema, HOURLY_VIEW]):
        changes += reconcile_job(conn, "hourly_refresh", _refresh_jobs(conn, schema, p), p.refresh_interval,
                                 lambda _: add_refresh_policy_sql(schema, p), remove_refresh_policy_sql(schema))
    return changes


def _table_jobs(conn: psycopg.Connection[Any], schema: str, proc: str, key: str,
                want: str | None) -> list[tuple[Any, ...]]:
    # (job_id, matches): TimescaleDB keeps the interval as text in the job's config.
    return conn.execute(
        "SELECT job_id, (config ->> %s)::interval = %s::interval FROM timescaledb_information.jobs"
        " WHERE proc_name = %s AND hypertable_schema = %s AND hypertable_name = %s",
        [key, want, proc, schema, TABLE],
    ).fetchall()


def _refresh_jobs(conn: psycopg.Connection[Any], schema: str, p: TimescalePolicies) -> list[tuple[Any, ...]]:
    # timescaledb_information.jobs names a continuous aggregate's refresh job after the view (2.x
    # up to at least 2.28); matching the materialization hypertable too keeps any version's
    # naming found, so a policy is never added twice.
    query = sql.SQL(
        "SELECT j.job_id, j.schedule_interval = {every}"
        " AND (j.config ->> 'start_offset')::interval IS NOT DISTINCT FROM {start}"
        " AND (j.config ->> 'end_offset')::interval = {end}"
        " FROM timescaledb_information.jobs j"
        " JOIN timescaledb_information.continuous_aggregates c"
        " ON (j.hypertable_schema, j.hypertable_name) IN ((c.view_schema, c.view_name),"
        " (c.materialization_hypertable_schema, c.materialization_hypertable_name))"
        " WHERE j.proc_name = 'policy_refresh_continuous_aggregate'"
        " AND c.view_schema = {schema} AND c.view_name = {view}"
    ).format(every=_interval(p.refresh_interval), start=p.refresh_start_offset, end=_interval(REFRESH_END_OFFSET),
             schema=sql.Literal(schema), view=sql.Literal(HOURLY_VIEW))
    return conn.execute(query).fetchall()


def reconcile_job(
    conn: psycopg.Connection[Any],
    policy: str,
    jobs: list[tuple[Any, ...]],
    want: str | None,
    add: Callable[[str], sql.Composed],
    remove: sql.Composed,
) -> list[PolicyChange]:
    """Keep exactly one job matching ``want`` (none when None); jobs are (job_id, matches)."""
    if want is not None and len(jobs) == 1 and jobs[0][1]:
        return []
    if not jobs and want is None:
        return []
    # A policy's interval cannot be edited in place: remove it and add the new one.
    if jobs:
        conn.execute(remove)
    if want is not None:
        conn.execute(add(want))
    return [PolicyChange(policy, want if want is not None else "off")]
