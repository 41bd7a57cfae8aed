"""Configuration from env vars: the spec's names, a ConfigError naming each bad variable, no password leaks."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from sink.logs import kafka_client_logger
from sink.settings import ConfigError, Settings, load_settings

PASSWORD = "s3cr3t-Pa55word!"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No setting leaks in from the developer's or CI's environment (names are case-insensitive)."""
    fields = set(Settings.model_fields)
    for name in list(os.environ):
        if name.lower() in fields:
            monkeypatch.delenv(name)
    return monkeypatch


def config_error(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    return str(info.value)


def test_defaults_load_without_any_env() -> None:
    s = load_settings()
    assert (s.kafka_input_topic, s.kafka_group_id, s.dlq_topic) == (
        "decoded_iot_data", "timescale_sink_group", "decoded_iot_data.dlq")
    assert s.kafka_auto_offset_reset == "earliest"
    assert s.dlq_breaker_enabled


def test_spec_env_var_names_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": "b1:9092,b2:9092", "KAFKA_INPUT_TOPIC": "in", "TIMESCALE_HOST": "db",
           "TIMESCALE_DB": "tsdb", "TIMESCALE_USER": "u", "TIMESCALE_PASSWORD": PASSWORD, "TIMESCALE_PORT": "6543",
           "BATCH_SIZE": "250", "BATCH_TIMEOUT": "2.5"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = load_settings()
    assert (s.kafka_bootstrap_servers, s.kafka_input_topic, s.timescale_host, s.timescale_db, s.timescale_user,
            s.timescale_password.get_secret_value(), s.timescale_port, s.batch_size, s.batch_timeout) == (
        "b1:9092,b2:9092", "in", "db", "tsdb", "u", PASSWORD, 6543, 250, 2.5)
    assert s.dlq_topic == "in.dlq"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BATCH_SIZE", "abc"),
        ("BATCH_SIZE", "0"),
        ("BATCH_TIMEOUT", "0"),
        ("BATCH_TIMEOUT", "soon"),
        ("TIMESCALE_PORT", "70000"),
        ("TIMESCALE_PORT", "postgres"),
        ("KAFKA_AUTO_OFFSET_RESET", "smallest"),
        ("KAFKA_INPUT_TOPIC", ""),
        ("TIMESCALE_SCHEMA", "Robert'); DROP TABLE x;--"),
        ("DLQ_BREAKER_RATIO", "1.5"),
        ("DLQ_BREAKER_ENABLED", "maybe"),
        ("LOG_LEVEL", "LOUD"),
    ],
)
def test_invalid_value_fails_with_a_message_naming_the_env_var(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    assert f"{name}:" in config_error(monkeypatch, **{name: value})


def test_every_invalid_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    message = config_error(monkeypatch, BATCH_SIZE="abc", TIMESCALE_PORT="0", BATCH_TIMEOUT="-1")
    assert all(f"{name}:" in message for name in ("BATCH_SIZE", "TIMESCALE_PORT", "BATCH_TIMEOUT"))


def test_lower_case_env_var_is_read_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("batch_size", "7")
    assert load_settings().batch_size == 7


def test_extra_kafka_config_is_passed_through_as_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_EXTRA_CONFIG", json.dumps(
        {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", "sasl.username": "u", "sasl.password": "p",
         "linger.ms": 5}))
    assert load_settings().kafka_extra_config == {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN",
                                                  "sasl.username": "u", "sasl.password": "p", "linger.ms": "5"}


