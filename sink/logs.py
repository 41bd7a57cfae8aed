"""Structured logging: one JSON object per line, and the catalogue of every event we emit.

Each line has ``timestamp`` (UTC ISO 8601), ``level``, ``event`` (a name from EVENTS),
``logger`` and context fields with the fixed names of FIELDS.  The README's logging section
and ``kafka-timescale-sink logs search --help`` are checked against EVENTS by a test.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Literal, TextIO

import structlog

EVENTS: dict[str, str] = {
    # lifecycle
    "sink_starting": "the service starts; carries the settings with secrets masked",
    "sink_stopped": "the service stopped cleanly",
    "config_invalid": "configuration failed validation; names the env var",
    "fatal_error": "an unrecoverable error; the process exits non-zero",
    "shutdown_requested": "SIGTERM/SIGINT received; the current batch is finished first",
    "shutdown_timeout": "the final batch could not be written in time; its offsets stay uncommitted",
    "exit_commit_failed": "leaving early, the Kafka commit of batches already in the database failed; "
                          "they are re-read on the next start",
    # schema
    "migration_applied": "a numbered migration ran (file, checksum)",
    "migrations_up_to_date": "no migration was pending",
    "timescaledb_enabled": "the timescaledb extension is present; hypertable features are on",
    "timescaledb_unavailable": "the timescaledb extension is missing; plain PostgreSQL mode",
    "timescale_policy_set": "a compression/retention/refresh policy was (re)applied",
    "writer_role_granted": "migrate gave TIMESCALE_WRITER_ROLE exactly the runtime privileges (role, privileges)",
    # kafka
    "partitions_assigned": "the group gave this instance partitions",
    "partitions_revoked": "partitions were taken away; their unwritten records are dropped",
    "partitions_lost": "partitions were lost without a clean revoke",
    "consumer_paused": "consumption paused (a database or broker failure is being retried)",
    "consumer_resumed": "consumption resumed",
    "kafka_error": "an error reported by librdkafka (`fatal`: true when it ends the sink)",
    "kafka_client_log": "a log line of librdkafka itself (`facility`, `client`, `message`), e.g. a broker "
                        "connection that failed; warnings and above",
    "dlq_topic_created": "the DLQ topic did not exist and was created (room for the input's largest record)",
    "dlq_topic_config_unknown": "the DLQ topic's max.message.bytes could not be read; Kafka's default is assumed",
    "topic_config_unreadable": "a topic's config could not be described (debug; reason)",
    "kafka_transactions_ready": "the transactional DLQ/offset producer is registered with the broker (at startup, "
                                "before consuming; carries its `transactional_id`)",
    # the data path
    "batch_written": "a batch committed to the database (rows, inserted, duplicates, offsets)",
    "batch_committed": "offsets of a batch committed to Kafka, after rows and DLQ records",
    "record_rejected": "a record failed decode/validate/write; it goes to the DLQ",
    "record_fault": "handling a record raised an exception no rule expected (error, with the traceback); "
                    "the record goes to the DLQ as `Unexpected<exception>` and the sink goes on",
    "dlq_published": "DLQ records of a batch acknowledged by the broker (KAFKA_TRANSACTIONAL=false; debug)",
    "dlq_record_too_large": "a DLQ record went without its value (or key): too large for the DLQ topic; "
                            "the original stays at its origin offset",
    "dlq_limit_lowered": "the broker refused a DLQ record as too large: the batch's DLQ records are sent again "
                         "under a lower limit",
    "poison_isolated": "bisection isolated rows the database rejected",
    "batch_discarded": "records of revoked partitions dropped before writing (re-read by the new owner)",
    # failures and retries
    "retrying": "a retryable failure; waiting before the next attempt (cause, attempt, delay)",
    "recovered": "an operation succeeded after retries",
    "db_connected": "connected to PostgreSQL",
    "db_disconnected": "the PostgreSQL connection was lost",
    "dlq_breaker_tripped": "too many records went to the DLQ; the sink stops instead of draining",
    # operability
    "metrics_listening": "the metrics/health HTTP server is listening",
    # DLQ tooling
    "dlq_replay_started": "a DLQ replay run started (who, filters)",
    "dlq_replay_progress": "periodic replay progress (when not on a terminal)",
    "dlq_replay_finished": "audit line of a DLQ replay run (who, when, filters, counts)",
    "dlq_record_replayed": "one DLQ record processed by replay (fate)",
    "dlq_read_error": "replay/inspect: Kafka reported an error next to records it delivered; raised if it persists",
    # demo
    "demo_produced": "the demo producer sent its records",
}

FIELDS: dict[str, str] = {
    "timestamp": "UTC ISO 8601 time of the log line",
    "level": "debug, info, warning, error, critical",
    "event": "one of the event names above",
    "logger": "the module that logged",
    "topic": "Kafka topic",
    "partition": "Kafka partition",
    "offset": "offset of a single record",
    "offsets": "per partition ranges: {\"<partition>\": [first, last]}",
    "batch_id": "sequence number of the batch in this process",
    "rows": "rows in a batch",
    "inserted": "rows that were new",
    "duplicates": "rows that already existed (absorbed by ON CONFLICT DO NOTHING)",
    "dlq": "records sent to the DLQ",
    "error_class": "the error's class (DLQ: its classification; retrying: the underlying exception)",
    "stage": "decode, validate or write",
    "reason": "human-readable error message",
    "latency_ms": "duration in milliseconds",
    "insert_ms": "of a batch's write, the milliseconds in its INSERT statement (the database's work)",
    "attempt": "retry attempt number",
    "delay_s": "seconds until the next attempt",
    "stack": "fatal_error of the watchdog: the innermost frames of the call that did not return",
    "cause": "what is being retried (db_write, commit, db_connect, migrate, ...; docs/logging.md)",
    "transactional_id": "transactional.id of the DLQ/offset producer (`KAFKA_TRANSACTIONAL_ID`)",
}

LogFormat = Literal["json", "console"]


def configure_logging(fmt: LogFormat = "json", level: str = "INFO", stream: TextIO | None = None) -> None:
    """Configure structlog once for the process; JSON by default, console for humans."""
    out = stream or sys.stdout
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        _add_logger_name,
        structlog.processors.format_exc_info,
    ]
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    else:
        renderer = structlog.processors.JSONRenderer(default=str)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def format_from_env() -> LogFormat:
    """LOG_FORMAT as asked for, read on its own: a configuration error is logged the way the
    operator wants to read it even when other settings are invalid (json if LOG_FORMAT is)."""
    return "console" if os.environ.get("LOG_FORMAT", "").strip().lower() == "console" else "json"


def _add_logger_name(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    event_dict.setdefault("logger", event_dict.pop("_logger_name", "sink"))
    return event_dict


class _KafkaClientLog(logging.Handler):
    """librdkafka's own log lines (handed over by confluent-kafka as logging records whose args
    are facility, client name, message) as kafka_client_log events: JSON like every other line,
    instead of raw text on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) and len(record.args) == 3 else None
        fields = ({"facility": args[0], "client": args[1], "message": args[2]} if args is not None
                  else {"message": record.getMessage()})
        if record.levelno >= logging.ERROR:
            _kafka_log.error("kafka_client_log", **fields)
        else:
            _kafka_log.warning("kafka_client_log", **fields)


_kafka_log: Any = structlog.get_logger(_logger_name="librdkafka")


def kafka_client_logger() -> logging.Logger:
    """The `logger` for every Kafka client's config (confluent-kafka serves it on poll)."""
    logger = logging.getLogger("sink.librdkafka")
    if not logger.handlers:
        logger.addHandler(_KafkaClientLog())
        logger.setLevel(logging.WARNING)  # librdkafka's notices and debug lines stay out of the log
        logger.propagate = False
    return logger


def get_logger(name: str) -> Any:
    """A bound logger whose lines carry ``logger=<name>``."""
    # A lazy proxy: modules create loggers at import, before configure_logging() runs.
    return structlog.get_logger(_logger_name=name)
