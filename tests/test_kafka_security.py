"""Kafka with TLS, SASL (SCRAM-SHA-512) and ACLs, for real: a broker of this module's own started by
dev/services.py with DEV_KAFKA_SECURITY=sasl_ssl.  A principal holding exactly the ACLs that
docs/security.md lists runs the sink (transactional DLQ and offsets included), `sink-dlq inspect`
and `sink-dlq replay`; a principal missing one ACL stops at once with what to grant; a wrong
password stops at once and is never written out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # exported at runtime, missing from the stub
    AclBinding,
    AclOperation,
    AclPermissionType,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from dev import testkit
from sink.envelope import H_CLASS

pytestmark = [pytest.mark.integration, pytest.mark.plain_postgres]

PASSWORD = "Sc4am-pa55word-for-tests"
WRONG_PASSWORD = "Wr0ng-pa55word-never-logged"
Acl = tuple[int, str, int, int]  # (resource type, name, pattern type, operation)


@dataclass(frozen=True)
class SecureBroker:
    plaintext: str  # the super user's listener: topics, users and ACLs are made here
    sasl: str
    ca: Path


def _services(state: Path, ports: dict[str, int], call: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEV_", "KAFKA_"))}
    env.update({"DEV_STATE_DIR": str(state), "DEV_KAFKA_SECURITY": "sasl_ssl", "DEV_KAFKA_HEAP": "-Xms64m -Xmx256m",
                **{k: str(v) for k, v in ports.items()}})
    res = subprocess.run([sys.executable, "-c", f"from dev import services; services.{call}"], env=env,
                         cwd=testkit.ROOT, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, f"{call} of the SASL_SSL broker failed (a failure, never a skip):\n{res.stderr[-4000:]}"


@pytest.fixture(scope="module")
def broker(infra: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    """A broker of its own (state directory and ports), so the rest of the suite is undisturbed."""
    state = tmp_path_factory.mktemp("kafka-sasl")
    names = ("DEV_KAFKA_PORT", "DEV_KAFKA_CONTROLLER_PORT", "DEV_KAFKA_SASL_PORT")
    ports: dict[str, int] = {}
    while len(set(ports.values())) < len(names):
        ports = {name: testkit.closed_port() for name in names}
    try:
        _services(state, ports, "start_kafka()")
        yield SecureBroker(f"127.0.0.1:{ports['DEV_KAFKA_PORT']}", f"127.0.0.1:{ports['DEV_KAFKA_SASL_PORT']}",
                           state / "kafka" / "tls" / "ca.crt")
    finally:
        _services(state, ports, "stop_kafka()")


def add_user(broker: SecureBroker, name: str, password: str = PASSWORD) -> str:
    admin = testkit.admin(broker.plaintext)
    cred = UserScramCredentialUpsertion(name, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 4096),
                                        password.encode())
    for fut in admin.alter_user_scram_credentials([cred]).values():
        fut.result(timeout=30)
    return f"User:{name}"


def grant(broker: SecureBroker, principal: str, acls: list[Acl]) -> None:
    admin = testkit.admin(broker.plaintext)
    bindings = [AclBinding(rtype, name, pattern, principal, "*", op, AclPermissionType.ALLOW)
                for rtype, name, pattern, op in acls]
    for fut in admin.create_acls(bindings).values():
        fut.result(timeout=30)


T, G, TX = ResourceType.TOPIC, ResourceType.GROUP, ResourceType.TRANSACTIONAL_ID
LIT, PRE = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
OP = AclOperation


def sink_acls(topic: str, group: str, *, dlq_exists: bool) -> list[Acl]:
    """The sink's ACLs as docs/security.md lists them (input I, DLQ D, group G)."""
    dlq = f"{topic}.dlq"
    acls = [(T, topic, LIT, OP.READ), (T, dlq, LIT, OP.WRITE), (G, group, LIT, OP.READ),
            (TX, f"kafka-timescale-sink.{group}.", PRE, OP.WRITE)]
    if not dlq_exists:
        # Creating the DLQ: CREATE, and DESCRIBE_CONFIGS to size it after the input's records.
        acls += [(T, dlq, LIT, OP.CREATE), (T, topic, LIT, OP.DESCRIBE_CONFIGS), (T, dlq, LIT, OP.DESCRIBE_CONFIGS)]
    return acls


def replay_acls(topic: str, group: str) -> list[Acl]:
    """`sink-dlq replay` (group G.dlq-replay, and its filtered groups) beside the sink's ACLs."""
    replay = f"{group}.dlq-replay"
    return [(T, f"{topic}.dlq", LIT, OP.READ), (G, replay, PRE, OP.READ),
            (TX, f"sink-dlq-replay.{replay}", PRE, OP.WRITE)]


