"""Checks during the run that committed offsets never run ahead of the table and the DLQ.

For every committed offset o of partition p that the checker samples, every record of p below
o that should be a row must have its row in the table, and every record that should be in the
DLQ must be there.  The table is read *after* the offsets, so a row written after its offset
was committed cannot slip through a sample.  DLQ records become visible to read_committed
readers when the broker writes the transaction's markers, which may trail the offsets' by a
moment (longer if the broker dies in between, or an abandoned transaction of a SIGKILLed sink
holds the partition's last stable offset until it times out), so a missing DLQ record is
flagged only if it is still missing once the DLQ has been read to its stable end after
DLQ_GRACE seconds.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg
from confluent_kafka import Consumer, IsolationLevel, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import OffsetSpec  # type: ignore[attr-defined]  # exported at runtime, missing from the stub

from chaos_tests.ledger import Ledger, Produced
from dev import services, testkit
from sink.envelope import H_OFFSET, H_PARTITION, H_TOPIC

# The sink's transaction.timeout.ms (60 s) bounds how long an abandoned transaction can hide
# later DLQ records from read_committed readers; plus margin.
DLQ_GRACE = 75.0
OFFSET_INVALID = -1001


@dataclass(frozen=True, slots=True)
class DlqSeen:
    dlq_partition: int
    dlq_offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]

    def origin(self) -> tuple[str | None, int | None, int | None]:
        def text(name: str) -> str | None:
            v = self.headers.get(name)
            return None if v is None else v.decode("utf-8", "replace")

        def num(name: str) -> int | None:
            t = text(name)
            try:
                return None if t is None else int(t)
            except ValueError:
                return None

        return text(H_TOPIC), num(H_PARTITION), num(H_OFFSET)


class DlqReader:
    """Reads the DLQ topic incrementally as a read_committed consumer (no group, no commits)."""

    def __init__(self, dlq_topic: str) -> None:
        self.topic = dlq_topic
        self.records: list[DlqSeen] = []
        self.origins: Counter[tuple[int | None, int | None]] = Counter()
        self._c = Consumer({"bootstrap.servers": services.KAFKA_BOOTSTRAP, "log_level": 2,
                            "group.id": testkit.unique_name("dlqr"), "enable.auto.commit": False,
                            "isolation.level": "read_committed", "enable.partition.eof": True,
                            "auto.offset.reset": "earliest"})
        # A broker that has not yet heard of a just-created topic answers without its partitions
        # (on a cluster, another broker than the one that confirmed the topic): ask again.
        self.partitions: list[int] = testkit.wait_for(lambda: self._partitions(dlq_topic), 30,
                                                      what=f"metadata of {dlq_topic}")
        self._c.assign([TopicPartition(dlq_topic, p, 0) for p in self.partitions])
        self._at_eof: set[int] = set()
        self._lock = threading.Lock()

    def _partitions(self, topic: str) -> list[int]:
        t = self._c.list_topics(topic, timeout=10).topics.get(topic)
        return [] if t is None or t.error is not None else sorted(t.partitions)

    def drain(self, max_seconds: float = 3.0) -> bool:
        """Read what is visible; True when every partition reached its stable end."""
        with self._lock:
            deadline = time.monotonic() + max_seconds
            while time.monotonic() < deadline:
                msgs: list[Any] = self._c.consume(1000, 0.05)
                for m in msgs:
                    err = m.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            self._at_eof.add(m.partition())
                        continue
                    self._at_eof.discard(m.partition())
                    seen = DlqSeen(m.partition(), m.offset(), m.key(), m.value(), dict(m.headers() or []))
                    self.records.append(seen)
                    _, p, o = seen.origin()
                    self.origins[(p, o)] += 1
                if not msgs and len(self._at_eof) == len(self.partitions):
                    return True
            return False

    def stable(self) -> bool:
        """No open transaction on the DLQ: the last stable offset equals the high watermark on
        every partition, so a read_committed reader at its end has seen everything."""
        tps = [TopicPartition(self.topic, p) for p in self.partitions]
        lso = _list_offsets(tps, IsolationLevel.READ_COMMITTED)
        high = _list_offsets(tps, IsolationLevel.READ_UNCOMMITTED)
        return lso == high

    def describe(self) -> str:
        """Where this reader stands against the DLQ's stable ends (for a failure message)."""
        tps = [TopicPartition(self.topic, p) for p in self.partitions]
        try:
            with self._lock:
                at = {tp.partition: tp.offset for tp in self._c.position(tps)}
            ends = _list_offsets(tps, IsolationLevel.READ_COMMITTED)
        except Exception as e:  # a diagnosis must not hide the failure it explains
            return f"DLQ reader position unknown ({e!r})"
        return f"DLQ reader at {at}, {len(self.records)} read; the DLQ's stable ends {ends}"

    def close(self) -> None:
        self._c.close()


def _list_offsets(tps: list[TopicPartition], isolation: IsolationLevel) -> dict[int, int]:
    adm = testkit.admin()  # keep a reference: a destroyed handle fails its futures
    latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]  # untyped in the stub
    futures = adm.list_offsets({tp: latest for tp in tps}, isolation_level=isolation,
                               request_timeout=10)
    return {tp.partition: fut.result(timeout=15).offset for tp, fut in futures.items()}


