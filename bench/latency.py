"""Latency mode: produce at a steady rate below capacity while the sink runs; measure, per record,
the time from the producer's acknowledgement to the sink's batch_written (rows visible, the
database transaction committed) and batch_committed (offsets committed) log lines."""

from __future__ import annotations

import bisect
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from bench.cpuquota import CpuQuota
from bench.data import DEVICES, DUPLICATE_SHARE, INVALID_SHARE
from bench.procstat import Sampler
from bench.sinkrun import BenchSink, LogTail, SinkDied, bench_env, incidents, log_time, wait_drained, wait_event
from dev import services, testkit
from sink.demo import records
from sink.produce import produce_waiting


@dataclass(frozen=True)
class Acked:
    partition: int
    offset: int
    at: float  # wall clock when the delivery report arrived


def produce_steady(topic: str, rate: float, seconds: float) -> list[Acked]:
    """Produce demo records at `rate` per second for `seconds`; serve delivery reports while
    waiting, so each ack time is taken within a fraction of a millisecond of its arrival."""
    count = int(rate * seconds)
    p = Producer({"bootstrap.servers": services.KAFKA_BOOTSTRAP, "linger.ms": 5, "enable.idempotence": True})
    acked: list[Acked] = []
    errors: list[Any] = []

    def on_ack(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(err)
        else:
            acked.append(Acked(msg.partition(), msg.offset(), time.time()))

    t0 = time.monotonic()
    for i, value in enumerate(records(count, seed=5, devices=DEVICES, invalid_share=INVALID_SHARE,
                                      duplicate_share=DUPLICATE_SHARE, start=time.time())):
        produce_waiting(p, topic, 0.01, value=value, on_delivery=on_ack)
        ahead = (i + 1) / rate - (time.monotonic() - t0)
        while ahead > 0:
            p.poll(ahead)
            ahead = (i + 1) / rate - (time.monotonic() - t0)
        p.poll(0)
    left = p.flush(60)
    if left or errors:
        raise RuntimeError(f"latency producer: {left} unacknowledged, errors={errors[:3]}")
    return acked


def _index(events: Sequence[Mapping[str, Any]]) -> dict[int, tuple[list[int], list[tuple[int, float]]]]:
    """partition -> (sorted first offsets, [(last offset, time)]) of the batches in the log."""
    spans: dict[int, list[tuple[int, int, float]]] = {}
    for e in events:
        t = log_time(e)
        for p, (first, last) in e.get("offsets", {}).items():
            spans.setdefault(int(p), []).append((int(first), int(last), t))
    out = {}
    for p, items in spans.items():
        items.sort()
        out[p] = ([f for f, _, _ in items], [(last, t) for _, last, t in items])
    return out


def _lookup(index: Mapping[int, tuple[list[int], list[tuple[int, float]]]], partition: int,
            offset: int) -> float | None:
    firsts, rest = index.get(partition, ([], []))
    i = bisect.bisect_right(firsts, offset) - 1
    if i < 0 or rest[i][0] < offset:
        return None
    return rest[i][1]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def measure_latency(*, rate: float, seconds: float, warmup: float, batch_timeout: float, log_path: Path,
                    overrides: Mapping[str, str] | None = None, sink_dir: Path | None = None,
                    quota: CpuQuota | None = None) -> dict[str, Any]:
    """Run the sink on a fresh topic (inside the `quota`'s CPU cgroup, if given), produce at a
    steady rate, and return the latency figures."""
    topic = testkit.create_topic(testkit.unique_name("bench_lat"), partitions=3)
    dlq = testkit.create_topic(f"{topic}.dlq", partitions=3)
    schema = testkit.create_schema(testkit.unique_name("bench_lat"))
    group = testkit.unique_name("bench_lat")
    sink = BenchSink(bench_env(schema, topic, group, dlq, overrides), log_path, sink_dir=sink_dir, quota=quota).start()
    sampler = Sampler(sink.pid, interval=0.1).start()
    tail = LogTail(log_path)
    try:
        wait_event(sink, tail, "partitions_assigned", 120)
        throttled_before = quota.throttling() if quota is not None else {}
        t_start = time.time()
        acked = produce_steady(topic, rate, seconds)
        wait_drained(sink, tail, testkit.end_offsets(topic), 120)
        t_end = time.time()
        throttled = ({k: round(v - throttled_before.get(k, 0), 2) for k, v in quota.throttling().items()}
                     if quota is not None else {})
        sampler.stop()
        if sink.stop(60) != 0:
            raise SinkDied("sink exited non-zero on SIGTERM:\n" + sink.log_text()[-3000:])
    finally:
        sampler.stop()
        if sink.alive():
            sink.kill()
        testkit.delete_topics([topic, dlq])
        testkit.drop_schema(schema)
    written, committed = _index(tail.named("batch_written")), _index(tail.named("batch_committed"))
    steady = [a for a in acked if a.at >= t_start + warmup]
    visible = [t - a.at for a in steady if (t := _lookup(written, a.partition, a.offset)) is not None]
    done = [t - a.at for a in steady if (t := _lookup(committed, a.partition, a.offset)) is not None]
    if len(visible) != len(steady) or len(done) != len(steady):
        raise RuntimeError(f"{len(steady) - len(visible)} acknowledged records never appeared in a batch")
    target = batch_timeout + 0.25
    write_ms = [float(e["latency_ms"]) for e in tail.named("batch_written")]
    rows = [int(e["rows"]) for e in tail.named("batch_written")]
    return {
        "rate": rate, "seconds": seconds, "warmup_s": warmup, "records": len(acked), "measured": len(steady),
        "visible_p50_ms": round(percentile(visible, 50) * 1000, 1),
        "visible_p99_ms": round(percentile(visible, 99) * 1000, 1),
        "visible_max_ms": round(max(visible, default=0.0) * 1000, 1),
        "committed_p50_ms": round(percentile(done, 50) * 1000, 1),
        "committed_p99_ms": round(percentile(done, 99) * 1000, 1),
        "target_ms": round(target * 1000, 1),
        "meets_target": percentile(visible, 99) < target,
        "batches": len(rows), "mean_batch_rows": round(sum(rows) / len(rows), 1) if rows else 0,
        "write_p50_ms": percentile(write_ms, 50), "write_p99_ms": percentile(write_ms, 99),
        "peak_rss_mib": round(sampler.peak_kib / 1024, 1),
        "cpu_s": round(sampler.cpu_between(t_start, t_end), 2),
        "wall_s": round(t_end - t_start, 2),
        "incidents": incidents(tail.events, t_start, t_end),
        **({"throttling": throttled} if throttled else {}),
    }
