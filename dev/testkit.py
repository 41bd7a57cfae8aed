"""Helpers over the real local Kafka and PostgreSQL: topics, producing, reading what landed.

Used by tests/, chaos_tests/ and bench/.  Nothing here fakes a broker or a database.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]  # missing from the stub

from dev import services
from sink.model import COLUMNS
from sink.produce import produce_waiting
from sink.settings import Settings

ROOT = services.ROOT
T = TypeVar("T")


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def closed_port() -> int:
    """A local port nothing listens on (bound for a moment, closed again): one to bind a server
    to, or one a client is refused on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- Kafka


def admin(bootstrap: str | None = None) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap or services.KAFKA_BOOTSTRAP})


def create_topic(name: str, partitions: int = 3, bootstrap: str | None = None, timeout: float = 30,
                 replication_factor: int = 1) -> str:
    adm = admin(bootstrap)  # keep a reference: a destroyed handle fails its futures
    futures = adm.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=replication_factor)])
    for fut in futures.values():
        fut.result(timeout=timeout)
    wait_topic_ready(name, partitions, bootstrap)
    return name


def wait_topic_ready(name: str, partitions: int, bootstrap: str | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    adm = admin(bootstrap)
    while time.monotonic() < deadline:
        md = adm.list_topics(name, timeout=5)
        t = md.topics.get(name)
        if t is not None and t.error is None and len(t.partitions) == partitions and all(
            p.leader >= 0 for p in t.partitions.values()
        ):
            return
        time.sleep(0.1)
    raise TimeoutError(f"topic {name} not ready")


def delete_topics(names: Iterable[str], bootstrap: str | None = None) -> None:
    names = list(names)
    if not names:
        return
    adm = admin(bootstrap)
    for fut in adm.delete_topics(names, operation_timeout=10).values():
        with contextlib.suppress(Exception):
            fut.result(timeout=15)


def producer(bootstrap: str | None = None, **extra: Any) -> Producer:
    conf = {"bootstrap.servers": bootstrap or services.KAFKA_BOOTSTRAP, "linger.ms": 5,
            "enable.idempotence": True, **extra}
    return Producer(conf)


@dataclass(frozen=True)
class Sent:
    """Where one produced record landed."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def produce(
    topic: str,
    values: Iterable[bytes | Mapping[str, Any] | None],
    *,
    partition: int | None = None,
    keys: Iterable[bytes | None] | None = None,
    headers: list[tuple[str, bytes]] | None = None,
    bootstrap: str | None = None,
) -> list[Sent]:
    """Produce records (dicts become JSON) and wait for every ack; returns their positions."""
    p = producer(bootstrap)
    sent: list[Sent] = []
    errors: list[Any] = []

    def on_ack(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(err)
        else:
            sent.append(Sent(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value()))

    key_iter: Iterator[bytes | None] = iter(keys) if keys is not None else iter(lambda: None, 0)
    for v in values:
        data = json.dumps(v).encode() if isinstance(v, Mapping) else v
        kw: dict[str, Any] = {"value": data, "key": next(key_iter), "on_delivery": on_ack}
        if partition is not None:
            kw["partition"] = partition
        if headers:
            kw["headers"] = headers
        produce_waiting(p, topic, **kw)
        p.poll(0)
    remaining = p.flush(60)
    if remaining or errors:
        raise RuntimeError(f"produce failed: {remaining} unacked, errors={errors[:3]}")
    return sent


@dataclass
class ConsumedRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes] = field(default_factory=dict)
    timestamp_ms: int | None = None


def read_all(topic: str, *, bootstrap: str | None = None, timeout: float = 10.0) -> list[ConsumedRecord]:
    """Every committed record of a topic, from the beginning to the end offsets as of now."""
    ends = end_offsets(topic, bootstrap=bootstrap)
    want = {p: o for p, o in ends.items() if o > 0}
    c = Consumer({"bootstrap.servers": bootstrap or services.KAFKA_BOOTSTRAP,
                  "group.id": unique_name("reader"), "enable.auto.commit": False,
                  "isolation.level": "read_committed", "enable.partition.eof": True})
    out: list[ConsumedRecord] = []
    try:
        if not want:
            return out
        c.assign([TopicPartition(topic, p, 0) for p in want])
        done: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(done) < len(want) and time.monotonic() < deadline:
            msgs: list[Any] = c.consume(500, 0.5)  # Any: the stub types every field Optional
            for m in msgs:
                if m.error():
                    if m.error().code() == -191:  # _PARTITION_EOF
                        done.add(m.partition())
                        continue
                    raise KafkaException(m.error())
                out.append(ConsumedRecord(m.topic(), m.partition(), m.offset(), m.key(), m.value(),
                                          dict(m.headers() or []), m.timestamp()[1]))
                if m.offset() >= want[m.partition()] - 1:
                    done.add(m.partition())
        if len(done) < len(want):
            raise TimeoutError(f"read_all({topic}) did not reach the end offsets in {timeout}s")
    finally:
        c.close()
    return out


def end_offsets(topic: str, *, bootstrap: str | None = None) -> dict[int, int]:
    """High watermarks (next offset to be written) per partition."""
    c = Consumer({"bootstrap.servers": bootstrap or services.KAFKA_BOOTSTRAP, "group.id": unique_name("wm")})
    try:
        md = c.list_topics(topic, timeout=10)
        out = {}
        for p in md.topics[topic].partitions:
            _, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            out[p] = high
        return out
    finally:
        c.close()


def wait_drained(group: str, topic: str, timeout: float = 60, *, bootstrap: str | None = None) -> dict[int, int]:
    """Wait until the group's committed offsets reach the topic's end in every partition that
    holds records; returns those ends."""
    ends = {p: o for p, o in end_offsets(topic, bootstrap=bootstrap).items() if o > 0}
    wait_for(lambda: committed_offsets(group, topic, bootstrap=bootstrap) == ends, timeout,
             what=f"{group}'s commits up to the end of {topic} {ends}")
    return ends


def covered_offsets(committed: Iterable[Mapping[str, Any]]) -> dict[int, int]:
    """Next offset per partition covered by a sink's batch_committed log lines (their
    ``offsets`` = {"<partition>": [first, last]}, inclusive ranges)."""
    out: dict[int, int] = {}
    for e in committed:
        for p, (_, last) in e.get("offsets", {}).items():
            out[int(p)] = max(out.get(int(p), 0), int(last) + 1)
    return out


def committed_offsets(group: str, topic: str, *, bootstrap: str | None = None) -> dict[int, int]:
    """The group's committed offsets per partition (missing = nothing committed)."""
    c = Consumer({"bootstrap.servers": bootstrap or services.KAFKA_BOOTSTRAP, "group.id": group,
                  "enable.auto.commit": False})
    try:
        md = c.list_topics(topic, timeout=10)
        tps = [TopicPartition(topic, p) for p in md.topics[topic].partitions]
        deadline = time.monotonic() + 30
        while True:
            try:
                res = c.committed(tps, timeout=10)
                return {tp.partition: tp.offset for tp in res if tp.offset >= 0}
            except KafkaException as e:
                # Right after a broker restart the group coordinator is still loading.
                err = e.args[0] if e.args else None
                if err is None or (not err.retriable() and err.code() not in _COORDINATOR_LOADING) \
                        or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        c.close()


