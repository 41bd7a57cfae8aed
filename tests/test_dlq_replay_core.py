"""dlq.replay.Replayer: the replay's ordering and policies, with in-memory fakes (no Kafka, no database)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dlq.filters import build_filter
from dlq.reader import PartitionRange
from dlq.replay import Counts, OnFailure, Outcome, Replayer, ReplayOptions
from sink.envelope import (
    H_ATTEMPT,
    DlqRecord,
    fit_record,
    original_headers,
    parse_headers,
    record_bytes,
    to_dlq_record,
)
from sink.errors import FatalError, RetryableError
from sink.retry import RetryPolicy
from sink.types import Rejection, SourceRecord
from tests.fakes import ListOutbox, TableWriter

DLQ = "in.dlq"
TP = tuple[str, int]


def good(i: int, value: float | None = None) -> bytes:
    return json.dumps({"timestamp": 1_700_000_000 + i, "mac_address": "dev",
                       "value": i if value is None else value}).encode()


def dlq_record(dlq_partition: int, dlq_offset: int, value: bytes, *, error_class: str = "CheckViolation",
               stage: str = "write", origin_offset: int | None = None) -> SourceRecord:
    """A DLQ record exactly as the sink makes one (to_dlq_record), read back from the DLQ."""
    source = SourceRecord("in", 0, dlq_offset if origin_offset is None else origin_offset, b"k", value,
                          (("trace", b"t1"),), 1_700_000_000_000)
    env = to_dlq_record(Rejection(source, stage, error_class, "rejected", "23514" if stage == "write" else None))
    return SourceRecord(DLQ, dlq_partition, dlq_offset, env.key, env.value, env.headers, 1)


class ListReader:
    """Hands out fixed records in batches of max_records; passed/done like the real reader."""

    def __init__(self, records: list[SourceRecord], partitions: int = 1) -> None:
        self.topic = DLQ
        self.pending = list(records)
        ends: dict[int, int] = {p: 0 for p in range(partitions)}
        for r in records:
            ends[r.partition] = max(ends[r.partition], r.offset + 1)
        self.plan = {p: PartitionRange(p, 0, e) for p, e in ends.items()}
        self.handed = 0
        self.fail_next = 0

    @property
    def done(self) -> bool:
        return not self.pending

    @property
    def passed(self) -> int:
        return self.handed

    def read(self, max_records: int, timeout: float = 0.5) -> list[SourceRecord]:
        if self.fail_next:
            self.fail_next -= 1
            raise RetryableError("dlq_read", "broker down")
        out, self.pending = self.pending[:max_records], self.pending[max_records:]
        self.handed += len(out)
        return out


def make(records: list[SourceRecord], partitions: int = 1, **opts: Any) -> tuple[Replayer, TableWriter, ListOutbox,
                                                                                  list[str]]:
    events: list[str] = []
    writer, outbox = TableWriter(events), ListOutbox(events)
    options = ReplayOptions(dlq_topic=DLQ, retry=RetryPolicy(attempts=4, initial_backoff=0.01, max_backoff=0.01),
                            **opts)
    sleeps: list[float] = []
    return Replayer(options, ListReader(records, partitions), writer, outbox, sleep=sleeps.append), writer, outbox, \
        events


def counts(c: Counts) -> dict[str, int]:
    return {k: v for k, v in c.as_dict().items() if v}


def test_rows_are_committed_in_the_database_before_the_offsets() -> None:
    records = [dlq_record(0, i, good(i)) for i in range(10)]
    r, writer, _outbox, events = make(records, batch_size=4)
    result = r.run()
    assert result.outcome is Outcome.COMPLETED
    assert len(writer.rows) == 10
    assert events == ["write:4", "commit:0:[(('in.dlq', 0), 4)]", "write:4", "commit:0:[(('in.dlq', 0), 8)]",
                      "write:2", "commit:0:[(('in.dlq', 0), 10)]"]
    assert counts(result.counts) == {"replayed": 10, "inserted": 10}


def test_replaying_twice_inserts_nothing_new_and_reports_already_present() -> None:
    records = [dlq_record(0, i, good(i)) for i in range(6)]
    r, writer, _, _ = make(records)
    r.run()
    again = Replayer(r.opts, ListReader(records), writer, ListOutbox([]))
    assert counts(again.run().counts) == {"replayed": 6, "already_present": 6}
    assert len(writer.rows) == 6


def test_records_failing_again_go_back_to_the_dlq_with_attempt_2_in_the_same_commit_as_the_offsets() -> None:
    records = [dlq_record(0, 0, good(0)), dlq_record(0, 1, b"not json", error_class="InvalidJson", stage="decode"),
               dlq_record(0, 2, good(2, value=5000.0)), dlq_record(0, 3, good(3))]
    r, writer, outbox, events = make(records)
    writer.poison = lambda row: row[5] == 5000.0
    result = r.run()
    assert counts(result.counts) == {"replayed": 4, "inserted": 2, "failed_again": 2, "dlq": 2}
    assert events[-1] == "commit:2:[(('in.dlq', 0), 4)]"
    assert [topic for topic, _ in outbox.outputs] == [DLQ, DLQ]
    infos = [parse_headers(rec.headers) for _, rec in outbox.outputs]
    assert [(i.attempt, i.stage, i.error_class, i.topic, i.partition, i.offset) for i in infos] == [
        (2, "decode", "InvalidJson", "in", 0, 1),
        (2, "write", "CheckViolation", "in", 0, 2),
    ]
    # The record's own headers survive, ours are replaced (one attempt header, not two).
    first = outbox.outputs[0][1]
    assert ("trace", b"t1") in first.headers
    assert [k for k, _ in first.headers].count(H_ATTEMPT) == 1


def test_on_failure_skip_leaves_failures_out_but_commits_past_them() -> None:
    records = [dlq_record(0, 0, b"{}", error_class="ValidationError", stage="validate"), dlq_record(0, 1, good(1))]
    r, _writer, outbox, _ = make(records, on_failure=OnFailure.SKIP)
    result = r.run()
    assert counts(result.counts) == {"replayed": 2, "inserted": 1, "failed_again": 1}
    assert outbox.outputs == []
    assert outbox.offsets == {(DLQ, 0): 2}


def test_on_failure_stop_commits_up_to_the_failing_record_and_writes_nothing_after_it() -> None:
    records = [dlq_record(0, i, good(i, value=5000.0 if i == 3 else None)) for i in range(6)]
    r, writer, outbox, _ = make(records, on_failure=OnFailure.STOP)
    writer.poison = lambda row: row[5] == 5000.0
    result = r.run()
    assert result.outcome is Outcome.STOPPED_ON_FAILURE
    assert result.stopped_at is not None and result.stopped_at.record.offset == 3
    assert sorted(row[5] for row in writer.rows.values()) == [0.0, 1.0, 2.0]
    assert outbox.offsets == {(DLQ, 0): 3}
    assert outbox.outputs == []
    assert counts(result.counts) == {"replayed": 3, "inserted": 3}


def test_on_failure_stop_at_a_decode_failure_writes_nothing_of_the_rest() -> None:
    records = [dlq_record(0, 0, good(0)), dlq_record(0, 1, b"\xff", error_class="InvalidUtf8", stage="decode"),
               dlq_record(0, 2, good(2))]
    r, writer, outbox, _ = make(records, on_failure=OnFailure.STOP)
    result = r.run()
    assert result.outcome is Outcome.STOPPED_ON_FAILURE
    assert len(writer.rows) == 1
    assert outbox.offsets == {(DLQ, 0): 1}


def test_filtered_out_records_are_skipped_and_committed_past() -> None:
    records = [dlq_record(0, 0, good(0)), dlq_record(0, 1, good(1), error_class="InvalidJson", stage="decode"),
               dlq_record(0, 2, good(2))]
    r, _writer, outbox, _ = make(records, filter=build_filter(error_classes=["CheckViolation"]))
    result = r.run()
    assert counts(result.counts) == {"replayed": 2, "inserted": 2, "skipped": 1}
    assert outbox.offsets == {(DLQ, 0): 3}


def test_max_stops_after_n_selected_records_and_commits_nothing_beyond() -> None:
    records = [dlq_record(0, i, good(i), error_class="CheckViolation" if i % 2 else "Other") for i in range(10)]
    r, _writer, outbox, _ = make(records, max_records=2, batch_size=100,
                                filter=build_filter(error_classes=["CheckViolation"]))
    result = r.run()
    assert result.outcome is Outcome.MAX_REACHED
    assert counts(result.counts) == {"replayed": 2, "inserted": 2, "skipped": 2}
    # Offsets 0..3 processed (1 and 3 replayed, 0 and 2 skipped); 4 is where the next run starts.
    assert outbox.offsets == {(DLQ, 0): 4}


def test_dry_run_writes_nothing_produces_nothing_commits_nothing() -> None:
    records = [dlq_record(0, 0, good(0)), dlq_record(0, 1, b"nope", error_class="InvalidJson", stage="decode")]
    r, writer, outbox, events = make(records, dry_run=True)
    result = r.run()
    assert result.outcome is Outcome.COMPLETED
    assert counts(result.counts) == {"replayed": 2, "valid": 1, "failed_again": 1}
    assert events == [] and writer.calls == [] and outbox.offsets == {}
    # It needs neither adapter at all.
    assert Replayer(r.opts, ListReader(records), None, None).run().counts == result.counts


def test_to_topic_republishes_the_original_record_and_writes_nothing() -> None:
    records = [dlq_record(0, 0, good(0)), dlq_record(0, 1, b"nope", error_class="InvalidJson", stage="decode")]
    r, writer, outbox, _ = make(records, to_topic="in")
    result = r.run()
    assert counts(result.counts) == {"replayed": 2, "republished": 1, "failed_again": 1, "dlq": 1}
    assert writer.calls == []
    (topic, rec), (dlq_topic, back) = outbox.outputs
    assert (topic, rec.key, rec.value) == ("in", b"k", good(0))
    assert rec.headers == original_headers(records[0].headers) == (("trace", b"t1"),)
    assert dlq_topic == DLQ and parse_headers(back.headers).attempt == 2


def test_retryable_trouble_is_retried_and_nothing_is_counted_twice() -> None:
    records = [dlq_record(0, i, good(i)) for i in range(3)]
    r, writer, outbox, _ = make(records)
    writer.fail_next = 2
    outbox.fail_next = 1
    assert isinstance(r.reader, ListReader)
    r.reader.fail_next = 1
    result = r.run()
    assert counts(result.counts) == {"replayed": 3, "inserted": 3}
    assert outbox.offsets == {(DLQ, 0): 3}


def test_persistent_trouble_is_fatal_and_the_batch_stays_uncommitted() -> None:
    records = [dlq_record(0, i, good(i)) for i in range(3)]
    r, _writer, outbox, _ = make(records)
    outbox.fail_next = 100
    with pytest.raises(FatalError, match="replay_commit still failing after 4 attempts"):
        r.run()
    assert outbox.offsets == {}
    assert r.counts.replayed == 0


def test_offsets_are_per_partition_and_reaching_the_end_commits_the_end() -> None:
    records = [dlq_record(p, o, good(p * 10 + o)) for o in range(3) for p in range(2)]
    r, _, outbox, _ = make(records, partitions=3, batch_size=4)
    r.reader.plan[2] = PartitionRange(2, 5, 7)  # e.g. only transaction markers / aborted records left
    r.run()
    assert outbox.offsets == {(DLQ, 0): 3, (DLQ, 1): 3, (DLQ, 2): 7}


def test_stop_request_finishes_the_batch_in_flight_then_stops() -> None:
    records = [dlq_record(0, i, good(i)) for i in range(10)]
    stop = {"now": False}
    events: list[str] = []
    writer, outbox = TableWriter(events), ListOutbox(events)

    def progress(passed: int, c: Counts) -> None:
        stop["now"] = True

    r = Replayer(ReplayOptions(dlq_topic=DLQ, batch_size=3), ListReader(records), writer, outbox,
                 on_progress=progress, stop_requested=lambda: stop["now"])
    result = r.run()
    assert result.outcome is Outcome.INTERRUPTED
    assert outbox.offsets == {(DLQ, 0): 3}
    assert counts(result.counts) == {"replayed": 3, "inserted": 3}


def test_options_are_validated_eagerly() -> None:
    with pytest.raises(ValueError, match="DLQ topic itself"):
        ReplayOptions(dlq_topic=DLQ, to_topic=DLQ)
    with pytest.raises(ValueError, match="--max"):
        ReplayOptions(dlq_topic=DLQ, max_records=0)
    with pytest.raises(ValueError, match="needs a writer"):
        Replayer(ReplayOptions(dlq_topic=DLQ), ListReader([]), None, ListOutbox([]))


def test_a_record_stored_without_its_value_fails_again_saying_where_the_original_is() -> None:
    # The sink stores a record too large for the DLQ topic without its value (fit_record).
    whole = dlq_record(0, 1, b"{" + b"x" * 5000, error_class="InvalidJson", stage="decode", origin_offset=41)
    slim = fit_record(DlqRecord(whole.key, whole.value, whole.headers), 2000)
    records = [dlq_record(0, 0, good(0)), SourceRecord(DLQ, 0, 1, slim.key, slim.value, slim.headers, 1)]
    r, writer, outbox, _ = make(records)
    result = r.run()
    assert counts(result.counts) == {"replayed": 2, "inserted": 1, "failed_again": 1, "dlq": 1}
    assert len(writer.rows) == 1
    (out,) = [rec for _, rec in outbox.outputs]
    info = parse_headers(out.headers)
    assert (info.error_class, info.dropped, info.offset, info.attempt) == ("ValueNotInDlq", "value", 41, 2)
    assert info.message is not None and "offset 41" in info.message
    assert out.value is None


def test_a_record_failing_again_is_fitted_to_what_the_dlq_topic_takes() -> None:
    records = [dlq_record(0, 0, b"{" + b"y" * 30_000, error_class="InvalidJson", stage="decode")]
    r, _writer, outbox, _ = make(records, dlq_max_bytes=20_000)
    r.run()
    (out,) = [rec for _, rec in outbox.outputs]
    assert out.value is None and record_bytes(out) <= 20_000
    assert parse_headers(out.headers).dropped == "value"
