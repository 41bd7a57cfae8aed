"""`kafka-timescale-sink check`: what would stop or hobble the sink, found before it starts.

Each check asks the real broker or database once, with a short timeout and no retries, and
says what it found; a problem also says what to do.  The sink would start only when there is
no problem (exit 0); notes (a group not created yet, migrations that the sink will apply)
do not count against it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import psycopg
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

from sink import timescale
from sink.catalog import relation_exists, scalar, schema_exists
from sink.errors import FatalError, SinkError, kafka_error, pg_message
from sink.grants import missing_write_privileges
from sink.kafka_auth import admin_metadata
from sink.migrations import MigrationError, load_migrations, recorded_migrations, sql_dir
from sink.outbox import transactional_id_prefix
from sink.settings import Settings
from sink.topics import DLQ_HEADROOM_BYTES, KAFKA_DEFAULT_MAX_MESSAGE_BYTES
from sink.upsert import WriteMode, updated_columns
from sink.writer import TABLE

Status = Literal["ok", "note", "problem"]
TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Finding:
    area: str  # kafka | postgresql
    check: str
    status: Status
    detail: str
    fix: str = ""


def run_checks(settings: Settings) -> list[Finding]:
    return [*kafka_checks(settings), *postgres_checks(settings)]


def would_start(findings: list[Finding]) -> bool:
    return not any(f.status == "problem" for f in findings)


# --------------------------------------------------------------------------- Kafka


def kafka_checks(s: Settings) -> list[Finding]:
    out: list[Finding] = []
    add = out.append
    conf: dict[str, Any] = s.kafka_client_config()
    try:
        admin, md = admin_metadata(s, "broker", TIMEOUT_S)
    except FatalError as e:  # a refused login or TLS setup: the message says what to check
        add(Finding("kafka", "broker", "problem", str(e), "see docs/security.md"))
        return out
    except SinkError as e:
        add(Finding("kafka", "broker", "problem", f"{s.kafka_bootstrap_servers} does not answer: {e}",
                    "check KAFKA_BOOTSTRAP_SERVERS, the network, and the KAFKA_SECURITY_PROTOCOL/KAFKA_SASL_* "
                    "settings"))
        return out
    add(Finding("kafka", "broker", "ok", f"{len(md.brokers)} broker(s) at {s.kafka_bootstrap_servers}"))

    topic = md.topics.get(s.kafka_input_topic)
    if topic is None or topic.error is not None:
        why = f" ({topic.error.str()})" if topic is not None and topic.error is not None else ""
        add(Finding("kafka", "input_topic", "problem", f"{s.kafka_input_topic} does not exist or is not "
                    f"readable{why}: the sink would start and read nothing",
                    f"create {s.kafka_input_topic}, fix KAFKA_INPUT_TOPIC, or grant Describe/Read on it"))
        partitions: list[int] = []
    else:
        partitions = sorted(topic.partitions)
        add(Finding("kafka", "input_topic", "ok", f"{s.kafka_input_topic}: {len(partitions)} partition(s)"))

    dlq = md.topics.get(s.dlq_topic)
    if dlq is not None and dlq.error is None:
        add(Finding("kafka", "dlq_topic", "ok", f"{s.dlq_topic}: {len(dlq.partitions)} partition(s)"))
    else:
        add(_dlq_creatable(admin, s, max(1, len(partitions))))

    if partitions:
        add(_group(conf, s, partitions))
    if s.kafka_transactional:
        add(_transactions(conf, s))
    return out


def _dlq_creatable(admin: Any, s: Settings, partitions: int) -> Finding:
    new = NewTopic(s.dlq_topic, num_partitions=s.kafka_dlq_partitions or partitions,
                   replication_factor=s.kafka_dlq_replication_factor,
                   config={"max.message.bytes": str(KAFKA_DEFAULT_MAX_MESSAGE_BYTES + DLQ_HEADROOM_BYTES)})
    try:
        admin.create_topics([new], validate_only=True)[s.dlq_topic].result(timeout=TIMEOUT_S)
    except KafkaException as e:
        return Finding("kafka", "dlq_topic", "problem", f"{s.dlq_topic} does not exist and could not be "
                       f"created: {_kafka(e)}", f"create {s.dlq_topic} or grant Create on it to the sink")
    return Finding("kafka", "dlq_topic", "note", f"{s.dlq_topic} does not exist; the sink will create it")


def _group(conf: dict[str, Any], s: Settings, partitions: list[int]) -> Finding:
    consumer = Consumer({**conf, "group.id": s.kafka_group_id, "enable.auto.commit": False})
    try:
        tps = [TopicPartition(s.kafka_input_topic, p) for p in partitions]
        committed = consumer.committed(tps, timeout=TIMEOUT_S)
        lag, none = 0, 0
        for tp in committed:
            _, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=TIMEOUT_S)
            if tp.offset < 0:
                none += 1
            else:
                lag += max(0, high - tp.offset)
    except KafkaException as e:
        return Finding("kafka", "group", "problem", f"group {s.kafka_group_id}: {_kafka(e)}",
                       f"grant Read on the group {s.kafka_group_id} (and Describe on the topic)")
    finally:
        consumer.close()
    if none == len(partitions):
        return Finding("kafka", "group", "note", f"group {s.kafka_group_id} has no committed offsets: it starts "
                       f"at the {s.kafka_auto_offset_reset} offsets (KAFKA_AUTO_OFFSET_RESET)")
    return Finding("kafka", "group", "ok", f"group {s.kafka_group_id}: lag {lag} record(s)"
                   + (f"; {none} partition(s) without a committed offset" if none else ""))


def _transactions(conf: dict[str, Any], s: Settings) -> Finding:
    # A transactional id of its own: fencing the running sink's would abort its transaction.
    tid = f"{transactional_id_prefix(s).rstrip('.')}.preflight"  # under the ACL prefix of the sink's ids
    producer = Producer({**conf, "transactional.id": tid})
    try:
        producer.init_transactions(TIMEOUT_S)
    except KafkaException as e:
        return Finding("kafka", "transactions", "problem", f"transactions cannot be used: {_kafka(e)}",
                       "grant Write on transactional ids (and IdempotentWrite), or KAFKA_TRANSACTIONAL=false")
    finally:
        producer.flush(0)
    return Finding("kafka", "transactions", "ok", "transactions can be used")


def _kafka(e: KafkaException) -> str:
    err: Any = kafka_error(e)
    return f"{err.name()}: {err.str()}" if hasattr(err, "name") else str(e)


# --------------------------------------------------------------------------- PostgreSQL


def postgres_checks(s: Settings) -> list[Finding]:
    out: list[Finding] = []
    add = out.append
    where = f"{s.timescale_host}:{s.timescale_port}/{s.timescale_db} as {s.timescale_user}"
    try:
        conn = psycopg.connect(s.conninfo(), autocommit=True, connect_timeout=min(s.timescale_connect_timeout, 10))
    except psycopg.Error as e:
        add(Finding("postgresql", "server", "problem", f"cannot connect to {where}: {pg_message(e)}",
                    "check TIMESCALE_HOST/PORT/DB/USER/PASSWORD, the network and pg_hba.conf"))
        return out
    with conn:
        version = conn.execute("SHOW server_version").fetchone()
        add(Finding("postgresql", "server", "ok", f"PostgreSQL {version[0] if version else '?'} at {where}"))
        try:
            # Checks only read: one read-only transaction, rolled back whatever they do.
            with conn.transaction(force_rollback=True):
                conn.execute("SET TRANSACTION READ ONLY")
                ts = _timescaledb(conn, s)
                add(ts)
                out.extend(_schema(conn, s, ts.status == "ok"))
        except psycopg.Error as e:
            add(Finding("postgresql", "schema", "problem",
                        f"reading schema {s.timescale_schema} failed: {pg_message(e)}",
                        f"grant {s.timescale_user} USAGE on the schema and SELECT on its tables"))
    return out


def _timescaledb(conn: psycopg.Connection[Any], s: Settings) -> Finding:
    try:
        ts = timescale.availability(conn)
    except timescale.TimescaleVersionError as e:
        return Finding("postgresql", "timescaledb", "problem", str(e), "ALTER EXTENSION timescaledb UPDATE")
    if ts.available:
        return Finding("postgresql", "timescaledb", "ok", f"TimescaleDB {ts.version}, preloaded")
    fix = "install TimescaleDB and add it to shared_preload_libraries"
    if s.timescaledb_required:
        return Finding("postgresql", "timescaledb", "problem", f"TIMESCALEDB_REQUIRED=true: {ts.reason}", fix)
    return Finding("postgresql", "timescaledb", "note", f"{ts.reason}: a plain table (no hypertable, compression, "
                   "retention or hourly aggregate)", fix)


def _schema(conn: psycopg.Connection[Any], s: Settings, timescaledb: bool) -> list[Finding]:
    schema = s.timescale_schema
    out: list[Finding] = []
    if not schema_exists(conn, schema):
        can = scalar(conn, "SELECT has_database_privilege(current_database(), 'CREATE')")
        if s.run_migrations and can:
            out.append(Finding("postgresql", "schema", "note", f"schema {schema} does not exist; migrations "
                               "will create it"))
        else:
            out.append(Finding("postgresql", "schema", "problem", f"schema {schema} does not exist"
                               + ("" if can else f" and {s.timescale_user} may not create it"),
                               f"create it (CREATE SCHEMA {schema} AUTHORIZATION ...) and run "
                               "`kafka-timescale-sink migrate` as its owner"))
        return out
    out.append(_migrations(conn, s, timescaledb))
    out.append(_privileges(conn, s))
    return out


def _migrations(conn: psycopg.Connection[Any], s: Settings, timescaledb: bool) -> Finding:
    schema = s.timescale_schema
    try:
        files = load_migrations(sql_dir())
    except MigrationError as e:
        return Finding("postgresql", "migrations", "problem", str(e), "fix the migrations directory")
    recorded = recorded_migrations(conn, schema)
    changed = [m.name for m in files if m.name in recorded and recorded[m.name] != m.checksum]
    if changed:
        return Finding("postgresql", "migrations", "problem", f"changed after they were applied: {', '.join(changed)}",
                       "restore the applied files; put a change in a new numbered file")
    # Without TimescaleDB the sink skips the migrations that need it: not pending, just off.
    pending = [m.name for m in files if m.name not in recorded and (timescaledb or not m.requires_timescaledb)]
    if not pending:
        return Finding("postgresql", "migrations", "ok", f"schema {schema}: {len(recorded)} applied, none pending")
    if s.run_migrations:
        return Finding("postgresql", "migrations", "note", f"schema {schema}: pending {', '.join(pending)}; "
                       "the sink applies them at start (RUN_MIGRATIONS=true)")
    return Finding("postgresql", "migrations", "problem", f"schema {schema}: pending {', '.join(pending)} and "
                   "RUN_MIGRATIONS=false", "run `kafka-timescale-sink migrate` with the migration role")


def _privileges(conn: psycopg.Connection[Any], s: Settings) -> Finding:
    schema, user = s.timescale_schema, s.timescale_user
    table = f"{schema}.{TABLE}"
    if not relation_exists(conn, schema, TABLE):
        if s.run_migrations:
            return Finding("postgresql", "privileges", "note", f"{table} does not exist yet; migrations create it")
        return Finding("postgresql", "privileges", "problem", f"{table} does not exist",
                       "run `kafka-timescale-sink migrate`")
    missing = missing_write_privileges(conn, schema, TABLE, updated_columns(WriteMode.from_settings(s)))
    if missing:
        return Finding("postgresql", "privileges", "problem", f"{user} lacks {', '.join(map(str, missing))}",
                       " ".join(m.grant for m in missing))
    return Finding("postgresql", "privileges", "ok", f"{user} may read and write {table}")


# --------------------------------------------------------------------------- output


def render_table(findings: list[Finding], write: Callable[[str], None]) -> None:
    width = max(len(f"{f.area} {f.check}") for f in findings)
    for f in findings:
        write(f"{f.status.upper():8} {f'{f.area} {f.check}':{width}}  {f.detail}")
        if f.fix and f.status != "ok":
            write(f"{'':8} {'':{width}}  -> {f.fix}")
    verdict = "the sink would start" if would_start(findings) else "the sink would NOT start (or would do nothing)"
    write(f"\n{sum(f.status == 'problem' for f in findings)} problem(s): {verdict}")


def render_json(findings: list[Finding]) -> str:
    return json.dumps({"would_start": would_start(findings), "checks": [asdict(f) for f in findings]}, indent=2)
