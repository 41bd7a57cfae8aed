"""Local demo: the real sink process fed with demo records through a real Kafka topic."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from dev import services, testkit
from sink.demo import produce

TOPIC = "decoded_iot_data"
GROUP = "timescale_sink_group"


@dataclass(frozen=True)
class RunCounts:
    """What this run's sink did, from its /metrics (a fresh process: its counters are this run's)."""

    consumed: int = 0
    inserted: int = 0
    duplicates: int = 0
    dlq: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> RunCounts:
        totals: dict[str, float] = {}
        dlq: dict[str, int] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "sink_records_dlq_total":
                    dlq[sample.labels["error_class"]] = dlq.get(sample.labels["error_class"], 0) + int(sample.value)
                else:
                    totals[sample.name] = sample.value
        return cls(consumed=int(totals.get("sink_records_consumed_total", 0)),
                   inserted=int(totals.get("sink_rows_inserted_total", 0)),
                   duplicates=int(totals.get("sink_rows_duplicate_total", 0)), dlq=dlq)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, default=20_000, help="demo records to produce")
    ap.add_argument("--keep-running", action="store_true", help="leave the sink running (Ctrl-C stops it)")
    ap.add_argument("--topic", default=TOPIC, help=f"input topic (default {TOPIC}; its DLQ is <topic>.dlq)")
    ap.add_argument("--group", default=GROUP, help=f"the sink's consumer group (default {GROUP})")
    ap.add_argument("--logdir", type=Path, default=services.STATE / "demo", help="where the logs go")
    args = ap.parse_args(argv)

    args.logdir.mkdir(parents=True, exist_ok=True)
    logfile = args.logdir / "sink.log"
    librdkafka_to(args.logdir / "kafka-clients.log")
    for name in (args.topic, f"{args.topic}.dlq"):
        if name not in testkit.admin().list_topics(timeout=10).topics:
            testkit.create_topic(name, partitions=6)
    # Loopback only, and a port that is free now (9108, the image's, may be anyone's here).
    port = int(os.environ.get("METRICS_PORT") or 0) or testkit.closed_port()
    env = {**os.environ, **services.service_env(), "KAFKA_INPUT_TOPIC": args.topic, "KAFKA_GROUP_ID": args.group,
           "METRICS_HOST": "127.0.0.1", "METRICS_PORT": str(port), "LOG_FORMAT": "json"}
    metrics = f"http://127.0.0.1:{port}/metrics"
    print(f"[demo] starting the sink (JSON log: {logfile}, metrics: {metrics})")
    with open(logfile, "ab") as log:
        sink = subprocess.Popen([sys.executable, "-m", "sink", "run"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # Ready first: a sink that cannot start must not leave the records behind, unconsumed.
        testkit.wait_for(lambda: ready(port) or sink.poll() is not None, 120, what="the sink to be ready")
        if sink.poll() is not None:
            return failed(sink.returncode, logfile)
        t0 = time.monotonic()
        n = produce(services.KAFKA_BOOTSTRAP, args.topic, args.count, seed=int(time.time()))
        print(f"[demo] produced {n} demo records (about 1% invalid, 2% repeats) to {args.topic}")
        ends = {p: o for p, o in testkit.end_offsets(args.topic).items() if o > 0}
        testkit.wait_for(lambda: testkit.committed_offsets(args.group, args.topic) == ends or sink.poll() is not None,
                         300, what="the sink to commit every offset")
        if sink.poll() is not None:
            return failed(sink.returncode, logfile)
        print(f"[demo] drained in {time.monotonic() - t0:.1f}s")
        summary(n, RunCounts.parse(scrape(metrics)), args.topic)
        next_steps(logfile, args.topic, metrics, args.keep_running)
        if args.keep_running:
            print("[demo] the sink keeps running; Ctrl-C stops it")
            sink.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if sink.poll() is None:
            sink.send_signal(signal.SIGTERM)
            sink.wait(30)
        print(f"[demo] stop the local Kafka and PostgreSQL with: {services_command('down')}")
    return 0


def librdkafka_to(path: Path) -> None:
    """librdkafka writes its warnings straight to file descriptor 2 (`%4|…|GETPID|… Coordinator load
    in progress` while a fresh broker loads its groups): send them to a log file, and keep Python's
    own stderr (tracebacks, above all) on the terminal."""
    terminal = os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)
    sys.stderr = open(terminal, "w", buffering=1)  # noqa: SIM115 - the process's stderr from now on


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:  # refused while starting, 503 until ready (HTTPError is one)
        return False


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return str(r.read().decode())


def failed(returncode: int, logfile: Path) -> int:
    print(f"[demo] the sink exited with {returncode}: {why(logfile)}")
    print(f"[demo] its log: {logfile}")
    return 1


def why(logfile: Path) -> str:
    """The reason of the sink's last fatal_error or config_invalid line, else its last line."""
    reason, last = "", ""
    with open(logfile, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            last = line.strip()
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict) and event.get("event") in {"fatal_error", "config_invalid"}:
                reason = str(event.get("reason") or event.get("cause") or event)
    return reason or last or "no log line"


def summary(produced: int, run: RunCounts, topic: str) -> None:
    dlq = sum(run.dlq.values())
    print(f"[demo] this run: produced {produced}; the sink read {run.consumed}: {run.inserted} new rows, "
          f"{run.duplicates} duplicates (rows already in the table: repeats are absorbed), {dlq} to the DLQ")
    if run.consumed != produced:
        print(f"[demo]   ({run.consumed - produced:+d} against produced: records an earlier run left unconsumed)")
    if run.dlq:
        print("[demo] this run's DLQ records by error class: "
              + ", ".join(f"{cls} {k}" for cls, k in sorted(run.dlq.items())))
    with testkit.connect("public") as conn:
        row = conn.execute("SELECT count(*) FROM public.iot_measurements").fetchone()
        print(f"[demo] totals, all runs so far: {row[0] if row else 0} rows in public.iot_measurements "
              f"(database {services.PG_DB}), {len(testkit.read_all(f'{topic}.dlq'))} records in {topic}.dlq")
        print("[demo] the newest rows:")
        for r in conn.execute("SELECT timestamp, device_id, connector_mode, component_type, pin_position, value, "
                              "unit FROM public.iot_measurements ORDER BY timestamp DESC LIMIT 5"):
            print("   ", " | ".join(str(x) for x in r))
        timescaledb = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
    if not timescaledb:
        print("[demo] this local PostgreSQL has no TimescaleDB: a plain table (no hypertable, compression, "
              "retention or hourly aggregate); compose.yaml runs the real thing")


def next_steps(logfile: Path, topic: str, metrics: str, keep_running: bool) -> None:
    env = f'eval "$({services_command("env")})"'
    print("[demo] where to look next:")
    topic_env = "" if topic == TOPIC else f"KAFKA_INPUT_TOPIC={topic} "
    print(f"    the DLQ (why, where from):  {env}; {topic_env}.venv/bin/sink-dlq inspect")
    print(f"    a record's way, by event:   .venv/bin/kafka-timescale-sink logs search {logfile} "
          "--event record_rejected")
    print(f"    the metrics:                {metrics}" if keep_running else
          "    the metrics:                dev/demo --keep-running, then /metrics while the sink runs")


def services_command(action: str) -> str:
    """The services.py command line for these servers (the state directory remembers its ports)."""
    state = "" if "DEV_STATE_DIR" not in os.environ else f"DEV_STATE_DIR={services.STATE} "
    return f"{state}python3 dev/services.py {action}"


if __name__ == "__main__":
    sys.exit(main())
