"""The write stage without a database: results in submission order, INSERTs in turn, states."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import pytest

from sink.batcher import Batch, Batcher
from sink.errors import RetryableError
from sink.model import Row
from sink.types import InsertTurn, SourceRecord, WriteResult
from sink.write_stage import BatchState, InFlight, Turn, WriteStage, Written
from tests.fakes import TableWriter

TOPIC = "t"


def batch(first: int, n: int = 5, partition: int = 0) -> Batch:
    batcher = Batcher(100, 1.0)
    for i in range(first, first + n):
        row: Row = ("2026-01-01", f"dev-{i}", "m", "c", "1", float(i), None, None)  # type: ignore[assignment]
        batcher.add(SourceRecord(TOPIC, partition, i, None, b"{}"), row)
    return batcher.take()


def once(attempt: Callable[[], Written]) -> Written:
    return attempt()


def test_results_come_back_in_submission_order_with_their_states() -> None:
    stage = WriteStage([TableWriter(), TableWriter()], TOPIC, max_splits=8)
    first, second = InFlight(batch(0)), InFlight(batch(5))
    stage.submit(first)
    stage.submit(second)
    assert stage.full and stage.oldest is first
    assert stage.result(once).result.inserted == 5
    assert first.state is BatchState.WRITTEN
    assert stage.oldest is second
    assert stage.result(once).result.inserted == 5
    assert not stage.busy and second.state is BatchState.WRITTEN


def test_a_failed_first_attempt_is_retried_by_the_caller_and_stays_writing_until_then() -> None:
    writer = TableWriter()
    writer.fail_next = 1
    stage = WriteStage([writer], TOPIC, max_splits=8)
    item = InFlight(batch(0))
    stage.submit(item)
    stage.settle()
    assert stage.ready() and item.state is BatchState.WRITING  # its write did not go in

    attempts: list[int] = []

    def retry(attempt: Callable[[], Written]) -> Written:
        for n in range(3):
            attempts.append(n)
            try:
                return attempt()
            except RetryableError:
                continue
        raise AssertionError("not retried")

    assert stage.result(retry).result.inserted == 5
    assert attempts == [0, 1] and item.state is BatchState.WRITTEN and len(writer.rows) == 5


class GatedWriter(TableWriter):
    """A writer whose INSERT (after its turn) blocks until the test opens its gate."""

    def __init__(self, marks: list[str], gate: threading.Event) -> None:
        super().__init__()
        self.marks, self.gate = marks, gate

    def write(self, rows: Sequence[Row], turn: InsertTurn | None = None) -> WriteResult:
        if turn is not None:
            turn.wait(lambda: self.marks.append("keepalive"))
        self.marks.append(f"insert {rows[0][5]:.0f}")
        self.gate.wait(5)
        result = super().write(rows)
        if turn is not None:
            turn.passed()
        return result


def test_the_second_batch_inserts_only_after_the_first_one_s_insert() -> None:
    marks: list[str] = []
    gate = threading.Event()
    stage = WriteStage([GatedWriter(marks, gate), GatedWriter(marks, gate)], TOPIC, max_splits=8)
    stage.submit(InFlight(batch(0)))
    stage.submit(InFlight(batch(5)))
    threading.Event().wait(0.2)
    assert marks == ["insert 0"]  # the second waits for the first one's INSERT to go through
    gate.set()
    stage.result(once)
    stage.result(once)
    assert marks == ["insert 0", "insert 5"]


def test_a_turn_keeps_the_waiting_transaction_alive() -> None:
    previous = threading.Event()
    threading.Timer(0.25, previous.set).start()
    keepalives: list[int] = []
    Turn([previous], every=0.05).wait(lambda: keepalives.append(1))
    assert 3 <= len(keepalives) <= 6


def test_a_write_error_in_the_thread_reaches_the_caller() -> None:
    writer = TableWriter()
    writer.fail_next = 5
    stage = WriteStage([writer], TOPIC, max_splits=8)
    stage.submit(InFlight(batch(0)))
    with pytest.raises(RetryableError):
        stage.result(once)
    assert not stage.busy


def test_batches_of_other_partitions_insert_side_by_side_and_of_the_same_one_in_turn() -> None:
    marks: list[str] = []
    gate = threading.Event()
    writers = [GatedWriter(marks, gate) for _ in range(3)]
    stage = WriteStage(writers, TOPIC, max_splits=8)
    stage.submit(InFlight(batch(0, partition=0)))
    stage.submit(InFlight(batch(5, partition=1)))  # another partition: does not wait
    stage.submit(InFlight(batch(10, partition=0)))  # partition 0 again: waits for the first
    threading.Event().wait(0.3)
    assert sorted(marks) == ["insert 0", "insert 5"]
    gate.set()
    for _ in range(3):
        stage.result(once)
    assert marks[-1] == "insert 10"


def first_of_two_failing(marks: list[str]) -> tuple[WriteStage, GatedWriter, GatedWriter]:
    """Two batches of one partition in flight, on open gates; the first one's first attempt fails."""
    gate = threading.Event()
    gate.set()
    first, second = GatedWriter(marks, gate), GatedWriter(marks, gate)
    first.fail_next = 1
    stage = WriteStage([first, second], TOPIC, max_splits=8)
    stage.submit(InFlight(batch(0)))
    stage.submit(InFlight(batch(5)))
    return stage, first, second


