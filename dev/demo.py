"""Local demo: the real sink process fed with demo records through a real Kafka topic."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from dev import services, testkit
from sink.demo import produce

TOPIC = "decoded_iot_data"
GROUP = "timescale_sink_group"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, default=20_000, help="demo records to produce")
    ap.add_argument("--keep-running", action="store_true", help="leave the sink running (Ctrl-C stops it)")
    args = ap.parse_args(argv)

    for name in (TOPIC, f"{TOPIC}.dlq"):
        if name not in testkit.admin().list_topics(timeout=10).topics:
            testkit.create_topic(name, partitions=6)
    env = {**os.environ, **services.service_env(), "KAFKA_INPUT_TOPIC": TOPIC, "KAFKA_GROUP_ID": GROUP,
           "METRICS_PORT": os.environ.get("METRICS_PORT", "9108"), "LOG_FORMAT": "json"}
    logfile = services.STATE / "demo" / "sink.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    print(f"[demo] starting the sink (JSON log: {logfile}, metrics: http://127.0.0.1:{env['METRICS_PORT']}/metrics)")
    with open(logfile, "ab") as log:
        sink = subprocess.Popen([sys.executable, "-m", "sink", "run"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        n = produce(services.KAFKA_BOOTSTRAP, TOPIC, args.count, seed=int(time.time()))
        print(f"[demo] produced {n} demo records (about 1% invalid, 2% duplicates) to {TOPIC}")
        ends = {p: o for p, o in testkit.end_offsets(TOPIC).items() if o > 0}
        testkit.wait_for(lambda: testkit.committed_offsets(GROUP, TOPIC) == ends or sink.poll() is not None,
                         300, what="the sink to commit every offset")
        if sink.poll() is not None:
            print(f"[demo] the sink exited with {sink.returncode}; see {logfile}")
            return 1
        print(f"[demo] drained in {time.monotonic() - t0:.1f}s")
        show()
        if args.keep_running:
            print("[demo] the sink keeps running; Ctrl-C stops it")
            sink.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if sink.poll() is None:
            sink.send_signal(signal.SIGTERM)
            sink.wait(30)
    print("[demo] stop the local Kafka and PostgreSQL with: python3 dev/services.py down")
    return 0


def show() -> None:
    with testkit.connect("public") as conn:
        total = conn.execute("SELECT count(*) FROM iot_measurements").fetchone()
        print(f"[demo] rows in iot_measurements: {total[0] if total else 0}")
        print("[demo] a few of them:")
        for row in conn.execute("SELECT timestamp, device_id, connector_mode, component_type, pin_position, value, "
                                "unit FROM iot_measurements ORDER BY timestamp DESC LIMIT 5"):
            print("   ", " | ".join(str(x) for x in row))
    dlq = testkit.read_all(f"{TOPIC}.dlq")
    print(f"[demo] records in {TOPIC}.dlq: {len(dlq)}")
    classes: dict[str, int] = {}
    for d in dlq:
        c = (d.headers.get("__connect.errors.exception.class.name") or b"?").decode()
        classes[c] = classes.get(c, 0) + 1
    for c, k in sorted(classes.items()):
        print(f"    {c}: {k}")


if __name__ == "__main__":
    sys.exit(main())