_COORDINATOR_LOADING = frozenset({KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                                  KafkaError.COORDINATOR_NOT_AVAILABLE})


# --------------------------------------------------------------------------- PostgreSQL


# The suites write fixed timestamps from 2023: on TimescaleDB the default 90-day retention policy
# would (rightly) drop them while a test runs.  The TimescaleDB suite tests the policies itself.
SERVER_SETTINGS: dict[str, str] = {"timescale_retention": "off"} if services.TIMESCALEDB else {}


def db_settings(schema: str, **overrides: Any) -> Settings:
    """The sink's settings for the local database server under test and ``schema``."""
    values: dict[str, Any] = {
        "timescale_host": "127.0.0.1", "timescale_port": services.PG_PORT, "timescale_db": services.PG_DB,
        "timescale_user": services.PG_USER, "timescale_password": services.PG_PASSWORD,
        "timescale_schema": schema, **SERVER_SETTINGS, **overrides,
    }
    return Settings(**values)


def connect(schema: str | None = None, *, autocommit: bool = True, db: str | None = None) -> psycopg.Connection[Any]:
    opts = f" options='-c search_path={schema},public'" if schema else ""
    return psycopg.connect(services.conninfo(db=db) + opts, autocommit=autocommit)


# The database dev/demo and `services.py env` use; the test suite works in one of its own.
CONFIGURED_DB = services.PG_DB
SUITE_DB_PREFIX = "sink_test_"


def open_suite_database() -> str:
    """Create a fresh database for this test session and point every helper here, and every sink
    the tests start (services.service_env), at it: whatever dev/demo, an earlier run or a
    developer left in the configured database (a migrated `public` above all) cannot reach the
    tests, nor the tests it.  Databases of sessions that died without dropping theirs go first."""
    listed = services.psql_admin(f"SELECT datname FROM pg_database WHERE datname LIKE '{SUITE_DB_PREFIX}%'",
                                 db="postgres")
    for stale in listed.split():
        pid = stale.removeprefix(SUITE_DB_PREFIX)
        # Named after the session's pid: a live one belongs to a session running beside this one.
        if not pid.isdigit() or int(pid) == os.getpid() or not services.pid_alive(int(pid)):
            drop_database(stale)
    name = create_database(f"{SUITE_DB_PREFIX}{os.getpid()}")
    services.PG_DB = name
    return name


