"""Error classification, done once: retryable trouble vs. poison data vs. fatal problems.

* RetryableError: the database or broker is unavailable (SQLSTATE 08/53/57/40/58, connection
  loss, broker transport errors).  Retry with backoff, pause consumption, never DLQ, never
  commit past.
* PoisonError: this data cannot be written (SQLSTATE 22 data exception, 23 integrity
  violation).  Isolate the row, DLQ it with the database's message, commit past it.
* FatalError: configuration, authentication, missing objects, privileges, or a tripped DLQ
  breaker.  Exit non-zero with a clear message; the supervisor restarts us.
Anything else is a bug and propagates unchanged, with one exception, drawn here in
record_fault: an unexpected exception raised while handling one record's content (decoding,
validating, building its DLQ envelope) is that record's fault, not the sink's.  The record goes
to the DLQ with the exception's name and message, an ``error`` line carries the traceback, and
the sink goes on; the same code works for every other record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from confluent_kafka import KafkaException
from tenacity import RetryCallState

from sink.logs import get_logger
from sink.types import Rejection, SourceRecord

log = get_logger("sink.errors")


class SinkError(Exception):
    """Base of the sink's own errors."""


class RetryableError(SinkError):
    def __init__(self, cause: str, message: str) -> None:
        super().__init__(f"{cause}: {message}")
        self.cause = cause
        self.message = message


class PoisonError(SinkError):
    def __init__(self, error_class: str, message: str, sqlstate: str | None = None) -> None:
        super().__init__(f"{error_class}: {message}")
        self.error_class = error_class
        self.message = message
        self.sqlstate = sqlstate


class FatalError(SinkError):
    """Stop the service; the message is shown to the operator as is."""


def record_fault(record: SourceRecord, stage: str, exc: Exception) -> Rejection:
    """The rejection for a record whose content made `stage` raise `exc` unexpectedly, with an
    ``error`` log line carrying the traceback.  Re-raises MemoryError: the process is in
    trouble, whichever record it was handling."""
    if isinstance(exc, MemoryError):
        raise exc
    name = type(exc).__name__
    log.error("record_fault", topic=record.topic, partition=record.partition, offset=record.offset,
              stage=stage, error_class=name, reason=str(exc)[:1000], exc_info=exc)
    return Rejection(record, stage, f"Unexpected{name}", f"{name} while handling the record ({stage}): {exc}")


# SQLSTATE classes (first two characters) -> kind.  See PostgreSQL's errcodes appendix.
_RETRYABLE_CLASSES = frozenset({"08", "40", "53", "57", "58"})
_POISON_CLASSES = frozenset({"22", "23"})
# Lock timeouts and "object in use" clear up on their own.  25P03/25P04: the server ended the
# session (idle_in_transaction_session_timeout, PostgreSQL 17's transaction_timeout); the
# retry reconnects.
_RETRYABLE_CODES = frozenset({"55P03", "55006", "25P03", "25P04"})
# A privilege the role lacks: no retry grants it.  PostgreSQL's message names the object.
INSUFFICIENT_PRIVILEGE = "42501"


# libpq's words for a TLS setup that no retry can fix (no SQLSTATE: the connection never started).
_TLS_CONFIG_ERRORS = ("server does not support SSL", "certificate verify failed", "does not match host name",
                      "root certificate file", "private key file", "certificate present, but not private key",
                      "could not read certificate", "could not load", "sslmode value")


def db_tls_misconfigured(exc: BaseException) -> bool:
    """A connection refused over TLS settings (TIMESCALE_SSL*): wrong CA, host name, files, or
    TLS required of a server without it."""
    return getattr(exc, "sqlstate", None) is None and any(m in str(exc) for m in _TLS_CONFIG_ERRORS)


def db_error_is_retryable(exc: BaseException) -> bool:
    """The database is unavailable or busy, not wrong: SQLSTATE classes 08/40/53/57/58, lock
    timeouts and ended sessions, or no SQLSTATE at all (the connection failed or broke)."""
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate:
        return sqlstate[:2] in _RETRYABLE_CLASSES or sqlstate in _RETRYABLE_CODES
    if db_tls_misconfigured(exc):
        return False
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | OSError)


def classify_db_error(exc: BaseException, cause: str = "db_write") -> SinkError:
    """Map a psycopg exception to RetryableError, PoisonError or FatalError."""
    if isinstance(exc, SinkError):
        return exc
    sqlstate = getattr(exc, "sqlstate", None)
    message = pg_message(exc)
    if db_error_is_retryable(exc):
        return RetryableError(cause, f"[{sqlstate}] {message}" if sqlstate else message or type(exc).__name__)
    if db_tls_misconfigured(exc):
        return FatalError(f"cannot connect to the database over TLS: {message} (check TIMESCALE_SSLMODE, "
                          "TIMESCALE_SSLROOTCERT, TIMESCALE_SSLCERT/TIMESCALE_SSLKEY and TIMESCALE_HOST)")
    if sqlstate:
        if sqlstate[:2] in _POISON_CLASSES:
            return PoisonError(type(exc).__name__, message, sqlstate)
        if sqlstate == INSUFFICIENT_PRIVILEGE:
            return FatalError(privilege_message(exc))
        return FatalError(f"database error [{sqlstate}] {type(exc).__name__}: {message}")
    return FatalError(f"unexpected database error {type(exc).__name__}: {message}")