def fetch_pks(conn: psycopg.Connection[Any], pks: list[tuple[Any, ...]]) -> set[tuple[Any, ...]]:
    """Which of these primary keys have a row (looked up by timestamp, the key's first column)."""
    try:
        cur = conn.execute("SELECT timestamp, device_id, connector_mode, component_type, pin_position "
                           "FROM iot_measurements WHERE timestamp = ANY(%s)", (sorted({pk[0] for pk in pks}),))
    except psycopg.errors.UndefinedTable:
        return set()
    return set(cur.fetchall())


@dataclass
class _Pending:
    rec: Produced
    committed: int
    since: float


@dataclass
class CheckerStats:
    samples: int = 0  # completed verifications
    failed_samples: int = 0
    records_verified: int = 0
    violations: list[str] = field(default_factory=list)
    regressions: list[str] = field(default_factory=list)
    # (monotonic time, sum of committed offsets) whenever the sum grew.
    progress: list[tuple[float, int]] = field(default_factory=list)
    # (monotonic time, committed offset per partition) whenever any of them moved.
    history: list[tuple[float, dict[int, int]]] = field(default_factory=list)


class OffsetChecker:
    """Samples the group's committed offsets in a background thread and verifies each sample."""

    def __init__(self, ledger: Ledger, topic: str, group: str, schema: str, dlq: DlqReader,
                 interval: float = 0.25) -> None:
        self.ledger = ledger
        self.topic = topic
        self.group = group
        self.schema = schema
        self.dlq = dlq
        self.interval = interval
        self.stats = CheckerStats()
        self.committed: dict[int, int] = {}
        self._verified = [0] * ledger.partitions
        self._pending: list[_Pending] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._offsets = Consumer({"bootstrap.servers": services.KAFKA_BOOTSTRAP, "log_level": 2, "group.id": group,
                                  "enable.auto.commit": False, "isolation.level": "read_committed"})
        self._tps = [TopicPartition(topic, p) for p in range(ledger.partitions)]

    # ------------------------------------------------------------------ thread

    def start(self) -> OffsetChecker:
        self._thread = threading.Thread(target=self._run, name="chaos-checker", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling in the background (check_once() still works)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
            self._thread = None

    def close(self) -> None:
        self.stop()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._offsets.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check_once()
            except Exception as e:  # broker or database down: count it and try again
                self.stats.failed_samples += 1
                if self._conn is not None and (self._conn.closed or self._conn.broken):
                    self._conn = None
                if not isinstance(e, KafkaException | psycopg.Error | TimeoutError):
                    self.stats.violations.append(f"checker crashed: {type(e).__name__}: {e}")
            self._stop.wait(self.interval)

    # ------------------------------------------------------------------ one sample

    def read_committed(self) -> dict[int, int]:
        res = self._offsets.committed(self._tps, timeout=5)
        return {tp.partition: tp.offset for tp in res if tp.offset >= 0}

    def check_once(self, final: bool = False) -> None:
        committed = self.read_committed()  # first the offsets ...
        dlq_at_end = self.dlq.drain()  # ... then what they promise
        now = time.monotonic()
        for p, o in committed.items():
            prev = self.committed.get(p, 0)
            if o < prev:
                self.stats.regressions.append(f"partition {p}: committed offset went back from {prev} to {o}")
        total = sum(committed.values())
        if not self.stats.progress or total > self.stats.progress[-1][1]:
            self.stats.progress.append((now, total))
        if committed != (self.stats.history[-1][1] if self.stats.history else {}):
            self.stats.history.append((now, committed))
        self.committed = {**self.committed, **committed}

        todo: list[tuple[Produced, int]] = []
        for p, o in committed.items():
            hi = min(o, self.ledger.known(p))
            lo = self._verified[p]
            if hi > lo:
                todo += [(r, o) for r in self.ledger.between(p, lo, hi)]
        rows_needed = [(r, o) for r, o in todo if r.planned.expect == "row"]
        if rows_needed:
            pks = fetch_pks(self._db(), [r.planned.pk for r, _ in rows_needed if r.planned.pk is not None])
            for r, o in rows_needed:
                if r.planned.pk not in pks:
                    self.stats.violations.append(
                        f"offset committed ahead of the table: partition {r.partition} committed {o}, "
                        f"but record {r.partition}/{r.offset} ({r.planned.kind} seq={r.planned.seq}) has no row")
        for r, o in todo:
            if r.planned.expect == "dlq":
                self._pending.append(_Pending(r, o, now))
        for p, o in committed.items():
            self._verified[p] = max(self._verified[p], min(o, self.ledger.known(p)))
        self.stats.records_verified += len(todo)

        still: list[_Pending] = []
        for pend in self._pending:
            if self.dlq.origins[(pend.rec.partition, pend.rec.offset)]:
                continue
            if (final or now - pend.since > DLQ_GRACE) and dlq_at_end:
                self.stats.violations.append(
                    f"offset committed ahead of the DLQ: partition {pend.rec.partition} committed {pend.committed}, "
                    f"but invalid record {pend.rec.partition}/{pend.rec.offset} ({pend.rec.planned.kind}) is not "
                    f"in the DLQ {now - pend.since:.0f}s later")
            else:
                still.append(pend)
        self._pending = still
        self.stats.samples += 1  # a verification that ran to its end (one that raised does not count)

    def _db(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = testkit.connect(self.schema)
            # A test holding a lock on the table must not stall the sampling of offsets.
            self._conn.execute("SET lock_timeout = '1s'")
        return self._conn

    @property
    def pending_dlq(self) -> int:
        return len(self._pending)