def close_suite_database(name: str) -> None:
    """Drop the session's database (sessions a test left open are ended) and point back at the
    configured one."""
    services.PG_DB = CONFIGURED_DB
    drop_database(name)


def create_database(name: str) -> str:
    """An empty database owned by the sink's role."""
    services.psql_admin(f'CREATE DATABASE "{name}" OWNER "{services.PG_USER}"', db="postgres")
    return name


def drop_database(name: str) -> None:
    """Drop a database, ending the sessions still connected to it."""
    services.psql_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', db="postgres")


def create_schema(name: str) -> str:
    with connect() as conn:
        conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{name}"')
    return name


def drop_schema(name: str) -> None:
    with connect() as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def rows(schema: str, order: str = "device_id, timestamp, connector_mode, component_type, pin_position") -> list[
    tuple[Any, ...]
]:
    """The model's columns of every row (not source_version: what the sink wrote, not how)."""
    columns = ", ".join(f'"{c}"' for c in COLUMNS)
    with connect(schema) as conn:
        return conn.execute(f"SELECT {columns} FROM iot_measurements ORDER BY {order}").fetchall()


def wait_table(schema: str, timeout: float = 60) -> None:
    """Wait until the sink's migrations created iot_measurements in `schema`."""

    def exists() -> bool:
        with connect(schema) as conn:
            row = conn.execute("SELECT to_regclass('iot_measurements') IS NOT NULL").fetchone()
            return bool(row and row[0])

    wait_for(exists, timeout, what="iot_measurements created by the sink's migrations")


def row_count(schema: str) -> int:
    with connect(schema) as conn:
        row = conn.execute("SELECT count(*) FROM iot_measurements").fetchone()
        return int(row[0]) if row else 0


# --------------------------------------------------------------------------- the sink as a process


def sink_env(schema: str, topic: str, group: str, **overrides: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "TIMESCALE_", "BATCH_"))}
    env.update(services.service_env())
    env.update({
        "KAFKA_INPUT_TOPIC": topic,
        "KAFKA_GROUP_ID": group,
        "TIMESCALE_SCHEMA": schema,
        "BATCH_SIZE": "200",
        "BATCH_TIMEOUT": "0.3",
        "RETRY_INITIAL_BACKOFF": "0.2",
        "RETRY_MAX_BACKOFF": "2",
        "LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
        **{k.upper(): v for k, v in SERVER_SETTINGS.items()},
    })
    env.update({k.upper(): str(v) for k, v in overrides.items()})
    return env


class SinkProcess:
    """The real service (`python -m sink run`) as a child process, with its JSON log captured."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SinkProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.proc = subprocess.Popen([sys.executable, "-m", "sink", "run"], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, cwd=ROOT)
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def stop_once_committed(self, group: str, topic: str, offsets: Mapping[int, int],
                            timeout: float = 60) -> SinkProcess:
        """Wait until the group's committed offsets on topic are exactly `offsets`, then stop
        the sink cleanly (exit 0 asserted); it is killed instead if either fails."""
        try:
            wait_for(lambda: committed_offsets(group, topic) == offsets, timeout,
                     what=f"offsets {dict(offsets)} committed")
            assert self.stop() == 0
        finally:
            if self.alive():
                self.kill()
        return self

    def events(self) -> list[dict[str, Any]]:
        out = []
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue
        except FileNotFoundError:
            pass
        return out

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def wait_for(predicate: Any, timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    """Poll until predicate() is truthy; returns its value or raises TimeoutError."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last={last!r})")


def call_bounded(fn: Callable[[], T], limit: float, what: str,
                 serve: Callable[[], object] | None = None) -> T | BaseException:
    """fn() in a daemon thread: its result, or the exception it raised.  Fails the test (`what`)
    if it has not returned in `limit` seconds, so a call that hangs cannot hang the test.
    `serve` is called over and over meanwhile (e.g. a consumer's poll, which must go on)."""
    out: list[T | BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # handed to the caller's assertions
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    t.start()
    while serve is not None and t.is_alive() and time.monotonic() - t0 < limit:
        serve()
    t.join(timeout=max(0.0, limit - (time.monotonic() - t0)))
    assert out, what
    return out[0]
