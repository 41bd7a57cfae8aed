"""The test suite runs in a database of its own: what dev/demo, an earlier run or a developer
left in the configured database can neither break the tests nor be touched by them."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from dev import services, testkit

pytestmark = pytest.mark.integration

# Tests that wrote into the demo's table, or failed on its constraints, when they shared its database.
ISOLATED = ["tests/test_migrations.py", "tests/test_writer.py",
            "tests/test_sink_integration.py::test_row_violating_an_added_constraint_goes_alone_to_dlq"]


def test_the_session_works_in_its_own_database_not_the_configured_one(infra: None) -> None:
    with testkit.connect() as conn:
        row = conn.execute("SELECT current_database()").fetchone()
    assert row == (services.PG_DB,)
    assert services.PG_DB == f"{testkit.SUITE_DB_PREFIX}{os.getpid()}" != testkit.CONFIGURED_DB
    assert services.service_env()["TIMESCALE_DB"] == services.PG_DB  # what the sinks the tests start use


# Every CREATE/ALTER/DROP in the database, by anyone, lands in public.ddl_seen: a test that
# created its schema there and dropped it again would leave no other trace.
RECORD_DDL = """
CREATE TABLE public.ddl_seen (tag text, identity text);
GRANT SELECT ON public.ddl_seen TO PUBLIC;
CREATE FUNCTION public.record_ddl() RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    INSERT INTO public.ddl_seen SELECT command_tag, object_identity FROM pg_event_trigger_ddl_commands();
END $$;
CREATE EVENT TRIGGER record_ddl ON ddl_command_end EXECUTE FUNCTION public.record_ddl();
"""


def snapshot(database: str) -> dict[str, Any]:
    """What a demo leaves in a database (schemas, its table's rows and constraints), and the DDL
    anyone ran there since."""
    with testkit.connect(db=database) as conn:
        schemas = [r[0] for r in conn.execute("SELECT nspname FROM pg_namespace ORDER BY 1")]
        rows = conn.execute("SELECT count(*), max(value) FROM public.iot_measurements").fetchone()
        checks = [r[0] for r in conn.execute(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'public.iot_measurements'::regclass ORDER BY 1")]
        ddl = conn.execute("SELECT tag, identity FROM public.ddl_seen ORDER BY 1, 2 LIMIT 5").fetchall()
    return {"schemas": schemas, "rows": rows, "constraints": checks, "ddl": ddl}


def test_a_demo_migrated_public_neither_breaks_the_suite_nor_is_touched_by_it(infra: None) -> None:
    # The configured database as dev/demo leaves it: public migrated and filled, plus the kind of
    # CHECK constraint the tests add to their own tables.
    demo_db = testkit.create_database(testkit.unique_name("demo"))
    try:
        env = {**testkit.sink_env("public", "unused", "unused"), "TIMESCALE_DB": demo_db}
        migrated = subprocess.run([sys.executable, "-m", "sink", "migrate"], env=env, cwd=testkit.ROOT,
                                  capture_output=True, text=True, timeout=120)
        assert migrated.returncode == 0, migrated.stdout[-2000:]
        with testkit.connect(db=demo_db) as conn:
            conn.execute("INSERT INTO public.iot_measurements SELECT now() - n * interval '1 s', 'demo', 'analog', "
                         "'temperature', 'A0', n, 'C', 'demo' FROM generate_series(1, 500) n")
            conn.execute("ALTER TABLE public.iot_measurements ADD CONSTRAINT demo_no_bad_unit CHECK (unit <> 'bad')")
        services.psql_admin(RECORD_DDL, db=demo_db)
        before = snapshot(demo_db)
        assert before["ddl"] == [] and before["rows"][0] == 500

        # A separate pytest session whose configured database is the demo's, as after `dev/demo`.
        child_env = {**os.environ, "TIMESCALE_DB": demo_db}
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ISOLATED],
                             env=child_env, cwd=testkit.ROOT, capture_output=True, text=True, timeout=600)

        assert run.returncode == 0, run.stdout[-4000:]
        assert " passed" in run.stdout.splitlines()[-1]
        assert snapshot(demo_db) == before
    finally:
        testkit.drop_database(demo_db)
