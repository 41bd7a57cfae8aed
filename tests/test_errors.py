"""Error classification by SQLSTATE class and Kafka error code, with real psycopg / confluent-kafka errors."""

from __future__ import annotations

import psycopg
import psycopg.errors as pg_errors
import pytest
from confluent_kafka import KafkaError
from psycopg.pq import DiagnosticField

from sink.errors import (
    FatalError,
    KafkaAccess,
    PoisonError,
    RetryableError,
    SinkError,
    classify_db_error,
    classify_kafka_error,
)


def pg_error(sqlstate: str, message: str = "boom") -> psycopg.Error:
    return pg_errors.lookup(sqlstate)(message)


def server_error(cls: type[psycopg.Error], sqlstate: str, primary: str, detail: str | None = None) -> psycopg.Error:
    """An error as the server reports it: SQLSTATE and message in the diagnostic fields (as unpickled)."""
    info: dict[int, bytes | None] = {DiagnosticField.SQLSTATE: sqlstate.encode(),
                                     DiagnosticField.MESSAGE_PRIMARY: primary.encode()}
    if detail is not None:
        info[DiagnosticField.MESSAGE_DETAIL] = detail.encode()
    return cls(f"{primary}\nDETAIL: {detail}", info=info)


@pytest.mark.parametrize(
    "sqlstate",
    [
        "08000",  # connection_exception
        "08006",  # connection_failure
        "08003",  # connection_does_not_exist
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "53300",  # too_many_connections
        "53100",  # disk_full
        "57P01",  # admin_shutdown (PostgreSQL restarting)
        "57P03",  # cannot_connect_now (starting up)
        "57014",  # query_canceled (statement_timeout)
        "58030",  # io_error
        "55P03",  # lock_not_available (lock_timeout)
        "55006",  # object_in_use
        "25P03",  # idle_in_transaction_session_timeout: the server ended our session
        "25P04",  # transaction_timeout (PostgreSQL 17)
    ],
)
def test_unavailable_database_errors_are_retryable(sqlstate: str) -> None:
    out = classify_db_error(pg_error(sqlstate))
    assert isinstance(out, RetryableError)
    assert out.cause == "db_write"
    assert f"[{sqlstate}]" in out.message


@pytest.mark.parametrize(
    "sqlstate",
    [
        "22001",  # string_data_right_truncation
        "22003",  # numeric_value_out_of_range
        "22007",  # invalid_datetime_format
        "22008",  # datetime_field_overflow
        "22P02",  # invalid_text_representation
        "23502",  # not_null_violation
        "23503",  # foreign_key_violation
        "23505",  # unique_violation
        "23514",  # check_violation
    ],
)
def test_data_and_integrity_errors_are_poison(sqlstate: str) -> None:
    exc = pg_error(sqlstate)
    out = classify_db_error(exc)
    assert isinstance(out, PoisonError)
    assert out.sqlstate == sqlstate
    assert out.error_class == type(exc).__name__


@pytest.mark.parametrize(
    "sqlstate",
    [
        "28P01",  # invalid_password
        "28000",  # invalid_authorization_specification
        "42P01",  # undefined_table
        "42703",  # undefined_column
        "3D000",  # invalid_catalog_name (no such database)
        "25P02",  # in_failed_sql_transaction (a bug in the writer)
        "55000",  # object_not_in_prerequisite_state: 55 is fatal except 55P03/55006
        "XX000",  # internal_error
        "P0001",  # raise_exception
    ],
)
def test_configuration_and_other_errors_are_fatal(sqlstate: str) -> None:
    exc = pg_error(sqlstate)
    out = classify_db_error(exc)
    assert isinstance(out, FatalError)
    assert f"[{sqlstate}]" in str(out)
    assert type(exc).__name__ in str(out)


def test_a_missing_privilege_is_fatal_naming_the_object_and_where_the_grants_are() -> None:
    exc = server_error(pg_errors.InsufficientPrivilege, "42501", "permission denied for table iot_measurements")
    out = classify_db_error(exc)
    assert isinstance(out, FatalError)
    assert str(out).startswith("insufficient privilege [42501]: permission denied for table iot_measurements")
    assert "TIMESCALE_USER" in str(out) and "docs/security.md" in str(out)


def test_check_violation_subclass_is_poison_with_the_server_message_and_detail() -> None:
    exc = server_error(pg_errors.CheckViolation, "23514",
                       'new row for relation "iot_measurements" violates check constraint "value_range"',
                       "Failing row contains (...).")
    out = classify_db_error(exc)
    assert isinstance(out, PoisonError)
    assert (out.error_class, out.sqlstate) == ("CheckViolation", "23514")
    assert out.message == ('new row for relation "iot_measurements" violates check constraint "value_range" '
                           "(Failing row contains (...).)")


