"""One replay run with the real adapters: open them in a safe order, run, always write the audit line."""

from __future__ import annotations

import contextlib
import getpass
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import KafkaException

from dlq.progress import ProgressReporter, reporter
from dlq.reader import ConsumerOffsets, DlqReader, capture_plan, open_consumer, reader_access
from dlq.replay import Outcome, Replayer, ReplayOptions, ReplayResult, retry
from sink.errors import FatalError, classify_kafka_error
from sink.logs import get_logger
from sink.outbox import Outbox, PlainOutbox, TransactionalOutbox
from sink.settings import Settings
from sink.topics import dlq_max_message_bytes
from sink.writer import PgWriter

log = get_logger("dlq.runner")


def transactional_id(group: str) -> str:
    """Fixed per replay group: a new run's init_transactions aborts whatever a killed run left
    open (its records vanish, its offsets were never committed) instead of leaving it to time
    out while read_committed readers and this group's offsets wait, and it fences a second
    replay of the same group that is still running."""
    return f"sink-dlq-replay.{group}"


FENCED = ("another replay with the same consumer group took over (this one was fenced); "
          "its batch in flight was not committed")

EXIT_CODES = {Outcome.COMPLETED: 0, Outcome.MAX_REACHED: 0, Outcome.STOPPED_ON_FAILURE: 3, Outcome.INTERRUPTED: 130}
EXIT_FATAL = 1


def who() -> dict[str, str]:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no USER/LOGNAME and no passwd entry (some containers)
        user = "unknown"
    return {"user": user, "host": socket.gethostname()}


def replay_group(base: str | None, settings: Settings, opts: ReplayOptions) -> str:
    """`--group` (default <KAFKA_GROUP_ID>.dlq-replay), plus the filter's suffix when filtered."""
    return (base or f"{settings.kafka_group_id}.dlq-replay") + opts.filter.group_suffix()


def run_replay(settings: Settings, opts: ReplayOptions, group: str, *, tty: bool,
               stop_requested: Callable[[], bool] = lambda: False) -> tuple[int, dict[str, Any]]:
    """Returns (exit code, summary).  The audit line dlq_replay_finished is written in every case."""
    started = datetime.now(UTC)
    t0 = time.monotonic()
    base: dict[str, Any] = {
        **who(), "group": group, "topic": opts.dlq_topic, "filter": opts.filter.describe(),
        "dry_run": opts.dry_run, "to_topic": opts.to_topic, "on_failure": str(opts.on_failure),
        "max": opts.max_records, "started_at": _iso(started),
    }
    result: ReplayResult | None = None
    replayer: Replayer | None = None
    outcome, error = "error", None
    offsets = 0  # DLQ offsets to pass: the records and the Kafka transaction markers between them
    progress: ProgressReporter | None = None
    closers: list[Callable[[], Any]] = []
    try:
        reader, writer, outbox, dlq_max_bytes = _open(settings, opts, group, closers)
        opts = replace(opts, dlq_max_bytes=dlq_max_bytes)
        offsets = reader.total
        txn_id = transactional_id(group) if outbox is not None and settings.kafka_transactional else None
        log.info("dlq_replay_started", offsets=offsets, transactional_id=txn_id,
                 plan={str(p): [r.start, r.end] for p, r in sorted(reader.plan.items())}, **base)
        progress = reporter(offsets, tty)
        replayer = Replayer(opts, reader, writer, outbox, on_progress=progress.update, stop_requested=stop_requested)
        result = replayer.run()
        outcome = str(result.outcome)
    except FatalError as e:
        error = str(e)
    except KeyboardInterrupt:  # a second signal: stop at once, the batch in flight stays uncommitted
        outcome, error = str(Outcome.INTERRUPTED), "interrupted during a batch; it is re-read by the next run"
    except BaseException as e:  # a bug: still write the audit line, then let it surface
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        if progress is not None:
            progress.close()
        for close in reversed(closers):
            with contextlib.suppress(Exception):  # closing must not hide the run's own outcome
                close()
        # Counts of committed batches only: an interrupted batch is counted by the run that redoes it.
        counts = replayer.counts.as_dict() if replayer is not None else None
        summary: dict[str, Any] = {
            **base, "outcome": outcome, "finished_at": _iso(datetime.now(UTC)),
            "duration_s": round(time.monotonic() - t0, 3), "offsets": offsets,
            "markers": _markers(offsets, result), "counts": counts,
            "stopped_at": _stopped_at(result), "error": error,
        }
        audit = {k: v for k, v in summary.items() if k != "counts"} | (counts or {})
        if error:
            log.error("dlq_replay_finished", **audit)
        else:
            log.info("dlq_replay_finished", **audit)
    code = EXIT_CODES[result.outcome] if result is not None else EXIT_FATAL
    if outcome == Outcome.INTERRUPTED:
        code = EXIT_CODES[Outcome.INTERRUPTED]
    return code, summary


