"""The runtime role's privileges, in one place: what `run`, `sink-dlq replay` and `check` need,
checked before writing (writer, preflight) and granted by `migrate` (TIMESCALE_WRITER_ROLE).

Database-level privileges (CONNECT, TEMPORARY) are only checked here: the schema's owner cannot
grant them, the database's owner or a superuser does (deploy/postgres/sink-roles.sql)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from sink.catalog import relation_exists

# INSERT ... RETURNING reads the key back, and the staging table's LIKE reads the table's
# definition: both need SELECT.  No DELETE or TRUNCATE; UPDATE only of the columns that
# WRITE_MODE=update overwrites (sink.upsert.updated_columns).
WRITE_PRIVILEGES = ("SELECT", "INSERT")
# `check` reads which migrations were applied.
LEDGER_PRIVILEGES = ("SELECT",)


@dataclass(frozen=True)
class Missing:
    """A privilege a role lacks, and the statement that grants it."""

    role: str
    privilege: str
    on: str
    grant: str

    def __str__(self) -> str:
        return f"{self.privilege} on {self.on}"


def missing_write_privileges(conn: psycopg.Connection[Any], schema: str, table: str,
                             update: tuple[str, ...] = ()) -> list[Missing]:
    """What the connection's role lacks to write ``schema.table``: USAGE on the schema, the
    table's WRITE_PRIVILEGES (and UPDATE of the `update` columns), TEMPORARY on the database.
    Read from the catalog, which needs no privilege; a schema or table that does not exist is
    left for the caller to report."""
    row = conn.execute(
        "SELECT current_user, current_database(), has_database_privilege(current_database(), 'TEMPORARY'),"
        " n.oid IS NOT NULL, has_schema_privilege(n.oid, 'USAGE'), c.oid IS NOT NULL,"
        " has_table_privilege(c.oid, 'SELECT'), has_table_privilege(c.oid, 'INSERT')"
        " FROM (SELECT to_regnamespace(%s) AS oid) n"
        " LEFT JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = %s",
        [schema, table],
    ).fetchone()
    assert row is not None  # one row whatever exists
    user, database, temporary, schema_found, usage, table_found, *table_privileges = row
    role = _shown(user, conn)
    qualified = f"{schema}.{table}"
    out: list[Missing] = []
    if schema_found and not usage:
        out.append(Missing(user, "USAGE", f"schema {schema}", f"GRANT USAGE ON SCHEMA {schema} TO {role};"))
    if table_found:
        out += [Missing(user, p, qualified, f"GRANT {p} ON {qualified} TO {role};")
                for p, held in zip(WRITE_PRIVILEGES, table_privileges, strict=True) if not held]
    if table_found and update:
        # Of the columns that exist: a missing one is the writer's to report (a migration is missing).
        regclass = sql.Identifier(schema, table).as_string(conn)
        lacking = [name for (name,) in conn.execute(
            "SELECT a.attname FROM pg_catalog.pg_attribute a WHERE a.attrelid = %s::regclass AND a.attname = ANY(%s)"
            " AND NOT a.attisdropped AND NOT has_column_privilege(a.attrelid, a.attnum, 'UPDATE') ORDER BY a.attnum",
            [regclass, list(update)]).fetchall()]
        if lacking:
            cols = ", ".join(lacking)
            out.append(Missing(user, f"UPDATE ({cols})", qualified,
                               f"GRANT UPDATE ({cols}) ON {qualified} TO {role};"))
    if not temporary:
        out.append(Missing(user, "TEMPORARY", f"database {database} (the batch's staging table)",
                           f"GRANT TEMPORARY ON DATABASE {_shown(database, conn)} TO {role};"))
    return out


_PLAIN_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


def _shown(name: str, conn: psycopg.Connection[Any]) -> str:
    """A name as an operator would type it into a GRANT: quoted only when it has to be."""
    return name if _PLAIN_NAME.match(name) else sql.Identifier(name).as_string(conn)


def grant_runtime(conn: psycopg.Connection[Any], schema: str, role: str, table: str, ledger: str,
                  others: tuple[str, ...] = (), update: tuple[str, ...] = ()) -> list[str]:
    """Give ``role`` exactly the runtime privileges on the sink's objects in ``schema``: USAGE on
    the schema, WRITE_PRIVILEGES on ``table``, LEDGER_PRIVILEGES on ``ledger``, nothing on
    ``others`` (e.g. the hourly aggregate).  Each object's privileges are revoked and granted
    again in the caller's transaction, so a privilege granted earlier by hand (UPDATE, CREATE)
    goes, and concurrent sessions see the old set or the new one.  Returns what was granted."""
    who = sql.Identifier(role)
    granted = [f"USAGE on schema {schema}"]
    conn.execute(sql.SQL("REVOKE ALL ON SCHEMA {} FROM {}").format(sql.Identifier(schema), who))
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), who))
    for name, privileges in ((table, WRITE_PRIVILEGES), (ledger, LEDGER_PRIVILEGES), *((o, ()) for o in others)):
        if not relation_exists(conn, schema, name):
            continue
        target = sql.Identifier(schema, name)
        conn.execute(sql.SQL("REVOKE ALL ON {} FROM {}").format(target, who))
        if privileges:
            conn.execute(sql.SQL("GRANT {} ON {} TO {}").format(sql.SQL(", ").join(map(sql.SQL, privileges)),
                                                                 target, who))
            granted.append(f"{', '.join(privileges)} on {schema}.{name}")
        if name == table and update:
            granted.append(_grant_update(conn, target, who, update, f"{schema}.{name}"))
    return granted


def _grant_update(conn: psycopg.Connection[Any], target: sql.Identifier, who: sql.Identifier,
                  update: tuple[str, ...], name: str) -> str:
    """UPDATE of the `update` columns; of the whole table where the columns cannot take a grant
    of their own: TimescaleDB hands a hypertable's grants on to its compressed hypertable, whose
    columns have other names (42703), so there only the table-wide privilege works."""
    try:
        with conn.transaction():  # a savepoint: the fallback runs in the caller's transaction
            conn.execute(sql.SQL("GRANT UPDATE ({}) ON {} TO {}").format(
                sql.SQL(", ").join(map(sql.Identifier, update)), target, who))
        return f"UPDATE ({', '.join(update)}) on {name}"
    except psycopg.errors.UndefinedColumn:
        conn.execute(sql.SQL("GRANT UPDATE ON {} TO {}").format(target, who))
        return f"UPDATE on {name} (TimescaleDB: column grants do not reach compressed chunks)"