def privilege_message(exc: BaseException) -> str:
    """SQLSTATE 42501 for the operator: the server's words (they name the object), and where
    the grants are listed."""
    return (f"insufficient privilege [{INSUFFICIENT_PRIVILEGE}]: {pg_message(exc)}; the role in TIMESCALE_USER "
            "lacks it (docs/security.md lists what each role needs)")


def retry_log_fields(cause: str, state: RetryCallState) -> dict[str, Any]:
    """The fields of a ``retrying`` line: the same for the sink's loop, its startup and the DLQ
    replay.  ``error_class`` names the underlying exception (psycopg's or Kafka's), not the
    RetryableError that wraps every one of them; ``reason`` starts with the failing step."""
    exc = state.outcome.exception() if state.outcome is not None else None
    delay = state.next_action.sleep if state.next_action is not None else 0.0
    root = exc.__cause__ if exc is not None and exc.__cause__ is not None else exc
    return {"cause": cause, "attempt": state.attempt_number, "delay_s": round(delay, 2), "reason": str(exc),
            "error_class": type(root).__name__ if root is not None else None}


def pg_message(exc: BaseException) -> str:
    """The server's primary message (with its detail), or the exception's first line."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    detail = getattr(diag, "message_detail", None) if diag is not None else None
    text = primary or (str(exc).strip().splitlines() or [""])[0]
    return f"{text} ({detail})" if detail else text


def kafka_error(e: KafkaException) -> Any:
    """The KafkaError a KafkaException carries (None if it carries none)."""
    return e.args[0] if e.args else None


@dataclass(frozen=True)
class KafkaAccess:
    """What one Kafka client of the sink does, so that an authorization error names the grant
    it lacks.  ``topic_operation`` (READ, WRITE or CREATE) applies to ``topics``; a
    ``transactional_id`` ending in ``*`` stands for the ids with that prefix."""

    principal: str = ""
    topic_operation: str = ""
    topics: tuple[str, ...] = ()
    group: str = ""
    transactional_id: str = ""


def classify_kafka_error(err: Any, cause: str, access: KafkaAccess | None = None) -> SinkError:
    """Map a confluent_kafka KafkaError, or the KafkaException carrying one, to RetryableError or
    FatalError.  A refused login or a missing ACL is fatal, with what to fix or grant (named
    from `access` where the caller gives it)."""
    if isinstance(err, KafkaException):
        err = kafka_error(err)
    if err is None:
        return RetryableError(cause, "unknown Kafka error")
    try:
        fatal = bool(err.fatal())
    except AttributeError:
        fatal = False
    name = err.name() if hasattr(err, "name") else type(err).__name__
    text = err.str() if hasattr(err, "str") else str(err)
    if fatal or name in _FATAL_KAFKA:
        hint = _kafka_hint(name, access or KafkaAccess())
        return FatalError(f"Kafka {cause} failed: {name}: {text}" + (f": {hint}" if hint else ""))
    return RetryableError(cause, f"{name}: {text}")


def _kafka_hint(name: str, a: KafkaAccess) -> str:
    """What the operator has to do about a fatal Kafka error: the ACL to grant, or the settings to check."""
    who = f" {a.principal}" if a.principal else " the sink's principal"
    if name == "TOPIC_AUTHORIZATION_FAILED":
        if a.topics:
            return f"grant{who} {a.topic_operation or 'READ'} on topic {', '.join(a.topics)}"
        return f"grant{who} READ on the input topic and WRITE on the DLQ topic (see docs/security.md)"
    if name == "GROUP_AUTHORIZATION_FAILED":
        return f"grant{who} READ on group {a.group or '(KAFKA_GROUP_ID)'}"
    if name == "TRANSACTIONAL_ID_AUTHORIZATION_FAILED":
        tid = a.transactional_id
        target = (f"the transactional ids prefixed {tid[:-1]} (PREFIXED)" if tid.endswith("*")
                  else f"transactional id {tid}" if tid else "its transactional id (KAFKA_TRANSACTIONAL_ID)")
        return f"grant{who} WRITE on {target}, or set KAFKA_TRANSACTIONAL=false"
    if name == "CLUSTER_AUTHORIZATION_FAILED":
        if a.topic_operation == "CREATE":
            return f"grant{who} CREATE on topic {', '.join(a.topics)} (or on the cluster), or create it"
        return f"grant{who} IDEMPOTENT_WRITE on the cluster"
    if name in ("SASL_AUTHENTICATION_FAILED", "_AUTHENTICATION"):
        return ("the broker refused the login: check KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD (or "
                "KAFKA_SASL_PASSWORD_FILE) and KAFKA_SASL_MECHANISM")
    if name == "_SSL":
        return ("TLS to the broker failed: check KAFKA_SSL_CA_LOCATION (the CA that signed the brokers' "
                "certificates) and that KAFKA_BOOTSTRAP_SERVERS names hosts their certificates name")
    return ""


# Errors that retrying cannot fix: the operator must act.
_FATAL_KAFKA = frozenset({
    "TOPIC_AUTHORIZATION_FAILED",
    "GROUP_AUTHORIZATION_FAILED",
    "CLUSTER_AUTHORIZATION_FAILED",
    "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
    "SASL_AUTHENTICATION_FAILED",
    "_AUTHENTICATION",
    "_INVALID_ARG",
    "_SSL",
})