def _open(settings: Settings, opts: ReplayOptions, group: str,
          closers: list[Callable[[], Any]]) -> tuple[DlqReader, PgWriter | None, Outbox | None, int]:
    """The order matters:

    1. The database first (a missing table is fatal before anything in Kafka is touched).
    2. The transactional producer before reading the group's offsets: its init_transactions
       aborts a killed run's open transaction, whose offsets would otherwise be pending.
       A dry run never creates it: it would fence a replay of the same group that is running.
    3. Then capture the plan: start = the group's committed offsets, end = now.
    """
    policy = opts.retry
    writer: PgWriter | None = None
    # Step 1.
    if opts.to_topic is None and not opts.dry_run:
        w = PgWriter.from_settings(settings)
        closers.append(w.close)
        retry(policy, "db_connect", w.connect)
        writer = w
    consumer = open_consumer(settings, group)
    closers.append(consumer.close)
    access = reader_access(settings, opts.dlq_topic, group)
    if opts.to_topic is not None:
        _check_topic(consumer, opts.to_topic)
    # Step 2.  Records that fail again go back to the DLQ fitted to what it takes.
    limit = retry(policy, "dlq_topic", lambda: dlq_max_message_bytes(settings, opts.dlq_topic))
    outbox: Outbox | None = None
    if not opts.dry_run:
        offsets = ConsumerOffsets(consumer, access)
        written = (opts.dlq_topic, *([opts.to_topic] if opts.to_topic else []))
        out_access = replace(access, topic_operation="WRITE", topics=written, transactional_id=transactional_id(group))
        if settings.kafka_transactional:
            outbox = TransactionalOutbox(settings, offsets, opts.dlq_topic, transactional_id(group), timeout=30.0,
                                         dlq_max_bytes=limit, client_id=f"sink-dlq-replay-{group}", fenced=FENCED,
                                         access=out_access)
        else:
            outbox = PlainOutbox(settings, offsets, opts.dlq_topic, timeout=30.0, dlq_max_bytes=limit,
                                 access=out_access)
        closers.append(outbox.close)
        retry(policy, "init_transactions", outbox.prepare)
    # Step 3.
    plan = retry(policy, "dlq_offsets",
                 lambda: capture_plan(consumer, opts.dlq_topic, from_committed=True, access=access))
    return DlqReader(consumer, opts.dlq_topic, plan, access=access), writer, outbox, limit


def _markers(offsets: int, result: ReplayResult | None) -> int | None:
    """Of a completed run's DLQ offsets, those that held no record: the transaction markers of
    the sink's (and earlier replays') Kafka transactions.  Unknown for a run that stopped early."""
    if result is None or result.outcome is not Outcome.COMPLETED:
        return None
    return offsets - result.counts.replayed - result.counts.skipped


def _check_topic(consumer: Any, topic: str) -> None:
    try:
        md = consumer.list_topics(topic, timeout=15)
    except KafkaException as e:
        raise classify_kafka_error(e, "to_topic") from e
    t = md.topics.get(topic)
    if t is None or t.error is not None or not t.partitions:
        raise FatalError(f"--to-topic {topic}: the topic does not exist or cannot be described")


def _stopped_at(result: ReplayResult | None) -> dict[str, Any] | None:
    if result is None or result.stopped_at is None:
        return None
    rej = result.stopped_at
    return {"partition": rej.record.partition, "offset": rej.record.offset, "stage": rej.stage,
            "error_class": rej.error_class, "reason": rej.message}


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")
