"""Run the real sink (`python -m sink run`) as a child process and read its JSON log as it goes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.cpuquota import CpuQuota
from bench.procstat import Sampler, socket_ports
from bench.profile import PySpy
from dev import services, testkit

# testkit.sink_env() tunes these for fast tests; the benchmark measures the service's defaults.
_TEST_TUNING = ("BATCH_SIZE", "BATCH_TIMEOUT", "RETRY_INITIAL_BACKOFF", "RETRY_MAX_BACKOFF")


def bench_env(schema: str, topic: str, group: str, dlq_topic: str,
              overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The sink's environment at default settings, plus explicit overrides (e.g. BATCH_SIZE)."""
    env = testkit.sink_env(schema, topic, group)
    for name in _TEST_TUNING:
        env.pop(name, None)
    env["KAFKA_DLQ_TOPIC"] = dlq_topic
    env.update({k.upper(): v for k, v in (overrides or {}).items()})
    return env


class BenchSink(testkit.SinkProcess):
    """testkit's SinkProcess with a configurable command line (e.g. under a profiler)."""

    def __init__(self, env: Mapping[str, str], log_path: Path, prefix: Sequence[str] = (),
                 sink_dir: Path | None = None, quota: CpuQuota | None = None) -> None:
        super().__init__(env, log_path)
        self.command = [sys.executable, *prefix, "-m", "sink", "run"]
        if quota is not None:
            self.command = quota.wrap(self.command)
        # `python -m sink` imports the `sink` package found in its working directory first.
        self.cwd = sink_dir or testkit.ROOT

    def start(self) -> BenchSink:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.cwd)
        return self


def log_time(event: Mapping[str, Any]) -> float:
    """The wall-clock time (epoch seconds) of a JSON log line."""
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


@dataclass
class LogTail:
    """Reads the JSON lines appended to a log file since the last call."""

    path: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    _pos: int = 0
    _partial: bytes = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._pos)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self._pos += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        new = []
        for line in lines:
            if line.startswith(b"{"):
                try:
                    new.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        self.events.extend(new)
        return new

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]


def reached(ends: Mapping[int, int], committed: Sequence[Mapping[str, Any]]) -> bool:
    have = testkit.covered_offsets(committed)
    return all(have.get(p, 0) >= end for p, end in ends.items() if end > 0)


class SinkDied(RuntimeError):
    """The sink exited before it finished; the message carries the tail of its log."""


def wait_event(sink: BenchSink, tail: LogTail, name: str, timeout: float) -> dict[str, Any]:
    """Wait for the first log line with this event name (raises if the sink dies or times out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tail.read()
        found = tail.named(name)
        if found:
            return found[0]
        if not sink.alive():
            raise SinkDied(f"sink exited ({sink.proc.returncode if sink.proc else '?'}) before {name}:\n"
                           + sink.log_text()[-3000:])
        time.sleep(0.05)
    raise TimeoutError(f"no {name} in the sink's log after {timeout}s:\n" + sink.log_text()[-3000:])


def wait_drained(sink: BenchSink, tail: LogTail, ends: Mapping[int, int], timeout: float) -> None:
    """Wait until batch_committed lines cover every record up to the end offsets."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tail.read()
        if reached(ends, tail.named("batch_committed")):
            return
        if not sink.alive():
            raise SinkDied(f"sink exited ({sink.proc.returncode if sink.proc else '?'}) while draining:\n"
                           + sink.log_text()[-3000:])
        time.sleep(0.05)
    raise TimeoutError(f"sink did not commit up to {dict(ends)} in {timeout}s "
                       f"(covered {testkit.covered_offsets(tail.named('batch_committed'))})")


@dataclass(frozen=True)
class Drain:
    """One sink run over a pre-loaded topic: timings from its log, resources from /proc."""

    records: int
    seconds: float
    batches: int
    write_ms: list[float]
    commit_ms: list[float]
    peak_rss_kib: int  # VmHWM: the whole life of the process, startup included
    drain_rss_kib: int  # highest sampled RSS while draining
    cpu_s: float  # CPU seconds while draining
    cpu_total_s: float  # CPU seconds of the whole process (imports, migrations, ...)
    db_cpu_s: float  # CPU seconds of the sink's PostgreSQL backend while draining
    broker_cpu_s: float  # CPU seconds of the Kafka broker (dev/services.py's) while draining
    incidents: dict[str, int]  # retries, broker errors, ... while draining: the run was disturbed
    outage_rss_kib: int = 0  # highest sampled RSS while the database was stopped (--db-outage)
    insert_ms: float | None = None  # the batches' INSERT statements, summed (None: a sink that does not log it)
    throttling: dict[str, float] = field(default_factory=dict)  # --cpu-quota: how often the quota ran out

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0


