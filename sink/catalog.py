"""Questions to PostgreSQL's catalog, asked the same way by migrations, the TimescaleDB policies
and the preflight (names always schema-qualified: the search path must not answer)."""

from __future__ import annotations

from typing import Any

import psycopg


def scalar(conn: psycopg.Connection[Any], query: str, params: list[Any] | None = None) -> Any:
    """The first column of the first row, or None when there is no row."""
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def schema_exists(conn: psycopg.Connection[Any], schema: str) -> bool:
    return bool(scalar(conn, "SELECT to_regnamespace(%s) IS NOT NULL", [schema]))


def relation_exists(conn: psycopg.Connection[Any], schema: str, name: str) -> bool:
    return bool(scalar(conn, "SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL",
                       [schema, name]))
