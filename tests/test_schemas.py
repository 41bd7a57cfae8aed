"""Several sink schemas in one database: each sink reads and writes only the objects of its own
TIMESCALE_SCHEMA, whatever other schemas (``public`` above all, on every search path) hold."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from dev import services, testkit
from sink.errors import FatalError
from sink.migrations import migrate
from sink.writer import PgWriter

pytestmark = [pytest.mark.integration, pytest.mark.both_servers]

T0 = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture
def database(infra: None) -> Iterator[str]:
    """A database of its own: this test needs ``public`` populated, which no other test may see."""
    services.start_postgres()
    name = testkit.create_database(testkit.unique_name("db"))
    try:
        yield name
    finally:
        testkit.drop_database(name)


def count(database: str, schema: str, table: str) -> int:
    with testkit.connect(db=database) as conn:
        row = conn.execute(f'SELECT count(*) FROM "{schema}"."{table}"').fetchone()
    return int(row[0]) if row else 0


def test_a_second_schema_gets_its_own_tables_and_rows_though_public_has_them(database: str) -> None:
    first = migrate(testkit.db_settings("public", timescale_db=database))
    second = migrate(testkit.db_settings("site_b", timescale_db=database))

    assert second.applied == first.applied != ()
    assert count(database, "site_b", "schema_migrations") == len(first.applied)
    settings = testkit.db_settings("site_b", timescale_db=database)
    writer = PgWriter(settings.conninfo(), settings.timescale_schema)
    rows = [(T0 + timedelta(seconds=i), "dev-1", "m", "c", "1", float(i), "u", "t") for i in range(50)]
    try:
        assert writer.write(rows).inserted == 50
    finally:
        writer.close()
    assert count(database, "site_b", "iot_measurements") == 50
    assert count(database, "public", "iot_measurements") == 0
    # Applying again finds site_b's own ledger, not public's.
    assert migrate(testkit.db_settings("site_b", timescale_db=database)).applied == ()


def test_writer_for_a_schema_without_the_table_fails_instead_of_writing_to_public(database: str) -> None:
    migrate(testkit.db_settings("public", timescale_db=database))
    settings = testkit.db_settings("site_c", timescale_db=database)
    with testkit.connect(db=database) as conn:
        conn.execute('CREATE SCHEMA "site_c"')
    writer = PgWriter(settings.conninfo(), "site_c")

    with pytest.raises(FatalError, match=r"table site_c\.iot_measurements does not exist"):
        writer.connect()
    assert count(database, "public", "iot_measurements") == 0
