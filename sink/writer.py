"""The database writer: one transaction per batch, binary COPY into a staging table, then
``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` into the table, built from the model's fields
(WRITE_MODE=update: ``ON CONFLICT (primary key) DO UPDATE`` where something differs)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from operator import itemgetter
from typing import Any

import psycopg
from psycopg import sql

from sink.errors import FatalError, SinkError, classify_db_error
from sink.grants import missing_write_privileges
from sink.logs import get_logger
from sink.model import COLUMNS, PRIMARY_KEY, Row
from sink.settings import Settings
from sink.types import InsertTurn, WriteResult
from sink.upsert import IGNORE, VERSION_COLUMN, WriteMode, updated_columns

log = get_logger("sink.writer")
_INT4_OID = 23

TABLE = "iot_measurements"
STAGE = "_sink_stage"
ORD = "_sink_ord"  # the stage's extra column: each row's index in the batch
# A lock held on the table (or a stuck statement) must not block us for ever: the error is
# retryable (55P03 / 57014), and between attempts we keep polling Kafka to stay in the group.
# TimeZone UTC: RETURNING then yields datetimes in datetime.UTC, the zone of the model's rows, and
# matching returned keys against rows is a plain tuple comparison (with a ZoneInfo on one side,
# every comparison calls utcoffset() on both, several times slower).
# idle_in_transaction_session_timeout: if our end of a connection dies mid-transaction (NAT,
# load balancer), the server ends the orphaned session instead of holding its row locks (and
# failing every retry with a lock timeout) until TCP keepalive notices, hours later.
SESSION_SETTINGS = {"lock_timeout": "10s", "statement_timeout": "120s", "TimeZone": "UTC",
                    "idle_in_transaction_session_timeout": "20s"}


def insert_statement(table: sql.Identifier, columns: Sequence[str] = COLUMNS, pk: Sequence[str] = PRIMARY_KEY,
                     stage: str = STAGE) -> sql.Composed:
    """INSERT ... SELECT ... ON CONFLICT DO NOTHING RETURNING <primary key>, from the columns.

    ORDER BY the batch index: rows are inserted, and come back, in batch order (a plain scan of
    the stage is not: COPY fills gaps left on earlier pages).  So of two rows with one key the
    first wins, and classify_duplicates can walk the returned keys instead of hashing them."""
    cols = sql.SQL(", ").join(map(sql.Identifier, columns))
    return sql.SQL(
        "INSERT INTO {table} ({cols}) SELECT {cols} FROM {stage} ORDER BY {ord} "
        "ON CONFLICT DO NOTHING RETURNING {pk}"
    ).format(table=table, cols=cols, stage=sql.Identifier(stage), ord=sql.Identifier(ORD),
             pk=sql.SQL(", ").join(map(sql.Identifier, pk)))


def upsert_statement(table: sql.Identifier, columns: Sequence[str], pk: Sequence[str] = PRIMARY_KEY,
                     stage: str = STAGE) -> sql.Composed:
    """INSERT ... ON CONFLICT (primary key) DO UPDATE of the other columns, only where they differ
    (an identical redelivery writes nothing: no dead tuple, no WAL) and, with source_version
    among the columns, only where the incoming version is not older than the stored one.
    RETURNING the key and whether the row is new (xmax = 0: no earlier version of the row)."""
    ident = sql.Identifier
    others = [c for c in columns if c not in pk]
    cols = sql.SQL(", ").join(map(ident, columns))
    target = sql.SQL(", ").join(map(ident, pk))
    assign = sql.SQL(", ").join(sql.SQL("{c} = EXCLUDED.{c}").format(c=ident(c)) for c in others)
    mine = sql.SQL(", ").join(sql.SQL("t.{}").format(ident(c)) for c in others)
    theirs = sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(ident(c)) for c in others)
    where = sql.SQL("({mine}) IS DISTINCT FROM ({theirs})").format(mine=mine, theirs=theirs)
    if VERSION_COLUMN in others:
        where = sql.SQL("{where} AND (t.{v} IS NULL OR EXCLUDED.{v} IS NULL OR EXCLUDED.{v} >= t.{v})").format(
            where=where, v=ident(VERSION_COLUMN))
    return sql.SQL(
        "INSERT INTO {table} AS t ({cols}) SELECT {cols} FROM {stage} ORDER BY {ord} "
        "ON CONFLICT ({target}) DO UPDATE SET {assign} WHERE {where} "
        "RETURNING {pk}, (t.xmax = 0)"
    ).format(table=table, cols=cols, stage=ident(stage), ord=ident(ORD), target=target, assign=assign,
             where=where, pk=sql.SQL(", ").join(sql.SQL("t.{}").format(ident(c)) for c in pk))


def classify_upserts(rows: Sequence[Row], returned: Sequence[tuple[Any, ...]], pk_index: Sequence[int]) -> WriteResult:
    """upsert_statement's outcome per input row: returned rows were inserted (last field true) or
    updated; the rest changed nothing (counted, and indexed, as duplicates)."""
    result = classify_duplicates(rows, [r[:-1] for r in returned], pk_index)
    is_new = {r[:-1]: r[-1] for r in returned}  # one row per key: the batch was deduplicated
    key_of = _key_function(pk_index)
    unchanged = set(result.duplicate_indexes)
    updated = tuple(i for i, row in enumerate(rows) if i not in unchanged and not is_new[key_of(row)])
    return replace(result, inserted=len(returned) - len(updated), updated=len(updated), updated_indexes=updated)


def classify_duplicates(rows: Sequence[Row], returned: Sequence[tuple[Any, ...]],
                        pk_index: Sequence[int]) -> WriteResult:
    """Which input rows were new: the first row of each returned key; the rest were duplicates.

    Returned keys in row order (insert_statement's ORDER BY) are matched in one walk; any other
    order falls back to counting keys in a dict.  A batch whose rows all came back never gets
    here: PgWriter.write() sees that in the row count and fetches no keys."""
    keys = list(map(_key_function(pk_index), rows))
    dups = _in_order_duplicates(keys, returned)
    if dups is not None:
        return WriteResult(inserted=len(rows) - len(dups), duplicates=len(dups), duplicate_indexes=tuple(dups))
    remaining: dict[tuple[Any, ...], int] = {}
    for key in returned:
        remaining[key] = remaining.get(key, 0) + 1
    dups = []
    for i, key in enumerate(keys):
        n = remaining.get(key, 0)
        if n:
            remaining[key] = n - 1
        else:
            dups.append(i)
    return WriteResult(inserted=len(rows) - len(dups), duplicates=len(dups), duplicate_indexes=tuple(dups))


def _key_function(pk_index: Sequence[int]) -> Callable[[Row], tuple[Any, ...]]:
    """Row -> its key as a tuple (as RETURNING gives it back), for a key of one column too."""
    if len(pk_index) > 1:
        return itemgetter(*pk_index)
    return lambda row: (row[pk_index[0]],)


def _in_order_duplicates(keys: Sequence[tuple[Any, ...]], returned: Sequence[tuple[Any, ...]]) -> list[int] | None:
    """Indexes of the rows that did not come back, if the returned keys are the rows' keys in
    row order; None when they are not (then the caller hashes: for ~2,500 fresh datetimes per
    batch that costs several times this walk)."""
    dups: list[int] = []
    j, n = 0, len(returned)
    for i, key in enumerate(keys):
        if j < n and key == returned[j]:
            j += 1
        else:
            dups.append(i)
    return dups if j == n else None


class PgWriter:
    """Owns one connection; reconnects on the next call after a connection-class failure.

    Writes ``schema.table``, always qualified: the search path never picks another schema's table."""

    def __init__(self, conninfo: str, schema: str, columns: Sequence[str] = COLUMNS, pk: Sequence[str] = PRIMARY_KEY,
                 table: str = TABLE, mode: WriteMode = IGNORE) -> None:
        self._conninfo = conninfo
        self.mode = mode
        # Versioned updates: rows carry their version as one more field (sink/upsert.py).
        self.columns = (*columns, VERSION_COLUMN) if mode.versioned else tuple(columns)
        self.pk = tuple(pk)
        self.schema = schema
        self.table = f"{schema}.{table}"  # for messages and logs
        self._table_name = table
        self._table = sql.Identifier(schema, table)
        self._pk_index = tuple(self.columns.index(c) for c in self.pk)
        self._conn: psycopg.Connection[Any] | None = None
        self._copy_sql = sql.SQL("COPY {stage} ({cols}) FROM STDIN (FORMAT BINARY)").format(
            stage=sql.Identifier(STAGE), cols=sql.SQL(", ").join(map(sql.Identifier, (*self.columns, ORD))))
        self._insert_sql = (upsert_statement(self._table, self.columns, self.pk) if mode.update
                            else insert_statement(self._table, self.columns, self.pk))
        self._types: list[int] = []

    @classmethod
    def from_settings(cls, settings: Settings) -> PgWriter:
        return cls(settings.conninfo(), settings.timescale_schema,
                   mode=WriteMode.from_settings(settings))

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    def connect(self) -> None:
        """Connect and prepare the staging table; raises classified errors."""
        if self.connected:
            return
        try:
            # prepare_threshold=None: psycopg would prepare the INSERT on its 6th run on a
            # connection, as a round trip of its own before the execution.  Unprepared, every
            # statement reaches the server whole, in one message: a connection that dies while
            # its INSERT waits on a lock leaves a session that runs the INSERT, not one stuck
            # after a PREPARE.  Parsing and planning it each batch costs ~0.16 ms (statement log).
            conn = psycopg.connect(self._conninfo, autocommit=False, prepare_threshold=None)
        except psycopg.Error as e:
            raise classify_db_error(e, "db_connect") from e
        try:
            with conn.cursor() as cur:
                for name, value in SESSION_SETTINGS.items():
                    cur.execute(sql.SQL("SELECT set_config({}, {}, false)").format(name, value))
                self._check_privileges(conn)
                self._types = [*self._column_types(cur), _INT4_OID]  # + the stage's ORD
                # LIKE copies column types (and NOT NULL) but no other constraint: checks and
                # uniqueness are the table's job, so poison rows fail in the INSERT and not here.
                cur.execute(sql.SQL(
                    "CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table} INCLUDING DEFAULTS, {ord} int4) "
                    "ON COMMIT DELETE ROWS").format(stage=sql.Identifier(STAGE), table=self._table,
                                                    ord=sql.Identifier(ORD)))
            conn.commit()
        except psycopg.Error as e:
            conn.close()
            raise classify_db_error(e, "db_connect") from e
        except FatalError:
            conn.close()
            raise
        self._conn = conn
        log.info("db_connected", table=self.table)

    def _check_privileges(self, conn: psycopg.Connection[Any]) -> None:
        # Asked of the catalog before the first write: each missing privilege is named, with its
        # GRANT, instead of the server's "permission denied for table" on the first batch.
        missing = missing_write_privileges(conn, self.schema, self._table_name, updated_columns(self.mode))
        if missing:
            raise FatalError(f"role {missing[0].role} lacks {', '.join(map(str, missing))}: "
                             f"{' '.join(m.grant for m in missing)} (as the owner; or run `kafka-timescale-sink "
                             "migrate` with TIMESCALE_WRITER_ROLE naming this role; see docs/security.md)")

    def _column_types(self, cur: psycopg.Cursor[Any]) -> list[int]:
        cur.execute(
            "SELECT a.attname, a.atttypid FROM pg_attribute a "
            "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped",
            (self._table.as_string(cur),),
        )
        found = dict(cur.fetchall())
        if not found:
            raise FatalError(f"table {self.table} does not exist: run the migrations (kafka-timescale-sink migrate)")
        missing = [c for c in self.columns if c not in found]
        if missing:
            raise FatalError(f"table {self.table} lacks column(s) {missing} of the model: a migration is missing")
        return [int(found[c]) for c in self.columns]

    def write(self, rows: Sequence[Row], turn: InsertTurn | None = None) -> WriteResult:
        """Write rows in one transaction.  Raises RetryableError, PoisonError or FatalError.

        With a turn (the write stage's, batches written side by side) the INSERT waits for it
        after the COPY into the stage, and passes it on once it succeeded (before the commit)."""
        if not rows:
            return WriteResult(0, 0)
        self.connect()
        conn = self._conn
        assert conn is not None
        try:
            with conn.cursor() as cur:
                with cur.copy(self._copy_sql) as copy:
                    copy.set_types(self._types)
                    for i, row in enumerate(rows):
                        copy.write_row((*row, i))
                if turn is not None:
                    turn.wait(self._keepalive)
                t0 = time.perf_counter()
                cur.execute(self._insert_sql, binary=True)
                insert_s = time.perf_counter() - t0
                if turn is not None:
                    turn.passed()
                # rowcount is the number of returned rows.  All of them: no repeats, nothing to
                # match (most batches outside the bench), and the keys are not turned into Python
                # objects (a quarter of the client's CPU per row of such a write).  Updates: the
                # rows say which were new.
                returned = None if cur.rowcount == len(rows) and not self.mode.update else cur.fetchall()
            conn.commit()
        except psycopg.Error as e:
            err = classify_db_error(e)
            self._after_failure(conn)
            raise err from e
        if returned is None:
            return WriteResult(inserted=len(rows), duplicates=0, insert_s=insert_s)
        classify = classify_upserts if self.mode.update else classify_duplicates
        return replace(classify(rows, returned, self._pk_index), insert_s=insert_s)

    def _keepalive(self) -> None:
        """A no-op statement in the open transaction, while write() waits for its turn: a batch
        waiting there for the one before it is idle in a transaction, and the server ends such a
        session after idle_in_transaction_session_timeout."""
        if self._conn is not None:
            self._conn.execute("SELECT 1")

    def _after_failure(self, conn: psycopg.Connection[Any]) -> None:
        if conn.closed or conn.broken:
            self.close()
            log.warning("db_disconnected", table=self.table)
            return
        try:
            conn.rollback()
        except psycopg.Error:
            self.close()

    def check(self) -> bool:
        """Is the database reachable?  Reconnects if needed; never raises (for /readyz when idle)."""
        try:
            self.connect()
            assert self._conn is not None
            self._conn.execute("SELECT 1")
            self._conn.rollback()
            return True
        except (psycopg.Error, SinkError):
            self.close()
            return False

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
