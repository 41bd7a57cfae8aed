"""`sink-dlq` against the real broker and database, with a DLQ filled by the real sink.

The DLQ holds: rows rejected by a CHECK constraint the test adds (fixable: the test drops it),
rows rejected by a second constraint that stays (still broken at the write stage), and records
that cannot be decoded or validated (still broken).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from dev import services, testkit
from dlq import cli
from sink.envelope import H_ATTEMPT, H_CLASS, H_FAILED_AT, H_MESSAGE, H_OFFSET, H_PARTITION, H_STAGE, H_TOPIC

pytestmark = pytest.mark.integration

FIXABLE = "dlq_test_value_below_1000"  # dropped by the "operator": its rejects become valid
STAYS = "dlq_test_unit_not_bad"  # stays: its rejects fail again at the write stage


def measurement(i: int, **extra: Any) -> dict[str, Any]:
    return {"timestamp": 1_700_000_000 + i, "mac_address": f"dev-{i % 7}", "mode": "analog",
            "data_point_label": "temperature", "pin": i % 4, "value": i % 500, "unit": "C", **extra}


@dataclass
class Filled:
    topic: str
    schema: str
    group: str
    env: dict[str, str]
    ok: int
    fixable: int
    broken_write: int
    broken_decode: int
    logdir: Path

    @property
    def dlq(self) -> str:
        return f"{self.topic}.dlq"

    @property
    def replay_group(self) -> str:
        return f"{self.group}.dlq-replay"

    @property
    def broken(self) -> int:
        return self.broken_write + self.broken_decode

    def replay(self, *args: str, schema: str | None = None, expect: int = 0) -> dict[str, Any]:
        """Run `python -m dlq replay --json ...` to its end; returns the JSON summary."""
        env = dict(self.env, TIMESCALE_SCHEMA=schema or self.schema)
        p = subprocess.run([sys.executable, "-m", "dlq", "replay", "--json", *args], env=env, cwd=testkit.ROOT,
                           capture_output=True, text=True, timeout=180)
        assert p.returncode == expect, p.stderr[-4000:]
        summary: dict[str, Any] = json.loads(p.stdout)
        return summary

    def start_replay(self, *args: str, name: str) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen([sys.executable, "-m", "dlq", "replay", *args], env=self.env, cwd=testkit.ROOT,
                                stdout=subprocess.DEVNULL, stderr=log)
        log.close()
        return proc


def fill_dlq(topic: str, schema: str, group: str, logdir: Path, *, ok: int = 30, fixable: int = 12,
             broken_write: int = 6, invalid_json: int = 4, invalid_fields: int = 3) -> Filled:
    """Run the real sink over a mix of records with two CHECK constraints in place, then stop it."""
    # A DLQ-heavy input on purpose: the breaker would stop the sink.
    env = testkit.sink_env(schema, topic, group, dlq_breaker_enabled="false")
    sink = testkit.SinkProcess(env, logdir / "sink-fill.log").start()
    try:
        testkit.wait_table(schema)
        with testkit.connect(schema) as conn:
            conn.execute(f"ALTER TABLE iot_measurements ADD CONSTRAINT {FIXABLE} CHECK (value < 1000)")
            conn.execute(f"ALTER TABLE iot_measurements ADD CONSTRAINT {STAYS} CHECK (unit <> 'bad')")
        values: list[Any] = [measurement(i) for i in range(ok)]
        values += [measurement(10_000 + i, value=5000 + i) for i in range(fixable)]
        values += [measurement(20_000 + i, unit="bad") for i in range(broken_write)]
        values += [b"{not json"] * invalid_json
        values += [{"mac_address": f"no-timestamp-{i}"} for i in range(invalid_fields)]
        testkit.produce(topic, values, keys=[f"k{i}".encode() for i in range(len(values))])
        testkit.wait_drained(group, topic, 120)
        assert sink.stop() == 0
    finally:
        if sink.alive():
            sink.kill()
    filled = Filled(topic, schema, group, testkit.sink_env(schema, topic, group), ok, fixable, broken_write,
                    invalid_json + invalid_fields, logdir)
    assert testkit.row_count(schema) == ok
    assert len(testkit.read_all(filled.dlq)) == fixable + filled.broken
    return filled


def operator_fixes(schema: str) -> None:
    with testkit.connect(schema) as conn:
        conn.execute(f"ALTER TABLE iot_measurements DROP CONSTRAINT {FIXABLE}")


def attempts(dlq: str) -> Counter[int]:
    return Counter(int(r.headers[H_ATTEMPT]) for r in testkit.read_all(dlq))


def committed_now(group: str, topic: str) -> dict[int, int]:
    """Like testkit.committed_offsets, but read_uncommitted: it does not wait (up to the
    transaction timeout) for offsets a killed replay left pending in its open transaction."""
    c = Consumer({"bootstrap.servers": services.KAFKA_BOOTSTRAP, "group.id": group, "enable.auto.commit": False,
                  "isolation.level": "read_uncommitted"})
    try:
        tps = [TopicPartition(topic, p) for p in testkit.end_offsets(topic)]
        return {tp.partition: tp.offset for tp in c.committed(tps, timeout=10) if tp.offset >= 0}
    finally:
        c.close()


def origin(r: testkit.ConsumedRecord) -> tuple[str, int, int]:
    return r.headers[H_TOPIC].decode(), int(r.headers[H_PARTITION]), int(r.headers[H_OFFSET])


@pytest.fixture
def filled(topic: str, schema: str, group: str, logdir: Path) -> Iterator[Filled]:
    logdir.mkdir(parents=True, exist_ok=True)
    yield fill_dlq(topic, schema, group, logdir)


# --------------------------------------------------------------------------- Done when


def test_replay_inserts_exactly_the_fixable_records_and_the_broken_ones_return_with_attempt_2(filled: Filled) -> None:
    f = filled
    first_attempts = testkit.read_all(f.dlq)
    operator_fixes(f.schema)

    first = f.replay()
    assert first["outcome"] == "completed"
    assert first["group"] == f.replay_group
    assert first["counts"] == {"replayed": f.fixable + f.broken, "inserted": f.fixable, "updated": 0,
                               "already_present": 0, "republished": 0, "valid": 0, "failed_again": f.broken,
                               "dlq": f.broken, "skipped": 0}
    assert testkit.row_count(f.schema) == f.ok + f.fixable
    values = sorted(r[5] for r in testkit.rows(f.schema) if r[5] >= 1000)
    assert values == [5000.0 + i for i in range(f.fixable)]
    # The broken ones are back, each exactly once, with attempt 2, their origin and a fresh error.
    everything = testkit.read_all(f.dlq)
    again = [r for r in everything if r.headers[H_ATTEMPT] == b"2"]
    broken_origins = {origin(r) for r in first_attempts if FIXABLE.encode() not in r.headers[H_MESSAGE]}
    assert len(again) == f.broken
    assert {origin(r) for r in again} == broken_origins
    assert Counter(r.headers[H_STAGE] for r in again) == {b"write": f.broken_write, b"decode": 4, b"validate": 3}
    assert all(STAYS.encode() in r.headers[H_MESSAGE] for r in again
               if r.headers[H_STAGE] == b"write")
    assert {r.value for r in again} <= {r.value for r in first_attempts}

    second = f.replay()
    assert second["counts"]["inserted"] == 0
    assert second["counts"]["replayed"] == f.broken  # only what the first run wrote back
    assert testkit.row_count(f.schema) == f.ok + f.fixable
    assert attempts(f.dlq) == {1: f.fixable + f.broken, 2: f.broken, 3: f.broken}

    # A group starting from scratch re-reads everything: the fixed rows are reported as present.
    fresh = f.replay("--group", f.group + ".fresh", "--on-failure", "skip")
    assert fresh["counts"]["inserted"] == 0
    assert fresh["counts"]["already_present"] == f.fixable
    assert testkit.row_count(f.schema) == f.ok + f.fixable


def test_dry_run_changes_no_row_and_no_committed_offset(filled: Filled) -> None:
    f = filled
    operator_fixes(f.schema)
    partial = f.replay("--max", "5")  # so the group has committed offsets a dry run could move
    assert partial["outcome"] == "max_reached" and partial["counts"]["replayed"] == 5
    before = (testkit.rows(f.schema), testkit.committed_offsets(f.replay_group, f.dlq), testkit.end_offsets(f.dlq))
    assert sum(before[1].values()) > 0

    dry = f.replay("--dry-run")
    assert dry["dry_run"] is True and dry["outcome"] == "completed"
    c = dry["counts"]
    # What the partial run left, plus what it wrote back to the DLQ.
    assert c["replayed"] == f.fixable + f.broken - 5 + partial["counts"]["dlq"]
    assert c["valid"] + c["failed_again"] == c["replayed"]
    assert c["inserted"] == c["dlq"] == 0
    after = (testkit.rows(f.schema), testkit.committed_offsets(f.replay_group, f.dlq), testkit.end_offsets(f.dlq))
    assert after == before


def test_a_dry_run_reads_like_a_report_whose_counts_add_up(filled: Filled) -> None:
    f = filled
    p = subprocess.run([sys.executable, "-m", "dlq", "replay", "--dry-run"], env=dict(f.env, TIMESCALE_SCHEMA=f.schema),
                       cwd=testkit.ROOT, capture_output=True, text=True, timeout=180)

    assert p.returncode == 0, p.stderr[-4000:]
    # No line per record on stderr: the start and audit lines (and progress), the report on stdout.
    lines = [json.loads(line) for line in p.stderr.splitlines() if line.strip()]
    assert {e["event"] for e in lines} <= {"dlq_replay_started", "dlq_replay_progress", "dlq_replay_finished"}
    [started] = [e for e in lines if e["event"] == "dlq_replay_started"]
    [finished] = [e for e in lines if e["event"] == "dlq_replay_finished"]
    records = f.fixable + f.broken
    markers = started["offsets"] - records
    assert markers > 0, "the sink's Kafka transactions leave markers in the DLQ"
    assert (finished["offsets"], finished["replayed"], finished["markers"]) == (started["offsets"], records, markers)
    assert re.search(rf"^ *replayed +\W +{records} *$", p.stdout, re.M), p.stdout
    assert (f"{started['offsets']} DLQ offsets read: {records} records and {markers} Kafka transaction markers"
            in p.stdout)


def test_inspect_json_counts_match_the_dlq_contents(filled: Filled, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    f = filled
    operator_fixes(f.schema)
    f.replay()  # so there are attempts 1 and 2
    for k, v in f.env.items():
        monkeypatch.setenv(k, v)
    assert cli.main(["inspect", "--json", "--examples", "3"]) == 0
    got = json.loads(capsys.readouterr().out)

    records = testkit.read_all(f.dlq)  # counted independently, from the raw headers
    assert got["records"] == got["scanned"] == len(records) == f.fixable + 2 * f.broken
    assert got["by_error_class"] == dict(Counter(r.headers[H_CLASS].decode() for r in records))
    assert got["by_stage"] == dict(Counter(r.headers[H_STAGE].decode() for r in records))
    assert got["by_attempt"] == {str(k): v for k, v in Counter(int(r.headers[H_ATTEMPT]) for r in records).items()}
    assert got["by_origin"] == {f.topic: {str(p): n for p, n in
                                          Counter(int(r.headers[H_PARTITION]) for r in records).items()}}
    assert got["by_dlq_partition"] == {str(p): n for p, n in Counter(r.partition for r in records).items()}
    assert got["distinct_origins"] == len({origin(r) for r in records}) == f.fixable + f.broken
    failed_at = sorted(r.headers[H_FAILED_AT].decode() for r in records)
    assert (got["first_failure"], got["last_failure"]) == (failed_at[0], failed_at[-1])
    assert len(got["examples"]) == 3
    assert {e["error_class"] for e in got["examples"]} == {"CheckViolation", "InvalidJson", "ValidationError"}
    # It scanned every DLQ partition from its start to its end ([start, end)).
    assert got["ranges"] == {str(p): [0, o] for p, o in testkit.end_offsets(f.dlq).items()}


def test_killed_replay_resumes_and_ends_with_the_same_rows_as_an_uninterrupted_run(
        topic: str, schema: str, group: str, logdir: Path) -> None:
    logdir.mkdir(parents=True, exist_ok=True)
    f = fill_dlq(topic, schema, group, logdir, ok=50, fixable=500, broken_write=40, invalid_json=30,
                 invalid_fields=10)
    operator_fixes(f.schema)
    # The same starting point in a second schema, for the uninterrupted run to compare with.
    twin = testkit.unique_name("s")
    testkit.create_schema(twin)
    try:
        migrated = subprocess.run([sys.executable, "-m", "sink", "migrate"], env=dict(f.env, TIMESCALE_SCHEMA=twin),
                                  cwd=testkit.ROOT, capture_output=True, text=True, timeout=120)
        assert migrated.returncode == 0, migrated.stdout[-2000:]
        with testkit.connect(twin) as conn:
            conn.execute(f'INSERT INTO iot_measurements SELECT * FROM "{f.schema}".iot_measurements')
            conn.execute(f"ALTER TABLE iot_measurements ADD CONSTRAINT {STAYS} CHECK (unit <> 'bad')")
        total = sum(testkit.end_offsets(f.dlq).values())

        # Small batches: many transactions, so the kills land mid-way (often between a batch's
        # database commit and its Kafka commit).
        for n, share in enumerate((0.15, 0.5)):
            proc = f.start_replay("--batch-size", "5", name=f"killed-{n}")
            try:
                testkit.wait_for(lambda s=share: sum(committed_now(f.replay_group, f.dlq).values())
                                 >= s * total, 120, interval=0.05, what="replay progress")
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
        committed = sum(committed_now(f.replay_group, f.dlq).values())
        assert 0.5 * total <= committed < total, "the second kill did not land mid-way"

        resumed = f.replay("--batch-size", "5")
        assert resumed["outcome"] == "completed"
        # It resumed: only the batch in flight at each kill can be re-read ("already present").
        assert resumed["counts"]["already_present"] <= 2 * 5
        assert resumed["counts"]["replayed"] < 0.6 * (f.fixable + f.broken)

        # Each broken record went back to the DLQ exactly once despite the kills.
        again = [r for r in testkit.read_all(f.dlq) if r.headers[H_ATTEMPT] == b"2"]
        assert len(again) == f.broken
        assert len({origin(r) for r in again}) == f.broken

        uninterrupted = f.replay("--group", f.group + ".twin", schema=twin)
        assert uninterrupted["outcome"] == "completed"
        assert uninterrupted["counts"]["inserted"] == f.fixable
        assert testkit.rows(f.schema) == testkit.rows(twin)
        assert testkit.row_count(f.schema) == f.ok + f.fixable
    finally:
        testkit.drop_schema(twin)


# --------------------------------------------------------------------------- filters and modes


def test_filtered_replay_uses_its_own_group_and_leaves_other_records_to_a_later_run(filled: Filled) -> None:
    f = filled
    operator_fixes(f.schema)
    only = f.replay("--error-class", "InvalidJson", "--on-failure", "skip")
    assert only["group"].startswith(f.replay_group + ".f-")
    assert only["counts"] == {"replayed": 4, "inserted": 0, "updated": 0, "already_present": 0, "republished": 0,
                              "valid": 0, "failed_again": 4, "dlq": 0, "skipped": f.fixable + f.broken - 4}
    # The default group did not move: the skipped records are all still there for it.
    assert testkit.committed_offsets(f.replay_group, f.dlq) == {}
    assert testkit.committed_offsets(only["group"], f.dlq) == {
        p: o for p, o in testkit.end_offsets(f.dlq).items() if o > 0}

    fixable = f.replay("--error-class", "CheckViolation", "--stage", "write")
    assert fixable["counts"]["inserted"] == f.fixable
    assert fixable["counts"]["failed_again"] == f.broken_write
    assert testkit.row_count(f.schema) == f.ok + f.fixable

    everything = f.replay("--on-failure", "skip")
    c = everything["counts"]
    # Originals plus the write failures the filtered run sent back; the fixed rows are present.
    assert c["replayed"] == f.fixable + f.broken + f.broken_write
    assert (c["inserted"], c["already_present"], c["skipped"]) == (0, f.fixable, 0)


def test_stop_on_failure_exits_3_and_the_failing_record_stays_uncommitted(filled: Filled) -> None:
    f = filled
    operator_fixes(f.schema)
    stopped = f.replay("--on-failure", "stop", "--stage", "decode", "--group", f.group + ".stop", expect=3)
    assert stopped["outcome"] == "stopped_on_failure"
    at = stopped["stopped_at"]
    assert at["stage"] == "decode" and at["error_class"] == "InvalidJson"
    committed = testkit.committed_offsets(stopped["group"], f.dlq)
    assert committed.get(at["partition"], 0) <= at["offset"]
    assert attempts(f.dlq)[2] == 0


def test_to_topic_republishes_valid_records_and_the_sink_writes_them(filled: Filled) -> None:
    f = filled
    operator_fixes(f.schema)
    out = f.replay("--to-topic", f.topic)
    assert out["counts"]["republished"] == f.fixable + f.broken_write
    assert out["counts"]["failed_again"] == out["counts"]["dlq"] == f.broken_decode
    assert testkit.row_count(f.schema) == f.ok  # nothing written by the replay itself

    # The re-published records came in transactions: the end offsets lie past their commit
    # markers, and the sink commits last record + 1.
    last: dict[int, int] = {}
    for r in testkit.read_all(f.topic):
        last[r.partition] = max(last.get(r.partition, 0), r.offset + 1)
    testkit.SinkProcess(f.env, f.logdir / "sink-again.log").start().stop_once_committed(f.group, f.topic, last)
    assert testkit.row_count(f.schema) == f.ok + f.fixable
    # The still-broken write rejects came back through the sink: new origin, attempt 1 again.
    records = testkit.read_all(f.dlq)
    assert Counter(int(r.headers[H_ATTEMPT]) for r in records) == {1: f.fixable + f.broken + f.broken_write,
                                                                  2: f.broken_decode}


def test_replay_refuses_to_run_without_the_table_and_touches_nothing(topic: str, schema: str, group: str) -> None:
    testkit.produce(f"{topic}.dlq", [b"x"])
    env = testkit.sink_env(schema, topic, group)  # a fresh schema: the sink never ran, no table
    p = subprocess.run([sys.executable, "-m", "dlq", "replay"], env=env, cwd=testkit.ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1
    assert "iot_measurements does not exist" in p.stderr
    assert testkit.committed_offsets(f"{group}.dlq-replay", f"{topic}.dlq") == {}
    assert len(testkit.read_all(f"{topic}.dlq")) == 1
    with testkit.connect(schema) as conn:
        row = conn.execute("SELECT to_regclass('iot_measurements')").fetchone()
        assert row is not None and row[0] is None


def test_a_second_replay_of_the_same_group_fences_the_first_and_nothing_is_doubled(
        topic: str, schema: str, group: str, logdir: Path) -> None:
    logdir.mkdir(parents=True, exist_ok=True)
    f = fill_dlq(topic, schema, group, logdir, ok=10, fixable=300, broken_write=30, invalid_json=20,
                 invalid_fields=0)
    operator_fixes(f.schema)
    total = sum(testkit.end_offsets(f.dlq).values())
    first = f.start_replay("--batch-size", "2", name="first")
    second: subprocess.Popen[bytes] | None = None
    try:
        testkit.wait_for(lambda: sum(committed_now(f.replay_group, f.dlq).values()) >= 0.1 * total, 120,
                         interval=0.05, what="the first replay's progress")
        # Hold the first one's next write until the second one has started (deterministic overlap).
        with testkit.connect(f.schema, autocommit=False) as lock:
            lock.execute("LOCK TABLE iot_measurements IN SHARE MODE")
            second = f.start_replay("--batch-size", "50", name="second")
            testkit.wait_for(lambda: "dlq_replay_started" in (f.logdir / "second.log").read_text(), 60,
                             what="the second replay's start")
            assert first.poll() is None
            lock.rollback()
        assert second.wait(120) == 0
        assert first.wait(60) == 1  # fenced: its next transaction was refused
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert "took over" in (f.logdir / "first.log").read_text()
    again = [r for r in testkit.read_all(f.dlq) if r.headers[H_ATTEMPT] == b"2"]
    assert len(again) == len({origin(r) for r in again}) == f.broken
    assert testkit.row_count(f.schema) == f.ok + f.fixable


def test_inspect_of_an_empty_dlq_and_of_a_missing_topic(topic: str, schema: str, group: str,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    for k, v in testkit.sink_env(schema, topic, group).items():
        monkeypatch.setenv(k, v)
    assert cli.main(["inspect", "--json"]) == 0
    empty = json.loads(capsys.readouterr().out)
    assert (empty["records"], empty["by_error_class"], empty["first_failure"]) == (0, {}, None)
    assert cli.main(["inspect", "--dlq-topic", f"{topic}.nope"]) == 1
    assert "cannot be read" in capsys.readouterr().err


def test_replay_without_kafka_transactions_gives_the_same_result(filled: Filled) -> None:
    f = filled
    operator_fixes(f.schema)
    f.env["KAFKA_TRANSACTIONAL"] = "false"
    ends = {p: o for p, o in testkit.end_offsets(f.dlq).items() if o > 0}
    out = f.replay()
    assert (out["counts"]["inserted"], out["counts"]["dlq"]) == (f.fixable, f.broken)
    # Committed up to the end as of the start (not past the records it wrote back meanwhile).
    assert testkit.committed_offsets(f.replay_group, f.dlq) == ends
    assert attempts(f.dlq) == {1: f.fixable + f.broken, 2: f.broken}
    assert f.replay()["counts"]["inserted"] == 0


def test_sigterm_finishes_the_batch_in_flight_exits_130_and_a_rerun_completes(
        topic: str, schema: str, group: str, logdir: Path) -> None:
    logdir.mkdir(parents=True, exist_ok=True)
    f = fill_dlq(topic, schema, group, logdir, ok=10, fixable=300, broken_write=10, invalid_json=10,
                 invalid_fields=0)
    operator_fixes(f.schema)
    proc = f.start_replay("--batch-size", "2", name="terminated")
    try:
        testkit.wait_for(lambda: sum(committed_now(f.replay_group, f.dlq).values()) > 0, 120, interval=0.05,
                         what="the replay's progress")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    events = [json.loads(line) for line in (f.logdir / "terminated.log").read_text().splitlines()
              if line.startswith("{")]
    (audit,) = [e for e in events if e["event"] == "dlq_replay_finished"]
    assert audit["outcome"] == "interrupted" and audit["error"] is None
    # Clean stop: what it counted is exactly what it committed, nothing is pending.
    assert testkit.row_count(f.schema) == f.ok + audit["inserted"]
    assert attempts(f.dlq)[2] == audit["dlq"]
    rest = f.replay()
    assert rest["counts"]["already_present"] == 0
    assert audit["inserted"] + rest["counts"]["inserted"] == f.fixable
    assert testkit.row_count(f.schema) == f.ok + f.fixable