def secure_env(broker: SecureBroker, schema: str, topic: str, group: str, user: str,
               **extra: Any) -> dict[str, str]:
    return testkit.sink_env(schema, topic, group, KAFKA_BOOTSTRAP_SERVERS=broker.sasl,
                            KAFKA_SECURITY_PROTOCOL="SASL_SSL", KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
                            KAFKA_SASL_USERNAME=user, KAFKA_SSL_CA_LOCATION=str(broker.ca),
                            DLQ_BREAKER_ENABLED="false", RETRY_MAX_ATTEMPTS="0", **extra)


def measurement(i: int, **extra: Any) -> dict[str, Any]:
    return {"timestamp": 1_700_000_000 + i, "mac_address": f"dev-{i % 5}", "mode": "analog",
            "data_point_label": "temperature", "pin": i % 4, "value": i, "unit": "C", **extra}


def fill_input(broker: SecureBroker, topic: str, *, ok: int = 40) -> dict[int, int]:
    """`ok` valid records, one the database refuses (unit 'bad': a CHECK constraint) and one that
    is not JSON; the input's end offsets."""
    values: list[Any] = [measurement(i) for i in range(ok)] + [measurement(999, unit="bad"), b"{not json"]
    testkit.produce(topic, values, bootstrap=broker.plaintext)
    return {p: o for p, o in testkit.end_offsets(topic, bootstrap=broker.plaintext).items() if o > 0}


def migrate_with_check(schema: str, topic: str, group: str) -> None:
    """The table, with a CHECK constraint that one record of fill_input violates."""
    res = subprocess.run([sys.executable, "-m", "sink", "migrate"], env=testkit.sink_env(schema, topic, group),
                         cwd=testkit.ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    with testkit.connect(schema) as conn:
        conn.execute("ALTER TABLE iot_measurements ADD CONSTRAINT unit_not_bad CHECK (unit <> 'bad')")


def dlq_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dlq", *args], env=env, cwd=testkit.ROOT, capture_output=True,
                          text=True, timeout=180)


@pytest.fixture
def secure_topic(broker: SecureBroker) -> Iterator[str]:
    name = testkit.unique_name("t")
    testkit.create_topic(name, partitions=2, bootstrap=broker.plaintext)
    yield name
    testkit.delete_topics([name, f"{name}.dlq"], bootstrap=broker.plaintext)


def test_with_the_documented_acls_the_sink_and_sink_dlq_work_over_sasl_ssl(
        broker: SecureBroker, secure_topic: str, schema: str, group: str, tmp_path: Path) -> None:
    topic, dlq = secure_topic, f"{secure_topic}.dlq"
    user = testkit.unique_name("sink")
    principal = add_user(broker, user)
    grant(broker, principal, sink_acls(topic, group, dlq_exists=False) + replay_acls(topic, group))
    migrate_with_check(schema, topic, group)
    ends = fill_input(broker, topic)
    # The password from a file, as Docker and Kubernetes secrets provide it.
    secret = tmp_path / "sasl-password"
    secret.write_text(PASSWORD + "\n")
    env = secure_env(broker, schema, topic, group, user, KAFKA_SASL_PASSWORD_FILE=str(secret))

    sink = testkit.SinkProcess(env, tmp_path / "sink.log").start()
    try:
        testkit.wait_for(lambda: testkit.committed_offsets(group, topic, bootstrap=broker.plaintext) == ends, 90,
                         what="the sink's transactional commits, as the SASL principal")
        assert sink.stop() == 0, sink.log_text()[-3000:]
    finally:
        if sink.alive():
            sink.kill()
    assert testkit.row_count(schema) == 40
    dlq_records = testkit.read_all(dlq, bootstrap=broker.plaintext)  # committed (read_committed) only
    assert sorted(r.headers[H_CLASS].decode() for r in dlq_records) == ["CheckViolation", "InvalidJson"]
    assert '"event": "dlq_topic_created"' in sink.log_text()

    inspect = dlq_cli(env, "inspect", "--json")
    assert inspect.returncode == 0, inspect.stderr[-3000:]
    assert json.loads(inspect.stdout)["records"] == 2

    dlq_end = {p: o for p, o in testkit.end_offsets(dlq, bootstrap=broker.plaintext).items() if o > 0}
    replay = dlq_cli(env, "replay", "--json")
    assert replay.returncode == 0, replay.stderr[-3000:]
    counts = json.loads(replay.stdout)["counts"]
    assert (counts["failed_again"], counts["dlq"]) == (2, 2), counts  # written back in the replay's transaction
    replayed = testkit.committed_offsets(f"{group}.dlq-replay", dlq, bootstrap=broker.plaintext)
    assert set(replayed) == set(dlq_end) and all(replayed[p] >= o for p, o in dlq_end.items()), (replayed, dlq_end)
    assert len(testkit.read_all(dlq, bootstrap=broker.plaintext)) == 4
    for output in (sink.log_text(), inspect.stderr, replay.stderr):
        assert PASSWORD not in output


