"""The loop's ordering guarantees, with small in-memory fakes and a manual clock (no sleeping)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any

import pytest
from structlog.testing import capture_logs

from sink.breaker import DlqBreaker, DlqBreakerPolicy
from sink.envelope import DlqRecord, parse_headers
from sink.errors import FatalError, RetryableError
from sink.model import Row
from sink.pipeline import Pipeline, PipelineConfig
from sink.retry import RetryPolicy
from sink.types import InsertTurn, SourceRecord, WriteResult
from sink.write_stage import BatchState
from tests.fakes import ManualClock, TableWriter

TOPIC = "in"
TP = tuple[str, int]


class ListSource:
    """Records per partition; consume() hands them out and advances the clock by the timeout
    when there is nothing to give (as a real poll would block)."""

    def __init__(self, clock: ManualClock, records: list[SourceRecord]) -> None:
        self.clock = clock
        self.pending = list(records)
        self.broker_up = True
        self.paused = False
        self.pause_calls = 0
        self.assigned: set[TP] = {(TOPIC, p) for p in range(3)}
        self.on_assign: Callable[[list[TP]], None] = lambda tps: None
        self.on_revoke: Callable[[list[TP]], None] = lambda tps: None
        self.hooks: list[Callable[[], None]] = []  # run once per consume call (to inject rebalances)

    def set_rebalance_listener(self, on_assign: Any, on_revoke: Any) -> None:
        self.on_assign, self.on_revoke = on_assign, on_revoke

    def consume(self, max_records: int, timeout: float) -> list[SourceRecord]:
        for hook in list(self.hooks):
            hook()
        if self.paused or not self.pending:
            self.clock.now += max(timeout, 0.001)
            return []
        out, self.pending = self.pending[:max_records], self.pending[max_records:]
        return out

    def lags(self, committed: dict[TP, int]) -> dict[int, int]:
        return {}

    def pause(self) -> None:
        self.paused = True
        self.pause_calls += 1

    def resume(self) -> None:
        self.paused = False

    def assignment(self) -> set[TP]:
        return set(self.assigned)

    def revoke(self, tps: list[TP]) -> None:
        self.assigned -= set(tps)
        self.on_revoke(tps)


class RecordingCommitter:
    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.dlq: list[DlqRecord] = []
        self.offsets: dict[TP, int] = {}
        self.fail_next = 0

    def complete(self, dlq: Sequence[DlqRecord], offsets: dict[TP, int]) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise RetryableError("commit", "broker unavailable")
        self.dlq.extend(dlq)
        self.offsets.update(offsets)
        self.events.append(f"commit:{len(dlq)}")


def rec(partition: int, offset: int, value: bytes | None) -> SourceRecord:
    return SourceRecord(TOPIC, partition, offset, None, value)


def good(i: int, device: str = "dev") -> bytes:
    return json.dumps({"timestamp": 1_700_000_000 + i, "mac_address": device, "value": i}).encode()


def make(records: list[SourceRecord], batch_size: int = 10, breaker: DlqBreaker | None = None,
         spare: TableWriter | None = None, first: TableWriter | None = None,
         **cfg: Any) -> tuple[Pipeline, ListSource, TableWriter, RecordingCommitter, list[str], ManualClock]:
    clock = ManualClock()
    events: list[str] = []
    source = ListSource(clock, records)
    writer = first or TableWriter(events)
    writer.events = events
    if spare is not None:  # a second connection to the same table
        spare.rows, spare.events = writer.rows, events
    committer = RecordingCommitter(events)
    conf = PipelineConfig(topic=TOPIC, batch_size=batch_size, batch_timeout=1.0, retry=RetryPolicy(0, 0.5, 4.0),
                          **cfg)
    p = Pipeline(conf, source, writer, committer, clock=clock,
                 breaker=breaker or DlqBreaker(DlqBreakerPolicy(enabled=False)),
                 more_writers=[spare] if spare is not None else [])
    return p, source, writer, committer, events, clock


def run_until(p: Pipeline, cond: Callable[[], bool], max_steps: int = 10_000) -> None:
    """Step until cond(); max_steps bounds the loop while nothing runs beside it, 30 s of real
    time while writer threads do (the manual clock does not wait for them)."""
    deadline, steps = time.monotonic() + 30, 0
    while steps < max_steps or (p.in_flight() and time.monotonic() < deadline):
        if cond():
            return
        p.step()
        steps += 1
    if not cond():
        raise AssertionError("condition not reached")


def test_rows_are_written_before_offsets_are_committed() -> None:
    records = [rec(i % 3, i // 3, good(i)) for i in range(30)]
    p, _source, writer, committer, events, _ = make(records)
    inner = committer.complete
    checked = []

    def complete(dlq: Sequence[DlqRecord], offsets: dict[TP, int]) -> None:
        written = {row[5] for row in writer.rows.values()}  # value = the record's number i
        for (_, partition), offset in offsets.items():  # record i is (partition i % 3, offset i // 3)
            assert {3 * o + partition for o in range(offset)} <= written, "offset committed before its row"
        checked.append(offsets)
        inner(dlq, offsets)

    committer.complete = complete  # type: ignore[method-assign]
    run_until(p, lambda: committer.offsets == {(TOPIC, 0): 10, (TOPIC, 1): 10, (TOPIC, 2): 10})
    assert len(writer.rows) == 30
    assert events[0].startswith("write:") and checked


def test_partial_batch_is_flushed_after_timeout_without_sleeping() -> None:
    p, _, writer, committer, _, clock = make([rec(0, 0, good(0)), rec(0, 1, good(1))], batch_size=100)
    start = clock.now
    run_until(p, lambda: committer.offsets == {(TOPIC, 0): 2})
    assert len(writer.rows) == 2
    assert 1.0 <= clock.now - start < 2.0


def test_no_commit_while_database_is_down_and_everything_lands_after() -> None:
    records = [rec(0, i, good(i)) for i in range(10)]
    p, source, writer, committer, events, _clock = make(records)
    writer.fail_next = 6
    run_until(p, lambda: bool(committer.offsets))
    # Six failed attempts with exponential backoff: the consumer was paused and kept polling.
    assert writer.writes >= 7
    assert source.pause_calls >= 1 and not source.paused
    assert events == ["write:10", "commit:0"]
    assert committer.offsets == {(TOPIC, 0): 10}
    assert committer.dlq == []
    assert len(writer.rows) == 10


def test_records_fetched_while_paused_are_kept_not_lost() -> None:
    records = [rec(0, i, good(i)) for i in range(10)]
    p, source, writer, committer, _, _ = make(records, batch_size=5)
    writer.fail_next = 2
    # A source that ignores pause (librdkafka may hand out prefetched messages).
    source.pause = lambda: None  # type: ignore[method-assign]
    run_until(p, lambda: committer.offsets.get((TOPIC, 0)) == 10)
    assert len(writer.rows) == 10


def test_poison_row_goes_to_dlq_and_its_batch_mates_are_written() -> None:
    records = [rec(0, i, good(i)) for i in range(10)]
    p, _, writer, committer, _, _ = make(records)
    writer.poison = lambda row: row[5] == 7.0
    run_until(p, lambda: bool(committer.offsets))
    assert sorted(r[5] for r in writer.rows.values()) == [float(i) for i in range(10) if i != 7]
    assert len(committer.dlq) == 1
    info = parse_headers(committer.dlq[0].headers)
    assert (info.stage, info.error_class, info.sqlstate, info.partition, info.offset) == (
        "write", "CheckViolation", "23514", 0, 7)
    assert committer.dlq[0].value == good(7)
    assert committer.offsets == {(TOPIC, 0): 10}


def test_undecodable_records_go_to_dlq_with_original_bytes() -> None:
    bad = [b"", b"\xff", b"{x", b"[1]", b'{"mac_address": "a"}']
    records = [rec(1, i, v) for i, v in enumerate(bad)] + [rec(1, 5, good(5))]
    p, _, writer, committer, _, _ = make(records)
    run_until(p, lambda: bool(committer.offsets))
    assert [d.value for d in committer.dlq] == bad
    assert [parse_headers(d.headers).error_class for d in committer.dlq] == [
        "EmptyValue", "InvalidUtf8", "InvalidJson", "NotAnObject", "ValidationError"]
    assert len(writer.rows) == 1
    assert committer.offsets == {(TOPIC, 1): 6}


def test_breaker_trip_stops_before_dlq_and_commit() -> None:
    records = [rec(0, i, b"{bad") for i in range(10)]
    breaker = DlqBreaker(DlqBreakerPolicy(enabled=True, consecutive=5, window=100, ratio=0.9))
    p, _, _, committer, events, _ = make(records, breaker=breaker)
    with pytest.raises(FatalError, match="DLQ breaker tripped"):
        run_until(p, lambda: False)
    assert committer.dlq == [] and committer.offsets == {}
    assert not any(e.startswith("commit") for e in events)


def test_commit_failure_is_retried_and_dlq_is_not_duplicated() -> None:
    records = [rec(0, 0, b"{bad"), rec(0, 1, good(1))]
    p, _, _, committer, _, _ = make(records)
    committer.fail_next = 3
    run_until(p, lambda: bool(committer.offsets))
    assert len(committer.dlq) == 1
    assert committer.offsets == {(TOPIC, 0): 2}


def test_partition_revoked_during_outage_is_not_committed() -> None:
    records = [rec(0, i, good(i)) for i in range(5)] + [rec(1, i, good(100 + i)) for i in range(5)]
    p, source, writer, committer, _, _ = make(records)
    writer.fail_next = 2
    fired = []

    def revoke_once() -> None:
        if source.paused and not fired:
            fired.append(1)
            source.revoke([(TOPIC, 1)])

    source.hooks.append(revoke_once)
    run_until(p, lambda: bool(committer.offsets))
    assert fired
    assert committer.offsets == {(TOPIC, 0): 5}
    assert sorted(r[5] for r in writer.rows.values()) == [float(i) for i in range(5)]


def test_stop_writes_and_commits_the_open_batch() -> None:
    records = [rec(2, i, good(i)) for i in range(3)]
    p, _source, writer, committer, _, _ = make(records, batch_size=100)
    p.step()
    p.request_stop()
    p.run()
    assert committer.offsets == {(TOPIC, 2): 3}
    assert len(writer.rows) == 3


def test_stop_during_outage_gives_up_without_commit_after_timeout() -> None:
    records = [rec(0, i, good(i)) for i in range(3)]
    p, _, writer, committer, _, clock = make(records, batch_size=100, shutdown_timeout=5.0)
    writer.fail_next = 10_000
    p.step()
    p.request_stop()
    start = clock.now
    with capture_logs() as logs:
        p.run()  # returns: ShutdownExpired is logged, not raised
    assert committer.offsets == {}
    # It kept retrying until the shutdown timeout, and gave up within one backoff (4 s) after it.
    assert 5.0 <= clock.now - start < 5.0 + 5.0
    assert writer.writes > 1
    [expired] = [e for e in logs if e["event"] == "shutdown_timeout"]
    assert expired["log_level"] == "warning"
    assert "db_write still failing at shutdown" in expired["reason"]
    assert not [e for e in logs if e["event"] == "batch_committed"]


def test_duplicates_are_counted_not_rewritten() -> None:
    records = [rec(0, 0, good(1)), rec(0, 1, good(1)), rec(0, 2, good(2))]
    p, _, writer, committer, _, _ = make(records)
    run_until(p, lambda: bool(committer.offsets))
    assert len(writer.rows) == 2
    assert p.metrics.duplicates._value.get() == 1
    assert p.metrics.inserted._value.get() == 2


def test_insert_seconds_add_up_every_write_that_went_in_bisection_included() -> None:
    records = [rec(0, i, good(i)) for i in range(10)]
    p, _, writer, committer, _, _ = make(records)
    writer.poison = lambda row: row[5] == 7.0
    writer.insert_s = 0.125
    run_until(p, lambda: bool(committer.offsets))
    # The writes that went in (the failed ones, which raise, count nothing): the 9 good rows in pieces.
    went_in = [int(e.split(":")[1]) for e in writer.events if e.startswith("write:")]
    assert sum(went_in) == 9 and len(went_in) > 1
    assert p.metrics.insert_seconds._value.get() == 0.125 * len(went_in)


def committing_only_written_rows(committer: RecordingCommitter, writer: TableWriter) -> list[int]:
    """Wrap the committer: each commit must cover only rows already in the table (one row per
    record here), and its offsets are recorded."""
    commits: list[int] = []
    inner = committer.complete

    def complete(dlq: Sequence[DlqRecord], offsets: dict[TP, int]) -> None:
        assert offsets[(TOPIC, 0)] <= len(writer.rows), "offset committed before its row was written"
        inner(dlq, offsets)
        commits.append(offsets[(TOPIC, 0)])

    committer.complete = complete  # type: ignore[method-assign]
    return commits


def test_a_backlog_shares_kafka_commits_between_batches() -> None:
    p, _, writer, committer, events, _ = make([rec(0, i, good(i)) for i in range(100)])
    commits = committing_only_written_rows(committer, writer)
    run_until(p, lambda: committer.offsets.get((TOPIC, 0)) == 100)
    assert events.count("write:10") == 10
    # The manual clock stands still while records keep coming: no commit_interval passes, so
    # batches wait until the sink has caught up with the topic (the last write in flight then
    # commits on its own).
    assert len(commits) <= 2 and commits[-1] == 100


def test_written_batches_wait_at_most_the_commit_interval() -> None:
    p, _, writer, committer, _, clock = make([rec(0, i, good(i)) for i in range(100)], commit_interval=0.5)
    commits = committing_only_written_rows(committer, writer)
    inner = writer.write

    def slow_write(rows: Sequence[Row], turn: InsertTurn | None = None) -> WriteResult:
        clock.now += 0.2  # each write takes 0.2 s
        return inner(rows, turn)

    writer.write = slow_write  # type: ignore[method-assign]
    run_until(p, lambda: committer.offsets.get((TOPIC, 0)) == 100)
    assert 3 <= len(commits) < 10 and commits == sorted(commits) and commits[-1] == 100


def test_commit_interval_zero_commits_every_batch() -> None:
    p, _, writer, committer, _, _ = make([rec(0, i, good(i)) for i in range(100)], commit_interval=0.0)
    commits = committing_only_written_rows(committer, writer)
    run_until(p, lambda: committer.offsets.get((TOPIC, 0)) == 100)
    assert commits == list(range(10, 101, 10))


class TimedWriter(TableWriter):
    """Records (in one shared sequence) when each write's COPY starts, its INSERT starts, its
    rows are in, and the write ends; takes a little while, so that two writers overlap."""

    def __init__(self, marks: list[tuple[str, int]]) -> None:
        super().__init__([])
        self.marks = marks

    def write(self, rows: Sequence[Row], turn: InsertTurn | None = None) -> WriteResult:
        first = rows[0][5] if rows else -1
        self.marks.append(("copy", first))
        time.sleep(0.005)
        if turn is not None:
            turn.wait(lambda: None)
        self.marks.append(("insert", first))
        time.sleep(0.01)
        try:
            result = super().write(rows)
            self.marks.append(("inserted", first))
            if turn is not None:
                turn.passed()
            time.sleep(0.005)  # fetch + commit
            return result
        finally:
            self.marks.append(("end", first))


def test_with_a_spare_writer_the_next_batch_inserts_once_the_previous_rows_are_in() -> None:
    marks: list[tuple[str, int]] = []
    p, _, timed, committer, _, _ = make([rec(0, i, good(i)) for i in range(100)], first=TimedWriter(marks),
                                        spare=TimedWriter(marks))
    commits = committing_only_written_rows(committer, timed)
    run_until(p, lambda: committer.offsets.get((TOPIC, 0)) == 100)
    assert len(timed.rows) == 100 and commits[-1] == 100
    at = {m: i for i, m in enumerate(marks)}
    batches = sorted({first for _, first in marks})
    assert batches == list(range(0, 100, 10))
    for prev, nxt in pairwise(batches):
        assert at[("insert", nxt)] > at[("inserted", prev)], "a batch inserted before the previous one's rows were in"
    assert any(at[("copy", nxt)] < at[("inserted", prev)] for prev, nxt in pairwise(batches)), \
        "the next batch was never staged while the previous one inserted"
    assert any(at[("insert", nxt)] < at[("end", prev)] for prev, nxt in pairwise(batches)), \
        "the next batch never inserted while the previous one committed"


def test_with_a_spare_writer_a_bisecting_batch_finishes_before_the_next_one_inserts() -> None:
    marks: list[tuple[str, int]] = []
    first, spare = TimedWriter(marks), TimedWriter(marks)
    first.poison = spare.poison = lambda row: row[5] == 13  # record 13, in the batch of 10..19
    p, _, timed, committer, _, _ = make([rec(0, i, good(i)) for i in range(40)], first=first, spare=spare)
    run_until(p, lambda: committer.offsets.get((TOPIC, 0)) == 40)
    assert len(timed.rows) == 39 and len(committer.dlq) == 1
    last_end_of_poisoned = max(i for i, (kind, f) in enumerate(marks) if kind == "end" and 10 <= f < 20)
    first_insert_of_next = min(i for i, (kind, f) in enumerate(marks) if kind == "insert" and f == 20)
    assert first_insert_of_next > last_end_of_poisoned


def test_with_a_spare_writer_a_database_outage_loses_nothing_and_commits_in_order() -> None:
    spare = TableWriter([])
    p, _, writer, committer, _, _ = make([rec(0, i, good(i)) for i in range(100)], spare=spare)
    writer.fail_next, spare.fail_next = 3, 3
    commits = committing_only_written_rows(committer, writer)
    run_until(p, lambda: committer.offsets.get((TOPIC, 0)) == 100)
    assert len(writer.rows) == 100
    assert commits == sorted(commits) and commits[-1] == 100


def failing_from(writer: TableWriter, value: float) -> None:
    """From the batch holding the row with this value on, every write fails (a database gone)."""
    inner = writer.write

    def write(rows: Sequence[Row], turn: InsertTurn | None = None) -> WriteResult:
        if any(r[5] >= value for r in rows):
            raise RetryableError("db_write", "connection refused")
        return inner(rows, turn)

    writer.write = write  # type: ignore[method-assign]


def one_written_one_writing(p: Pipeline) -> bool:
    return {BatchState.COMMITTING, BatchState.WRITING} <= set(p.in_flight())


def test_stop_timing_out_on_a_write_still_commits_the_batches_already_written() -> None:
    p, _, writer, committer, _, _ = make([rec(0, i, good(i)) for i in range(20)], shutdown_timeout=5.0)
    failing_from(writer, 10.0)  # the second batch never gets in
    run_until(p, lambda: one_written_one_writing(p))  # the first is written, the second on its way
    p.request_stop()
    p.run()  # returns: ShutdownExpired is logged, not raised
    assert committer.offsets == {(TOPIC, 0): 10}
    assert len(writer.rows) == 10


def test_a_breaker_trip_still_commits_the_batches_written_before_the_tripping_one() -> None:
    # A backlog: the good batch's commit waits for the next batches (not caught up).
    records = ([rec(0, i, good(i)) for i in range(10)] + [rec(0, i, b"{bad") for i in range(10, 20)]
               + [rec(0, i, good(i)) for i in range(20, 40)])
    breaker = DlqBreaker(DlqBreakerPolicy(enabled=True, consecutive=5, window=100, ratio=0.9))
    p, _, _, committer, events, _ = make(records, breaker=breaker)
    with pytest.raises(FatalError, match="DLQ breaker tripped"):
        p.run()
    assert events.index("write:10") < events.index("commit:0")  # committed on the way out
    assert committer.offsets == {(TOPIC, 0): 10}  # the good batch, not the tripping one
    assert committer.dlq == []


def test_gauges_and_readiness_follow_the_broker_through_a_database_outage() -> None:
    p, source, writer, committer, _, _ = make([rec(0, i, good(i)) for i in range(5)])
    writer.fail_next = 4
    seen: list[bool] = []
    inner = writer.write

    def write(rows: Sequence[Row], turn: InsertTurn | None = None) -> WriteResult:
        seen.append(p.health.broker_ok)
        return inner(rows, turn)

    writer.write = write  # type: ignore[method-assign]

    def broker_gone() -> None:
        if source.paused:  # retrying the write, consumption paused
            source.broker_up = False

    source.hooks.append(broker_gone)
    run_until(p, lambda: bool(committer.offsets))
    assert seen[0] is True and seen[-1] is False  # /readyz and sink_kafka_connected saw it mid-outage
    assert p.metrics.broker_up._value.get() == 0


def test_a_revoke_does_not_call_a_written_batch_discarded() -> None:
    records = ([rec(0, i, good(i)) for i in range(10)] + [rec(1, i, good(100 + i)) for i in range(10)]
               + [rec(0, i, good(i)) for i in range(10, 15)])
    p, source, _, _, _, _ = make(records)
    # Partition 0's first batch written (not committed), partition 1's being written, and
    # partition 0's next records in the open batch.
    run_until(p, lambda: one_written_one_writing(p) and len(p.batcher.batch) > 0)
    with capture_logs() as logs:
        source.revoke([(TOPIC, 0)])
    (discarded,) = [e for e in logs if e["event"] == "batch_discarded"]
    assert discarded["offsets"] == {"0": [10, 14]}  # not 0..9: those rows are in, only their commit moved


def test_a_stop_request_logs_nothing_itself_and_the_loop_says_it() -> None:
    p, _, _, committer, _, _ = make([rec(0, i, good(i)) for i in range(3)], batch_size=100)
    p.step()
    with capture_logs() as logs:
        p.request_stop()  # what a signal handler calls: logging there could deadlock
    assert logs == []
    with capture_logs() as logs:
        p.run()
    assert [e["event"] for e in logs].count("shutdown_requested") == 1
    assert committer.offsets == {(TOPIC, 0): 3}


def test_a_revoke_does_not_call_a_batch_whose_write_just_ended_discarded() -> None:
    records = ([rec(0, i, good(i)) for i in range(10)] + [rec(1, i, good(100 + i)) for i in range(10)]
               + [rec(1, i, good(100 + i)) for i in range(10, 15)])
    p, source, _, _, _, _ = make(records)
    # Partition 1's first batch in the writer (on_revoke waits for it to end), its next records open.
    run_until(p, lambda: BatchState.WRITING in p.in_flight() and len(p.batcher.batch) > 0)
    with capture_logs() as logs:
        source.revoke([(TOPIC, 1)])
    (discarded,) = [e for e in logs if e["event"] == "batch_discarded"]
    assert discarded["offsets"] == {"1": [10, 14]}  # not 0..9: that write went in


def test_a_record_that_makes_decoding_raise_goes_to_dlq_and_the_loop_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import sink.decode

    real = sink.decode.to_utc

    def broken(v: Any) -> Any:  # a decoder step that trips over one particular record
        if v.year == 2001:
            raise AttributeError("not expected")
        return real(v)

    monkeypatch.setattr(sink.decode, "to_utc", broken)
    odd = json.dumps({"mac_address": "a", "timestamp": "2001-01-01T00:00:00Z"}).encode()
    records = [rec(2, 0, good(0)), rec(2, 1, odd), rec(2, 2, good(2))]
    p, _, writer, committer, _, _ = make(records)
    with capture_logs() as logs:
        run_until(p, lambda: bool(committer.offsets))
    assert len(writer.rows) == 2
    assert [d.value for d in committer.dlq] == [odd]
    info = parse_headers(committer.dlq[0].headers)
    assert (info.stage, info.error_class, info.offset) == ("decode", "UnexpectedAttributeError", 1)
    assert committer.offsets == {(TOPIC, 2): 3}
    assert [e["log_level"] for e in logs if e["event"] == "record_fault"] == ["error"]