@pytest.mark.parametrize("key", ["enable.auto.commit", "enable.auto.offset.store", "group.id", "bootstrap.servers"])
def test_extra_kafka_config_may_not_override_what_the_sink_controls(monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    message = config_error(monkeypatch, KAFKA_EXTRA_CONFIG=json.dumps({key: "true"}))
    assert "KAFKA_EXTRA_CONFIG:" in message
    assert key in message


def test_extra_kafka_config_that_is_not_an_object_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "KAFKA_EXTRA_CONFIG:" in config_error(monkeypatch, KAFKA_EXTRA_CONFIG='["sasl.mechanism", "PLAIN"]')


def test_extra_kafka_config_that_is_not_json_fails_with_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "KAFKA_EXTRA_CONFIG:" in config_error(monkeypatch, KAFKA_EXTRA_CONFIG="sasl.mechanism=PLAIN")


@pytest.mark.parametrize(("extra", "says"), [
    ({"no.such.property": "1"}, 'No such configuration property: "no.such.property"'),
    ({"security.protocol": "SASL_SSSL"}, 'Invalid value "***" for configuration property "security.protocol"'),
    ({"enable.idempotence": "maybe"}, 'Expected bool value for "enable.idempotence"'),
    ({"security.protocol": "SSL", "ssl.ca.location": "/nonexistent/ca.pem"}, "ssl.ca.location failed"),
])
def test_extra_kafka_config_librdkafka_refuses_is_a_config_error_at_load(
        monkeypatch: pytest.MonkeyPatch, extra: dict[str, str], says: str) -> None:
    # Not exit 1 from the first Kafka client, after the migrations already ran.
    message = config_error(monkeypatch, KAFKA_EXTRA_CONFIG=json.dumps(extra))
    assert "KAFKA_EXTRA_CONFIG: Value error, refused by librdkafka:" in message
    assert says in message
    assert "SASL_SSSL" not in message  # values are masked: they may be secrets


def test_empty_extra_kafka_config_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_EXTRA_CONFIG", "")
    assert load_settings().kafka_extra_config == {}


def test_dlq_topic_equal_to_the_input_topic_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "KAFKA_DLQ_TOPIC" in config_error(monkeypatch, KAFKA_INPUT_TOPIC="in", KAFKA_DLQ_TOPIC="in")


def test_explicit_dlq_topic_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_DLQ_TOPIC", "dead-letters")
    assert load_settings().dlq_topic == "dead-letters"


def test_max_backoff_below_initial_backoff_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    message = config_error(monkeypatch, RETRY_INITIAL_BACKOFF="5", RETRY_MAX_BACKOFF="1")
    assert "RETRY_MAX_BACKOFF" in message


def test_password_never_appears_in_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIMESCALE_PASSWORD", PASSWORD)
    message = config_error(monkeypatch, BATCH_SIZE="abc", KAFKA_INPUT_TOPIC="in", KAFKA_DLQ_TOPIC="in",
                           KAFKA_EXTRA_CONFIG=json.dumps({"group.id": "g", "sasl.password": PASSWORD}))
    assert PASSWORD not in message


def test_config_error_hides_the_validation_error_it_came_from(monkeypatch: pytest.MonkeyPatch) -> None:
    # pydantic's own error repeats the input values (the password among them): it must not ride
    # along as the cause or the context of the ConfigError.
    monkeypatch.setenv("TIMESCALE_PASSWORD", PASSWORD)
    monkeypatch.setenv("BATCH_SIZE", "abc")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert info.value.__cause__ is None
    assert info.value.__context__ is None


def test_safe_summary_masks_the_password_and_extra_config_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIMESCALE_PASSWORD", PASSWORD)
    monkeypatch.setenv("KAFKA_EXTRA_CONFIG", json.dumps({"sasl.password": "kafka-" + PASSWORD}))
    s = load_settings()
    summary = s.safe_summary()
    text = json.dumps(summary)
    assert PASSWORD not in text
    assert summary["kafka_extra_config"] == {"sasl.password": "***"}
    assert summary["timescale_password"] != PASSWORD
    assert summary["dlq_topic"] == "decoded_iot_data.dlq"
    assert PASSWORD in s.conninfo()  # the password did load: the summary hides it, it is not just absent


def test_password_is_not_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIMESCALE_PASSWORD", PASSWORD)
    s = load_settings()
    assert PASSWORD not in repr(s)
    assert PASSWORD not in str(s)


def test_an_empty_database_host_is_refused_not_taken_for_a_unix_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "TIMESCALE_HOST" in config_error(monkeypatch, TIMESCALE_HOST="")


# --------------------------------------------------------------------------- secrets from files


def test_the_password_file_is_read_when_the_password_is_unset(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    # As Docker and Kubernetes write secrets: often with a trailing line break, never meant.
    (tmp_path / "pw").write_text(PASSWORD + "\r\n")
    monkeypatch.setenv("TIMESCALE_PASSWORD_FILE", str(tmp_path / "pw"))
    s = load_settings()
    assert s.timescale_password.get_secret_value() == PASSWORD
    assert f"password={PASSWORD} " in s.conninfo() + " "
    assert PASSWORD not in json.dumps(s.safe_summary()) and PASSWORD not in repr(s)


def test_a_password_and_a_password_file_together_are_refused(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(PASSWORD)
    message = config_error(monkeypatch, TIMESCALE_PASSWORD="other", TIMESCALE_PASSWORD_FILE=str(tmp_path / "pw"))
    assert "TIMESCALE_PASSWORD and TIMESCALE_PASSWORD_FILE are both set" in message
    assert PASSWORD not in message and "other" not in message


@pytest.mark.parametrize(("content", "says"), [(None, "cannot be read: FileNotFoundError"), ("\n", "is empty"),
                                               (b"\xff\xfe", "cannot be read: UnicodeDecodeError")])
def test_an_unusable_password_file_is_a_config_error_naming_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                               content: str | bytes | None, says: str) -> None:
    path = tmp_path / "pw"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    message = config_error(monkeypatch, TIMESCALE_PASSWORD_FILE=str(path))
    assert f"TIMESCALE_PASSWORD_FILE='{path}' {says}" in message


def test_the_writer_role_may_not_be_the_role_that_migrates(monkeypatch: pytest.MonkeyPatch) -> None:
    message = config_error(monkeypatch, TIMESCALE_USER="sink_owner", TIMESCALE_WRITER_ROLE="sink_owner")
    assert "TIMESCALE_WRITER_ROLE names TIMESCALE_USER" in message
    monkeypatch.setenv("TIMESCALE_WRITER_ROLE", "sink_writer")
    assert load_settings().timescale_writer_role == "sink_writer"
# --- Kafka security


def test_kafka_security_settings_become_the_clients_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"  # librdkafka loads it: a real certificate
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(tmp_path / "ca.key"), "-out", str(ca), "-subj", "/CN=ca", "-days", "1"],
                   check=True, capture_output=True)
    for name, value in {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_USERNAME": "sink",
                        "KAFKA_SASL_PASSWORD": PASSWORD, "KAFKA_SSL_CA_LOCATION": str(ca)}.items():
        monkeypatch.setenv(name, value)
    s = load_settings()
    assert s.kafka_client_config() == {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
                                       "sasl.username": "sink", "sasl.password": PASSWORD,
                                       "ssl.ca.location": str(ca), "bootstrap.servers": "kafka:29092",
                                       "logger": kafka_client_logger()}
    assert PASSWORD not in json.dumps(s.safe_summary()) + repr(s)


