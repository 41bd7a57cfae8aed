"""dev/demo: on loopback, on a free metrics port; its summary tells this run from the totals and
where to look next; a sink that cannot start says why on the terminal, before anything is produced."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from dev import testkit

pytestmark = pytest.mark.integration


@pytest.fixture
def demo_db(infra: None) -> Iterator[str]:
    """The configured database of the demo runs: its `public` is the demo's."""
    name = testkit.create_database(testkit.unique_name("demo"))
    yield name
    testkit.drop_database(name)


@pytest.fixture
def demo_topic(infra: None) -> Iterator[str]:
    """The demo creates the topic and its DLQ; the test removes them."""
    name = testkit.unique_name("demo")
    yield name
    testkit.delete_topics([name, f"{name}.dlq"])


def demo(db: str, topic: str, logdir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dev.demo", "--topic", topic, "--group", f"{topic}_g",
                           "--logdir", str(logdir), *args],
                          env={**os.environ, "TIMESCALE_DB": db, "METRICS_PORT": "", **env}, cwd=testkit.ROOT,
                          capture_output=True, text=True, timeout=300)


def figures(out: str) -> tuple[int, int, int, int, int]:
    """(produced, read, new rows, duplicates, to the DLQ) of this run's summary line."""
    m = re.search(r"this run: produced (\d+); the sink read (\d+): (\d+) new rows, (\d+) duplicates .*, (\d+) to "
                  r"the DLQ", out)
    assert m, out
    produced, read, inserted, duplicates, dlq = (int(g) for g in m.groups())
    return produced, read, inserted, duplicates, dlq


def test_two_runs_report_their_own_counts_and_the_totals(demo_db: str, demo_topic: str, tmp_path: Path) -> None:
    # 9108, the image's metrics port, busy on this machine: the demo picks a free one.
    with busy(9108):
        first = demo(demo_db, demo_topic, tmp_path, "--count", "400")
        second = demo(demo_db, demo_topic, tmp_path, "--count", "300")

    for run, count in ((first, 400), (second, 300)):
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        produced, read, inserted, duplicates, dlq = figures(run.stdout)
        assert produced == read == count
        assert inserted + duplicates + dlq == count
        assert dlq > 0 and duplicates > 0, "the demo data has invalid and repeated records"
        # DLQ by class, adding up to this run's DLQ count.
        by_class = re.search(r"^\[demo\] this run's DLQ records by error class: (.+)$", run.stdout, re.M)
        assert by_class, run.stdout
        assert sum(int(part.split()[1]) for part in by_class.group(1).split(", ")) == dlq
        assert "127.0.0.1:9108" not in run.stdout
        assert re.search(r"metrics: http://127\.0\.0\.1:\d+/metrics", run.stdout)
        assert "sink-dlq inspect" in run.stdout and "logs search" in run.stdout and "/metrics" in run.stdout
        assert "has no TimescaleDB" in run.stdout
        # librdkafka's own lines (%4|…|GETPID|…) go to the demo's log, not the terminal.
        assert not re.search(r"^%\d\|", run.stdout + run.stderr, re.M)
    first_new, second_new = figures(first.stdout)[2], figures(second.stdout)[2]
    with testkit.connect(db=demo_db) as conn:
        row = conn.execute("SELECT count(*) FROM public.iot_measurements").fetchone()
    assert row == (first_new + second_new,)
    dlq_total = len(testkit.read_all(f"{demo_topic}.dlq"))
    assert f"totals, all runs so far: {first_new + second_new} rows in public.iot_measurements" in second.stdout
    assert f"{dlq_total} records in {demo_topic}.dlq" in second.stdout
    assert dlq_total == figures(first.stdout)[4] + figures(second.stdout)[4]


@contextmanager
def busy(port: int) -> Iterator[None]:
    """Someone else's server on `port` (or already someone's)."""
    with socket.socket() as s:
        with suppress(OSError):  # taken already
            s.bind(("127.0.0.1", port))
            s.listen()
        yield


def test_a_sink_that_cannot_start_says_why_and_nothing_is_produced(demo_db: str, demo_topic: str,
                                                                     tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = demo(demo_db, demo_topic, tmp_path, "--count", "100", METRICS_PORT=str(port))

    assert run.returncode == 1
    assert re.search(rf"^\[demo\] the sink exited with 1: cannot serve metrics on METRICS_HOST=127\.0\.0\.1:"
                     rf"METRICS_PORT={port}: .*in use", run.stdout, re.M), run.stdout
    assert testkit.end_offsets(demo_topic) == dict.fromkeys(range(6), 0)
