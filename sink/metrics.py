"""Prometheus metrics of the sink (one registry per Pipeline, so tests can run several)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

# cgroup v2, then v1: the memory bound a container runtime puts on the process.
CGROUP_MEMORY_LIMIT_FILES = (Path("/sys/fs/cgroup/memory.max"),
                             Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
# cgroup v1 writes "no limit" as a huge number (PAGE_COUNTER_MAX pages), not as "max".
_NO_LIMIT_ABOVE = 1 << 60


def memory_limit_bytes(files: tuple[Path, ...] = CGROUP_MEMORY_LIMIT_FILES) -> int | None:
    """The cgroup's memory limit, or None when there is none (or it cannot be read)."""
    for f in files:
        try:
            text = f.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < _NO_LIMIT_ABOVE:
            return int(text)
        return None
    return None


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.consumed = Counter("sink_records_consumed", "Records consumed from Kafka", registry=r)
        self.inserted = Counter("sink_rows_inserted", "Rows inserted (new)", registry=r)
        self.duplicates = Counter("sink_rows_duplicate", "Rows that changed nothing: already present (or, with "
                                  "WRITE_MODE=update, identical, older, or superseded in their batch)", registry=r)
        self.updated = Counter("sink_rows_updated", "Rows that overwrote a row of the same key (WRITE_MODE=update)",
                               registry=r)
        self.dlq = Counter("sink_records_dlq", "Records sent to the DLQ", ["error_class", "stage"], registry=r)
        self.batches = Counter("sink_batches_written", "Batches written to the database", registry=r)
        self.batch_rows = Histogram("sink_batch_rows", "Records per batch", registry=r,
                                    buckets=(1, 10, 50, 100, 500, 1000, 2500, 5000, 10000, 25000, 50000))
        self.write_seconds = Histogram("sink_batch_write_seconds", "Database write time per batch", registry=r,
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        # rate() of it is the share of the time the database spends in the sink's INSERTs: near 1,
        # the database's insert is the bottleneck (the INSERTs run one at a time: sink/pipeline.py).
        self.insert_seconds = Counter("sink_db_insert_seconds", "Seconds spent in the batches' INSERT statements",
                                      registry=r)
        self.commit_seconds = Histogram("sink_batch_commit_seconds", "Kafka DLQ+offset commit time per batch",
                                        registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.retries = Counter("sink_retries", "Retries of retryable failures", ["cause"], registry=r)
        self.lag = Gauge("sink_consumer_lag", "Consumer lag in records", ["topic", "partition"], registry=r)
        self.last_commit = Gauge("sink_last_commit_timestamp_seconds", "Unix time of the last offset commit",
                                 registry=r)
        self.since_commit = Gauge("sink_seconds_since_last_commit", "Seconds since the last successful commit "
                                  "(since start if none)", registry=r)
        self.db_connected = Gauge("sink_db_connected", "1 when the database connection is up", registry=r)
        self.broker_up = Gauge("sink_kafka_connected", "1 when a broker connection is up", registry=r)
        self.breaker_tripped = Gauge("sink_dlq_breaker_tripped", "1 when the DLQ breaker tripped", registry=r)
        self.dlq_share = Gauge("sink_dlq_share", "Share of recent records sent to the DLQ", registry=r)
        self.paused = Gauge("sink_consumer_paused", "1 while consumption is paused", registry=r)
        self.assigned = Gauge("sink_assigned_partitions", "Partitions assigned to this instance", registry=r)
        self.ready = Gauge("sink_ready", "1 when /readyz answers 200 (broker and database reachable)", registry=r)
        # process_resident_memory_bytes and process_start_time_seconds (restarts) for the alerts;
        # the default registry would have them, a registry of our own needs them added.
        ProcessCollector(registry=r)
        limit = memory_limit_bytes()
        # Unlimited: no series beats a fake bound (the memory alert divides by it and stays silent).
        self.memory_limit = Gauge("sink_memory_limit_bytes", "The container's (cgroup) memory limit; absent "
                                  "when unlimited", registry=r if limit is not None else None)
        if limit is not None:
            self.memory_limit.set(limit)
        self._started = time.time()
        self._last_commit_at: float | None = None
        self.since_commit.set_function(self._seconds_since_commit)

    def _seconds_since_commit(self) -> float:
        return time.time() - (self._last_commit_at or self._started)

    def committed(self) -> None:
        self._last_commit_at = time.time()
        self.last_commit.set(self._last_commit_at)

    def forget_partition(self, topic: str, partition: int) -> None:
        """A revoked partition's lag is another instance's to report."""
        with contextlib.suppress(KeyError):
            self.lag.remove(topic, str(partition))

    def set_lag(self, topic: str, lag: dict[int, int]) -> None:
        for p, v in lag.items():
            self.lag.labels(topic=topic, partition=str(p)).set(v)
