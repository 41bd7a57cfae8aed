"""The TimescaleDB suite: migrations, policies, the hourly aggregate and late data on a real
TimescaleDB (the local build, DEV_PG_FLAVOR=timescaledb; dev/test runs it where one is built)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from structlog.testing import capture_logs

from dev import testkit
from sink import timescale
from sink.migrations import MigrationError, migrate
from sink.settings import Settings
from sink.timescale import HOURLY_VIEW, TABLE
from sink.upsert import WriteMode
from sink.writer import PgWriter

pytestmark = [pytest.mark.integration, pytest.mark.timescaledb]

DEFAULTS = {"timescale_retention": "90 days"}  # the shipped policies, not the suites' retention off
NOW = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)


def settings(schema: str, **overrides: Any) -> Settings:
    return testkit.db_settings(schema, **{**DEFAULTS, **overrides})


def jobs(schema: str) -> dict[str, dict[str, Any]]:
    """proc_name -> config of the schema's policy jobs (the refresh job is the view's)."""
    with testkit.connect() as conn:
        found = conn.execute(
            "SELECT proc_name, config, schedule_interval FROM timescaledb_information.jobs"
            " WHERE hypertable_schema = %s",
            [schema],
        ).fetchall()
    by_proc: dict[str, dict[str, Any]] = {}
    for proc, config, every in found:
        assert proc not in by_proc, f"two {proc} jobs in {schema}"
        by_proc[proc] = {**config, "schedule_interval": every}
    return by_proc


def job_id(schema: str, proc: str) -> int:
    with testkit.connect() as conn:
        row = conn.execute("SELECT job_id FROM timescaledb_information.jobs WHERE hypertable_schema = %s"
                           " AND proc_name = %s", [schema, proc]).fetchone()
    assert row is not None, f"no {proc} job in {schema}"
    return int(row[0])


def run_job(schema: str, proc: str) -> None:
    """Run a policy now, in this session (after any run the scheduler started before it was paused)."""

    def ran() -> bool:
        try:
            with testkit.connect() as conn:
                conn.execute("CALL run_job(%s)", [job_id(schema, proc)])
            return True
        except psycopg.errors.LockNotAvailable:  # "due to a concurrent refresh"
            return False

    testkit.wait_for(ran, timeout=30, what=f"{proc} run in {schema}")


def pause_jobs(schema: str) -> None:
    """The scheduler starts a new policy at once: tests that run policies themselves pause them."""
    with testkit.connect() as conn:
        conn.execute("SELECT alter_job(job_id, scheduled => false) FROM timescaledb_information.jobs"
                     " WHERE hypertable_schema = %s", [schema])


def hourly_total(schema: str) -> int:
    with testkit.connect() as conn:
        row = conn.execute(f'SELECT coalesce(sum(measurements), 0) FROM "{schema}"."{HOURLY_VIEW}"').fetchone()
    return int(row[0]) if row else 0


def hours(start: datetime, n_hours: int, per_hour: int, device: str = "dev") -> list[tuple[Any, ...]]:
    return [(start + timedelta(hours=h, minutes=m), f"{device}-{m % 3}", "analog", "temperature", "A0", float(m),
             "C", "t") for h in range(n_hours) for m in range(per_hour)]


@pytest.fixture
def writer(schema: str) -> Iterator[PgWriter]:
    s = settings(schema)
    migrate(s)
    pause_jobs(schema)
    w = PgWriter(s.conninfo(), schema)
    yield w
    w.close()


PROCS = {"policy_compression", "policy_retention", "policy_refresh_continuous_aggregate"}


def test_a_second_migrate_succeeds_and_changes_nothing(schema: str) -> None:
    migrate(settings(schema))
    before = jobs(schema)

    with capture_logs() as logs:
        report = migrate(settings(schema))

    assert report.applied == () and report.timescaledb
    assert jobs(schema) == before and set(before) == PROCS
    assert [e for e in logs if e["event"] == "timescale_policy_set"] == []


def test_replicas_migrating_together_all_start_and_leave_one_job_per_policy(infra: None) -> None:
    schema = testkit.unique_name("s")
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        try:
            barrier.wait(timeout=10)
            for _ in range(20):  # as the sink's start retries a lock not granted in time
                try:
                    migrate(settings(schema))
                    return
                except psycopg.errors.LockNotAvailable:
                    continue
            raise AssertionError("lock never granted")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        assert errors == []
        assert set(jobs(schema)) == PROCS
    finally:
        testkit.drop_schema(schema)


def test_changed_settings_are_reconciled_and_off_removes_a_policy(schema: str) -> None:
    migrate(settings(schema))

    with capture_logs() as logs:
        migrate(settings(schema, timescale_compress_after="off", timescale_retention="30 days",
                         timescale_cagg_refresh_interval="10 minutes", timescale_chunk_interval="6 hours"))

    found = jobs(schema)
    assert set(found) == {"policy_retention", "policy_refresh_continuous_aggregate"}
    assert found["policy_retention"]["drop_after"] == "30 days"
    refresh = found["policy_refresh_continuous_aggregate"]
    assert (refresh["start_offset"], refresh["schedule_interval"]) == ("29 days", timedelta(minutes=10))
    changed = {e["policy"]: e["value"] for e in logs if e["event"] == "timescale_policy_set"}
    assert changed == {"compression": "off", "retention": "30 days", "hourly_refresh": "10 minutes",
                       "chunk_interval": "6 hours"}
    with testkit.connect() as conn:
        row = conn.execute("SELECT time_interval FROM timescaledb_information.dimensions"
                           " WHERE hypertable_schema = %s AND hypertable_name = %s", [schema, TABLE]).fetchone()
    assert row == (timedelta(hours=6),)

    migrate(settings(schema, timescale_retention="off"))
    assert found != jobs(schema)
    assert jobs(schema)["policy_refresh_continuous_aggregate"]["start_offset"] is None  # all history
    assert "policy_retention" not in jobs(schema)


def test_a_rolled_back_reconciliation_reports_no_policy_change(schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    migrate(settings(schema))
    before = jobs(schema)
    real = timescale.reconcile

    def reconcile_then_fail(conn: Any, schema: str, p: Any) -> list[timescale.PolicyChange]:
        real(conn, schema, p)
        conn.execute("SELECT 1/0")  # the transaction fails after the policies changed
        raise AssertionError("unreachable")

    monkeypatch.setattr(timescale, "reconcile", reconcile_then_fail)
    with capture_logs() as logs, pytest.raises(MigrationError, match="division by zero"):
        migrate(settings(schema, timescale_retention="30 days"))

    assert [e for e in logs if e["event"] == "timescale_policy_set"] == []
    assert jobs(schema) == before


def test_history_older_than_a_week_stays_in_the_aggregate_when_the_policy_runs(writer: PgWriter,
                                                                                schema: str) -> None:
    rows = hours(NOW - timedelta(days=10), 24 * 10, 12)
    assert writer.write(rows).inserted == len(rows)
    assert hourly_total(schema) == len(rows)  # real-time aggregation, nothing materialized yet

    run_job(schema, "policy_refresh_continuous_aggregate")

    assert hourly_total(schema) == len(rows)


def test_a_backfill_older_than_a_week_reaches_the_aggregate_at_the_next_refresh(writer: PgWriter,
                                                                                schema: str) -> None:
    recent = hours(NOW - timedelta(days=2), 24 * 2, 6)
    writer.write(recent)
    run_job(schema, "policy_refresh_continuous_aggregate")
    backfill = hours(NOW - timedelta(days=20), 24, 6, device="buffered")  # below the watermark
    assert writer.write(backfill).inserted == len(backfill)

    run_job(schema, "policy_refresh_continuous_aggregate")

    assert hourly_total(schema) == len(recent) + len(backfill)


def test_late_rows_into_compressed_chunks_are_written_and_counted_right(writer: PgWriter, schema: str) -> None:
    old = hours(NOW - timedelta(days=5), 24 * 2, 30)
    writer.write(old)
    with testkit.connect() as conn:
        compressed = conn.execute(f"SELECT count(compress_chunk(c)) FROM show_chunks('\"{schema}\".{TABLE}') c"
                                  ).fetchone()
    assert compressed is not None and compressed[0] >= 2
    late_new = [(t + timedelta(seconds=1), *rest) for t, *rest in old[::2]]
    batch = [*old[1::2], *late_new]  # half already stored (in compressed chunks), half new
    # ON CONFLICT DO NOTHING checks conflicts in the compressed batches without decompressing
    # them (2.16+): a limit of one decompressed tuple per transaction does not stop it.
    conninfo = make_conninfo(settings(schema).conninfo(), options=f"-c search_path={schema},public"
                             " -c timescaledb.max_tuples_decompressed_per_dml_transaction=1")
    limited = PgWriter(conninfo, schema)
    try:
        result = limited.write(batch)
    finally:
        limited.close()

    assert (result.inserted, result.duplicates) == (len(late_new), len(old[1::2]))
    assert testkit.row_count(schema) == len(old) + len(late_new)


def test_corrections_into_compressed_chunks_update_the_rows_and_respect_the_version(writer: PgWriter,
                                                                                  schema: str) -> None:
    old = hours(NOW - timedelta(days=5), 24 * 2, 10)
    updating = PgWriter(settings(schema).conninfo(), schema, mode=WriteMode(update=True, versioned=True))
    try:
        updating.write([(*r, 100) for r in old])
        with testkit.connect() as conn:
            compressed = conn.execute(f"SELECT count(compress_chunk(c)) FROM show_chunks('\"{schema}\".{TABLE}') c"
                                      ).fetchone()
        assert compressed is not None and compressed[0] >= 2
        # Corrections of every other row, the rest redelivered as they were, and an older
        # version of a corrected row (a late replay): all of it into compressed chunks.
        corrected = [(*r[:5], r[5] + 1000, *r[6:], 200) for r in old[::2]]
        same = [(*r, 100) for r in old[1::2]]
        result = updating.write([*corrected, *same])
        assert (result.inserted, result.updated, result.duplicates) == (0, len(corrected), len(same))
        stale = updating.write([(*old[0], 150)])
        assert (stale.updated, stale.duplicates) == (0, 1)
    finally:
        updating.close()
    with testkit.connect() as conn:
        got = dict(conn.execute(f'SELECT timestamp, value FROM "{schema}".{TABLE} WHERE device_id = %s',
                                [old[0][1]]).fetchall())
    for r in old:
        if r[1] == old[0][1]:
            assert got[r[0]] == (r[5] + 1000 if r in old[::2] else r[5])
    assert testkit.row_count(schema) == len(old)


def test_the_scheduler_runs_every_policy_job_successfully(writer: PgWriter, schema: str) -> None:
    writer.write(hours(NOW - timedelta(days=3), 24 * 3, 4))
    ids = [job_id(schema, proc) for proc in sorted(PROCS)]
    with testkit.connect() as conn:
        for i in ids:
            conn.execute("SELECT alter_job(%s, scheduled => true, next_start => now())", [i])

    def all_succeeded() -> bool:
        with testkit.connect() as conn:
            stats = conn.execute("SELECT job_id, last_run_status, total_successes, total_failures"
                                 " FROM timescaledb_information.job_stats WHERE job_id = ANY(%s)", [ids]).fetchall()
        return len(stats) == len(ids) and all(s[1] == "Success" and s[2] >= 1 and s[3] == 0 for s in stats)

    testkit.wait_for(all_succeeded, timeout=60, what="every policy job run once by the scheduler")


def test_timescaledb_required_passes_for_an_ordinary_role(schema: str) -> None:
    with testkit.connect() as conn:
        role = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        assert role == (False,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SHOW shared_preload_libraries")  # why the probe reads pg_settings instead
        assert timescale.preloaded(conn)

    assert migrate(settings(schema, timescaledb_required=True)).timescaledb