def test_a_failed_batch_holds_back_the_later_ones_of_its_partition_until_its_retry() -> None:
    marks: list[str] = []
    stage, first, second = first_of_two_failing(marks)
    threading.Event().wait(0.3)
    assert marks == ["insert 0"]  # the first attempt failed; the second batch still waits
    stage.result(lambda attempt: _second_try(attempt))
    stage.result(once)
    assert marks == ["insert 0", "insert 0", "insert 5"] and len(first.rows) == 5 and len(second.rows) == 5


def _second_try(attempt: Callable[[], Written]) -> Written:
    try:
        return attempt()
    except RetryableError:
        return attempt()


def test_a_revoke_waiting_on_the_threads_does_not_wait_for_a_retry_that_only_it_would_run() -> None:
    stage, _, _ = first_of_two_failing([])
    done = threading.Event()
    threading.Thread(target=lambda: (stage.settle(), done.set()), daemon=True).start()
    assert done.wait(5), "settle() waited for a batch that waits for the failed one's retry"
    stage.close()


def test_with_several_writers_rows_go_in_key_order_and_the_first_of_a_key_stays_first() -> None:
    seen: list[list[str]] = []

    class Recording(TableWriter):
        def write(self, rows: Sequence[Row], turn: InsertTurn | None = None) -> WriteResult:
            seen.append([f"{r[1]}:{r[5]:.0f}" for r in rows])
            return super().write(rows, turn)

    b = Batcher(100, 1.0)
    for i, dev in enumerate(["c", "a", "b", "a"]):
        row: Row = ("2026-01-01", dev, "m", "c", "1", float(i), None, None)  # type: ignore[assignment]
        b.add(SourceRecord(TOPIC, 0, i, None, b"{}"), row)
    stage = WriteStage([Recording(), Recording()], TOPIC, max_splits=8)
    stage.submit(InFlight(b.take()))
    written = stage.result(once)
    assert seen == [["a:1", "a:3", "b:2", "c:0"]]
    assert [s.offset for s in written.duplicate_sources] == [3]  # the repeat is the later record


def test_a_revoke_during_the_retry_of_the_oldest_batch_does_not_wait_for_the_retry() -> None:
    # The loop retries the oldest batch itself, polling Kafka between attempts; a rebalance
    # served by that poll waits for the writer threads (settle), one of which waits for the
    # retried batch.  The wait must end: the revoke lets the later batch go.
    stage, _, _ = first_of_two_failing([])
    settled = threading.Event()

    def retry_serving_a_revoke(attempt: Callable[[], Written]) -> Written:
        try:
            return attempt()
        except RetryableError:
            waiter = threading.Thread(target=lambda: (stage.settle(), settled.set()), daemon=True)
            waiter.start()
            waiter.join(5)  # the revoke callback runs inside the retry's poll
            return attempt()

    stage.result(retry_serving_a_revoke)
    assert settled.is_set(), "settle() waited for the retry that was waiting for it"
    stage.result(once)
