"""The two yardsticks, Kafka excluded: raw binary COPY (the ceiling) and the reference design.

Both write into a fresh copy of the sink's table (``LIKE ... INCLUDING ALL``: same columns,
primary key and indexes) in the same database the sink writes to.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from pydantic import ValidationError

from bench.procstat import cpu_seconds
from dev import services, testkit
from sink.model import COLUMNS, IotMeasurement, Row, as_row

TABLE = "iot_measurements"
_TYPES = ["timestamptz", "varchar", "varchar", "varchar", "varchar", "float8", "varchar", "varchar"]
# The reference design's statement (psycopg 2 runs its text: `_INSERT.as_string()`).
_INSERT = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT DO NOTHING").format(
    sql.Identifier(TABLE), sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
    sql.SQL(", ").join(sql.Placeholder() * len(COLUMNS)))


@dataclass(frozen=True)
class Timed:
    """How long one yardstick took for the whole input, and how many rows it wrote."""

    records: int  # input records (the same N the sink drains)
    rows: int  # rows written
    seconds: float
    cpu_s: float  # CPU seconds of this (client) process
    db_cpu_s: float  # CPU seconds of its PostgreSQL backend

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def fresh_table(template_schema: str, schema: str) -> str:
    """A new schema holding an empty copy of the template's iot_measurements."""
    testkit.create_schema(schema)
    with testkit.connect() as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(
            sql.Identifier(schema, TABLE), sql.Identifier(template_schema, TABLE)))
    return schema


def _timed(conn: psycopg.Connection[Any], records: int, work: Callable[[], None]) -> Timed:
    """Run `work` on the connection, clocked; then count the rows it wrote."""
    seconds, cpu, db = _clocked(conn.info.backend_pid, work)
    return Timed(records, _count(conn), seconds, cpu, db)


def _clocked(backend: int, work: Callable[[], None]) -> tuple[float, float, float]:
    """Wall time, client CPU and the CPU of PostgreSQL backend `backend` around `work`."""
    db0, cpu0, t0 = cpu_seconds(backend) or 0.0, time.process_time(), time.perf_counter()
    work()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return seconds, cpu, (cpu_seconds(backend) or db0) - db0


def _count(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(TABLE))).fetchone()
    return int(row[0]) if row else 0


def ceiling(schema: str, distinct_rows: Sequence[Row], records: int, batch_size: int, connections: int = 1) -> Timed:
    """Binary COPY of the valid, de-duplicated rows, one transaction per `batch_size` rows, over
    `connections` connections at once (batches dealt out in turn; as many as the sink writes with).

    No validation, no conflict handling: what the table takes at best from one Python client."""
    copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        sql.Identifier(TABLE), sql.SQL(", ").join(map(sql.Identifier, COLUMNS)))
    conns = [testkit.connect(schema, autocommit=False) for _ in range(connections)]
    starts = list(range(0, len(distinct_rows), batch_size))

    def copy_share(k: int) -> None:
        conn = conns[k]
        for i in starts[k::connections]:
            with conn.cursor() as cur, cur.copy(copy_sql) as copy:
                copy.set_types(_TYPES)
                for row in distinct_rows[i:i + batch_size]:
                    copy.write_row(row)
            conn.commit()

    def work() -> None:
        threads = [threading.Thread(target=copy_share, args=(k,)) for k in range(connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    try:
        backends = [c.info.backend_pid for c in conns]
        db0, cpu0, t0 = sum(cpu_seconds(b) or 0.0 for b in backends), time.process_time(), time.perf_counter()
        work()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        db = sum(cpu_seconds(b) or 0.0 for b in backends) - db0
        return Timed(records, _count(conns[0]), seconds, cpu, db)
    finally:
        for c in conns:
            c.close()


def reference(schema: str, values: Sequence[bytes], page_size: int = 100) -> Timed:
    """The design the sink replaces: validate each message on its own, then a plain INSERT of
    `page_size` rows (psycopg 2's execute_batch, ported to psycopg 3's executemany, which sends
    the page in one pipeline) and a commit per page.  ON CONFLICT DO NOTHING so that repeated
    messages do not abort the page."""
    with testkit.connect(schema, autocommit=False) as conn:

        def work() -> None:
            with conn.cursor() as cur:

                def write(page: list[Row]) -> None:
                    cur.executemany(_INSERT, page)
                    conn.commit()

                _validate_in_pages(values, page_size, write)

        return _timed(conn, len(values), work)


def _validate_in_pages(values: Sequence[bytes], page_size: int, write: Callable[[list[Row]], None]) -> None:
    """The reference design's loop: validate each message on its own, hand on full pages."""
    validate = IotMeasurement.model_validate_json
    page: list[Row] = []
    for value in values:
        try:
            page.append(as_row(validate(value)))
        except ValidationError:
            continue  # the reference design logs and skips
        if len(page) == page_size:
            write(page)
            page = []
    if page:
        write(page)


def reference_psycopg2(schema: str, values: Sequence[bytes], page_size: int = 100) -> Timed:
    """The reference design to the letter: psycopg 2's ``execute_batch`` (the page's statements
    joined into one query string, which the server parses and plans one by one) and a commit
    per page.  A calibration of `reference` above, which ports it to psycopg 3's pipelined
    ``executemany``; psycopg 2 is not a dependency of the project (``--psycopg2-reference``)."""
    try:
        pg2: Any = importlib.import_module("psycopg2")
        extras: Any = importlib.import_module("psycopg2.extras")
    except ImportError as e:
        raise SystemExit("--psycopg2-reference needs psycopg 2: .venv/bin/pip install psycopg2-binary "
                         "(or put it on PYTHONPATH); it is not a dependency of the project") from e
    insert = _INSERT.as_string()
    conn = pg2.connect(services.conninfo() + f" options='-c search_path={schema},public'")
    try:
        with conn.cursor() as cur:

            def write(page: list[Row]) -> None:
                extras.execute_batch(cur, insert, page, page_size=page_size)
                conn.commit()

            seconds, cpu, db = _clocked(conn.get_backend_pid(), lambda: _validate_in_pages(values, page_size, write))
    finally:
        conn.close()
    with testkit.connect(schema) as check:
        return Timed(len(values), _count(check), seconds, cpu, db)