# Log events that mean the run met trouble (another session restarting the shared broker or
# database, say): its timing is not the sink's.
INCIDENTS = ("retrying", "kafka_error", "db_disconnected", "consumer_paused", "partitions_revoked",
             "partitions_lost", "recovered")


def incidents(events: Sequence[Mapping[str, Any]], start: float, end: float) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in events:
        if e.get("event") in INCIDENTS and start <= log_time(e) <= end:
            out[str(e["event"])] = out.get(str(e["event"]), 0) + 1
    return out


def _since(now: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    return {k: round(v - before.get(k, 0), 2) for k, v in now.items()}


def db_backends(pid: int) -> list[int]:
    """PostgreSQL backend pids serving the process's connections (matched by client port)."""
    ports = socket_ports(pid, services.PG_PORT)
    if not ports:
        return []
    with testkit.connect() as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE client_port = ANY(%s)", (ports,)).fetchall()
    return [int(r[0]) for r in rows]


def drain(*, topic: str, ends: Mapping[int, int], schema: str, group: str, dlq_topic: str, log_path: Path,
          overrides: Mapping[str, str] | None = None, prefix: Sequence[str] = (), sink_dir: Path | None = None,
          pyspy: Path | None = None, outage: float = 0.0, quota: CpuQuota | None = None,
          timeout: float = 600) -> Drain:
    """Start the sink on a pre-loaded topic with a fresh group and measure it draining the topic.

    The clock starts at the sink's partitions_assigned line (its first fetch follows at once:
    startup, migrations and the group join are left out) and stops at the batch_committed line
    that covers the last offset of every partition.

    With `outage` > 0, PostgreSQL is stopped for that many seconds after the first committed batch
    (the sink must pause, hold its memory and resume; the run is then about RSS, not speed).

    With a `quota`, the sink runs inside that CPU cgroup (a Kubernetes CPU limit)."""
    sink = BenchSink(bench_env(schema, topic, group, dlq_topic, overrides), log_path, prefix, sink_dir,
                     quota).start()
    throttled_before = quota.throttling() if quota is not None else {}
    sampler = Sampler(sink.pid).start()
    broker_pid = services.kafka_pid()
    broker = Sampler(broker_pid).start() if broker_pid else None
    spy = PySpy(sink.pid, pyspy) if pyspy else None
    tail = LogTail(log_path)
    try:
        start = log_time(wait_event(sink, tail, "partitions_assigned", 120))
        if quota is not None:
            throttled_before = quota.throttling()
        db = [Sampler(p).start() for p in db_backends(sink.pid)]
        outage_rss = 0
        if outage > 0:
            wait_event(sink, tail, "batch_committed", timeout)
            services.stop_postgres("immediate")
            down = time.time()
            time.sleep(outage)
            up = time.time()
            services.start_postgres()
            outage_rss = sampler.peak_rss_between(down, up)
        wait_drained(sink, tail, ends, timeout)
        committed = tail.named("batch_committed")
        end = max(log_time(e) for e in committed)
        time.sleep(sampler.interval * 2)  # one sample after the end, for the CPU window
        sampler.stop()
        for s in db:
            s.stop()
        if broker is not None:
            broker.stop()
        written = tail.named("batch_written")
        records = sum(int(e["rows"]) for e in written)
        cpu_total = sampler.samples[-1][1] if sampler.samples else 0.0
        result = Drain(records=records, seconds=end - start, batches=len(written),
                       write_ms=[float(e["latency_ms"]) for e in written],
                       commit_ms=[float(e["latency_ms"]) for e in committed],
                       peak_rss_kib=sampler.peak_kib, drain_rss_kib=sampler.peak_rss_between(start, end),
                       cpu_s=sampler.cpu_between(start, end), cpu_total_s=cpu_total,
                       db_cpu_s=sum(s.cpu_between(start, end) for s in db),
                       broker_cpu_s=broker.cpu_between(start, end) if broker is not None else 0.0,
                       incidents=incidents(tail.events, start, end), outage_rss_kib=outage_rss,
                       insert_ms=(sum(float(e["insert_ms"]) for e in written)
                                  if all("insert_ms" in e for e in written) else None),
                       throttling=_since(quota.throttling(), throttled_before) if quota is not None else {})
        code = sink.stop(60)
        if spy is not None:
            spy.finish()
        if code != 0:
            raise SinkDied(f"sink exited {code} on SIGTERM:\n" + sink.log_text()[-3000:])
        return result
    finally:
        sampler.stop()
        if broker is not None:
            broker.stop()
        if sink.alive():
            sink.kill()