@pytest.mark.parametrize(("missing", "said"), [
    ("transactional_id", "TRANSACTIONAL_ID_AUTHORIZATION_FAILED: {detail}: grant {principal} WRITE on the "
                         "transactional ids prefixed kafka-timescale-sink.{group}. (PREFIXED)"),
    ("group", "GROUP_AUTHORIZATION_FAILED: {detail}: grant {principal} READ on group {group}"),
    ("input_topic", "TOPIC_AUTHORIZATION_FAILED: {detail}: grant {principal} READ on topic {topic}"),
    # Without WRITE the existing DLQ is invisible: the sink would create it, and may not.
    ("dlq_write", "TOPIC_AUTHORIZATION_FAILED: {detail}grant {principal} WRITE on topic {topic}.dlq"),
])
def test_a_principal_missing_one_acl_stops_at_once_naming_the_grant(
        broker: SecureBroker, secure_topic: str, schema: str, group: str, tmp_path: Path,
        missing: str, said: str) -> None:
    topic = secure_topic
    testkit.create_topic(f"{topic}.dlq", partitions=2, bootstrap=broker.plaintext)
    user = testkit.unique_name("short")
    principal = add_user(broker, user)
    lacking = {"transactional_id": (TX, f"kafka-timescale-sink.{group}.", PRE, OP.WRITE),
               "group": (G, group, LIT, OP.READ), "input_topic": (T, topic, LIT, OP.READ),
               "dlq_write": (T, f"{topic}.dlq", LIT, OP.WRITE)}[missing]
    acls = sink_acls(topic, group, dlq_exists=True)
    assert lacking in acls
    grant(broker, principal, [a for a in acls if a != lacking])
    migrate_with_check(schema, topic, group)
    fill_input(broker, topic)

    started = time.monotonic()
    sink = testkit.SinkProcess(secure_env(broker, schema, topic, group, user, KAFKA_SASL_PASSWORD=PASSWORD),
                               tmp_path / "sink.log").start()
    try:
        code = sink.wait(90)  # RETRY_MAX_ATTEMPTS=0 retries for ever: only a fatal error ends it
    finally:
        if sink.alive():
            sink.kill()
    assert code == 1, sink.log_text()[-3000:]
    assert time.monotonic() - started < 60
    fatal = [e for e in sink.events() if e.get("event") == "fatal_error"]
    assert len(fatal) == 1, sink.log_text()[-3000:]
    head, _, tail = said.partition("{detail}")
    reason = fatal[0]["reason"]
    assert head in reason and tail.format(principal=principal, group=group, topic=topic) in reason, reason
    assert PASSWORD not in sink.log_text()


def test_a_wrong_password_is_fatal_at_once_and_never_written_out(
        broker: SecureBroker, secure_topic: str, schema: str, group: str, tmp_path: Path) -> None:
    topic = secure_topic
    user = testkit.unique_name("locked")
    principal = add_user(broker, user)
    grant(broker, principal, sink_acls(topic, group, dlq_exists=False) + replay_acls(topic, group))
    env = secure_env(broker, schema, topic, group, user, KAFKA_SASL_PASSWORD=WRONG_PASSWORD)

    started = time.monotonic()
    sink = testkit.SinkProcess(env, tmp_path / "sink.log").start()
    try:
        code = sink.wait(60)
    finally:
        if sink.alive():
            sink.kill()
    took = time.monotonic() - started
    log = sink.log_text()
    assert code == 1, log[-3000:]
    assert took < 30  # not a retry loop: RETRY_MAX_ATTEMPTS=0 would retry for ever
    fatal = [e for e in sink.events() if e.get("event") == "fatal_error"]
    assert len(fatal) == 1 and "_AUTHENTICATION" in fatal[0]["reason"], log[-3000:]
    assert "KAFKA_SASL_PASSWORD" in fatal[0]["reason"]
    assert WRONG_PASSWORD not in log and PASSWORD not in log

    for command in (["inspect"], ["replay"]):
        res = dlq_cli(env, *command)
        assert res.returncode == 1, res.stderr[-3000:]
        assert "_AUTHENTICATION" in res.stderr
        assert WRONG_PASSWORD not in res.stdout + res.stderr


def test_check_names_a_refused_login(broker: SecureBroker, secure_topic: str, schema: str, group: str) -> None:
    user = testkit.unique_name("checked")
    add_user(broker, user)
    env = secure_env(broker, schema, secure_topic, group, user, KAFKA_SASL_PASSWORD=WRONG_PASSWORD)
    res = subprocess.run([sys.executable, "-m", "sink", "check", "--json"], env=env, cwd=testkit.ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    broker_check = next(c for c in json.loads(res.stdout)["checks"] if c["check"] == "broker")
    assert broker_check["status"] == "problem" and "_AUTHENTICATION" in broker_check["detail"]
    assert WRONG_PASSWORD not in res.stdout + res.stderr