def test_the_sasl_password_comes_from_its_file_when_the_variable_is_unset(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")  # as `echo` and most secret stores write it
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "sink")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD_FILE", str(secret))
    assert load_settings().kafka_sasl_password.get_secret_value() == PASSWORD

    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "other")
    message = config_error(monkeypatch)
    assert "KAFKA_SASL_PASSWORD and KAFKA_SASL_PASSWORD_FILE are both set" in message
    assert PASSWORD not in message


@pytest.mark.parametrize(("env", "said"), [
    ({"KAFKA_SASL_PASSWORD_FILE": "/nonexistent/password"}, "KAFKA_SASL_PASSWORD_FILE='/nonexistent/password' cannot"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"),
    ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL:"),
    ({"KAFKA_SASL_MECHANISM": "MD5"}, "KAFKA_SASL_MECHANISM:"),
    ({"KAFKA_SSL_CA_LOCATION": "/nonexistent/ca.crt"}, "KAFKA_SSL_CA_LOCATION='/nonexistent/ca.crt' is not"),
    ({"KAFKA_SASL_USERNAME": "sink", "KAFKA_EXTRA_CONFIG": '{"sasl.username": "other"}'},
     "KAFKA_EXTRA_CONFIG sets what KAFKA_SASL_USERNAME (sasl.username) already set"),
])
def test_bad_kafka_security_settings_are_named(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                               said: str) -> None:
    assert said in config_error(monkeypatch, **env)


def test_security_passed_through_kafka_extra_config_still_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_EXTRA_CONFIG", json.dumps({"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN",
                                                         "sasl.username": "u", "sasl.password": PASSWORD}))
    conf = load_settings().kafka_client_config()
    assert (conf["security.protocol"], conf["sasl.mechanism"], conf["sasl.password"]) == ("SASL_SSL", "PLAIN", PASSWORD)