def test_sqlstate_without_its_own_class_is_classified_by_its_two_character_class() -> None:
    # psycopg has no class for an unknown code: it raises the generic DatabaseError with the sqlstate.
    exc = server_error(psycopg.DatabaseError, "08ZZZ", "made-up connection error")
    assert exc.sqlstate == "08ZZZ"
    assert isinstance(classify_db_error(exc), RetryableError)
    assert isinstance(classify_db_error(server_error(psycopg.DatabaseError, "23ZZZ", "x")), PoisonError)
    assert isinstance(classify_db_error(server_error(psycopg.DatabaseError, "42ZZZ", "x")), FatalError)


def test_message_is_the_first_line_without_diagnostics() -> None:
    out = classify_db_error(pg_error("23514", "first line\nsecond line"))
    assert isinstance(out, PoisonError)
    assert out.message == "first line"


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.OperationalError("connection failed: Connection refused"),
        psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly"),
        psycopg.InterfaceError("the connection is closed"),
        ConnectionResetError(104, "Connection reset by peer"),
    ],
)
def test_connection_failure_without_sqlstate_is_retryable(exc: BaseException) -> None:
    out = classify_db_error(exc, cause="db_connect")
    assert isinstance(out, RetryableError)
    assert out.cause == "db_connect"


@pytest.mark.parametrize("exc", [psycopg.ProgrammingError("bad query"), psycopg.DataError("no sqlstate"),
                                 ValueError("unexpected")])
def test_other_error_without_sqlstate_is_fatal(exc: BaseException) -> None:
    out = classify_db_error(exc)
    assert isinstance(out, FatalError)
    assert type(exc).__name__ in str(out)


@pytest.mark.parametrize("err", [RetryableError("db_write", "x"), PoisonError("CheckViolation", "x", "23514"),
                                 FatalError("x")])
def test_already_classified_error_is_returned_unchanged(err: SinkError) -> None:
    assert classify_db_error(err) is err


def test_poison_and_retryable_messages_name_their_parts() -> None:
    assert str(PoisonError("CheckViolation", "violates", "23514")) == "CheckViolation: violates"
    assert str(RetryableError("db_write", "[08006] gone")) == "db_write: [08006] gone"


# --- Kafka


@pytest.mark.parametrize("code", [KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._MSG_TIMED_OUT,
                                  KafkaError.REQUEST_TIMED_OUT, KafkaError.NOT_COORDINATOR,
                                  KafkaError.COORDINATOR_LOAD_IN_PROGRESS])
def test_transient_kafka_errors_are_retryable(code: int) -> None:
    err = KafkaError(code)
    out = classify_kafka_error(err, "produce")
    assert isinstance(out, RetryableError)
    assert out.cause == "produce"
    assert err.name() in out.message


@pytest.mark.parametrize("code", [KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED,
                                  KafkaError.SASL_AUTHENTICATION_FAILED, KafkaError._AUTHENTICATION,
                                  KafkaError._SSL, KafkaError._INVALID_ARG])
def test_authorization_and_configuration_kafka_errors_are_fatal(code: int) -> None:
    err = KafkaError(code)
    out = classify_kafka_error(err, "commit")
    assert isinstance(out, FatalError)
    assert err.name() in str(out)
    assert "commit" in str(out)


def test_kafka_error_flagged_fatal_by_librdkafka_is_fatal() -> None:
    out = classify_kafka_error(KafkaError(KafkaError._FENCED, "fenced by a newer instance", fatal=True), "produce")
    assert isinstance(out, FatalError)
    assert "fenced by a newer instance" in str(out)


def test_missing_kafka_error_is_retryable() -> None:
    assert isinstance(classify_kafka_error(None, "commit"), RetryableError)


@pytest.mark.parametrize(("code", "access", "said"), [
    (KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, KafkaAccess("User:sink", "WRITE", ("in.dlq",), "g", "ks.g.*"),
     "grant User:sink WRITE on the transactional ids prefixed ks.g. (PREFIXED)"),
    (KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, KafkaAccess("User:sink", transactional_id="pod-0"),
     "grant User:sink WRITE on transactional id pod-0"),
    (KafkaError.GROUP_AUTHORIZATION_FAILED, KafkaAccess("User:sink", "READ", ("in",), "g"),
     "grant User:sink READ on group g"),
    (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaAccess("User:sink", "READ", ("in",), "g"),
     "grant User:sink READ on topic in"),
    (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaAccess("User:sink", "WRITE", ("in.dlq",)),
     "grant User:sink WRITE on topic in.dlq"),
    (KafkaError.CLUSTER_AUTHORIZATION_FAILED, KafkaAccess("User:sink", "WRITE", ("in.dlq",)),
     "grant User:sink IDEMPOTENT_WRITE on the cluster"),
    (KafkaError.TOPIC_AUTHORIZATION_FAILED, None,
     "grant the sink's principal READ on the input topic and WRITE on the DLQ topic"),
    (KafkaError._AUTHENTICATION, None, "check KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD"),
    (KafkaError._SSL, None, "check KAFKA_SSL_CA_LOCATION"),
])
def test_a_fatal_kafka_error_says_what_to_grant_or_check(code: int, access: KafkaAccess | None, said: str) -> None:
    out = classify_kafka_error(KafkaError(code), "dlq_commit", access)
    assert isinstance(out, FatalError)
    assert said in str(out)
