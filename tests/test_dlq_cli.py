"""dlq.cli: help on every command, usage errors before any connection, the audit line on failure."""

from __future__ import annotations

import functools
import json

import pytest

import dlq.inspect
from dev import testkit
from dlq.cli import main
from dlq.reader import capture_plan


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for k in list(os.environ):
        if k.startswith(("KAFKA_", "TIMESCALE_", "RETRY_", "LOG_")):
            monkeypatch.delenv(k)


@pytest.mark.parametrize(("argv", "expect"), [
    (["--help"], ["inspect", "replay", "exit codes"]),
    (["inspect", "--help"], ["--json", "--examples", "--error-class", "--offset-range"]),
    (["stats", "--help"], ["--json"]),
    (["replay", "--help"], ["--dry-run", "--to-topic", "--on-failure", "--max", "--group", "--since", "--until",
                            "own group"]),
])
def test_every_command_has_help(argv: list[str], expect: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    for word in expect:
        assert word in out


@pytest.mark.parametrize(("argv", "message"), [
    (["replay", "--offset-range", "9:1"], "empty"),
    (["replay", "--since", "yesterday"], "ISO 8601"),
    (["replay", "--dlq-topic", "x.dlq", "--to-topic", "x.dlq"], "DLQ topic itself"),
    (["replay", "--max", "0"], "--max"),
    (["inspect", "--examples", "-1"], "--examples"),
])
def test_bad_arguments_exit_2_with_a_message_before_connecting(argv: list[str], message: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_option_exits_2() -> None:
    assert main(["replay", "--frobnicate"]) == 2


def test_invalid_configuration_exits_2_naming_the_variable(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KAFKA_EXTRA_CONFIG", '{"group.id": "x"}')
    assert main(["inspect"]) == 2
    assert "KAFKA_EXTRA_CONFIG" in capsys.readouterr().err


def test_a_failed_replay_still_writes_its_audit_line_and_exits_1(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing listens on port 1: the database step fails (quickly) before Kafka is touched.
    monkeypatch.setenv("TIMESCALE_HOST", "127.0.0.1")
    monkeypatch.setenv("TIMESCALE_PORT", "1")
    monkeypatch.setenv("RETRY_INITIAL_BACKOFF", "0.01")
    monkeypatch.setenv("RETRY_MAX_BACKOFF", "0.01")
    assert main(["replay", "--json", "--error-class", "CheckViolation"]) == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["outcome"] == "error" and "db_connect" in summary["error"]
    events = [json.loads(line) for line in captured.err.splitlines() if line.startswith("{")]
    (audit,) = [e for e in events if e["event"] == "dlq_replay_finished"]
    assert audit["outcome"] == "error" and audit["filter"] == {"error_class": ["CheckViolation"]}
    assert audit["user"] and audit["host"] and audit["group"].startswith("timescale_sink_group.dlq-replay.f-")
    assert "password" not in captured.err.lower()


@pytest.mark.parametrize(("setting", "attempts"), [("3", 3), ("0", 8)])
def test_a_replay_gives_up_after_retry_max_attempts_or_8_when_it_is_0(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], setting: str, attempts: int) -> None:
    monkeypatch.setenv("TIMESCALE_HOST", "127.0.0.1")
    monkeypatch.setenv("TIMESCALE_PORT", "1")
    monkeypatch.setenv("RETRY_INITIAL_BACKOFF", "0.01")
    monkeypatch.setenv("RETRY_MAX_BACKOFF", "0.01")
    monkeypatch.setenv("RETRY_MAX_ATTEMPTS", setting)
    assert main(["replay", "--json"]) == 1
    captured = capsys.readouterr()
    assert f"db_connect still failing after {attempts} attempts" in json.loads(captured.out)["error"]
    events = [json.loads(line) for line in captured.err.splitlines() if line.startswith("{")]
    retries = [e for e in events if e["event"] == "retrying"]
    assert len(retries) == attempts - 1
    assert {(e["cause"], e["error_class"]) for e in retries} == {("db_connect", "OperationalError")}


def test_inspect_with_kafka_unreachable_exits_1_with_a_one_line_message(monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import os

    for k in list(os.environ):
        if k.startswith(("KAFKA_", "TIMESCALE_", "RETRY_", "LOG_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{testkit.closed_port()}")
    # The metadata timeout is 15 s; a second is enough to see the broker is not there.
    monkeypatch.setattr(dlq.inspect, "capture_plan", functools.partial(capture_plan, timeout=1.0))
    assert main(["inspect", "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = [x for x in captured.err.splitlines() if x.startswith("sink-dlq")]
    assert line.startswith("sink-dlq inspect: unavailable, try again later: dlq_read: _TRANSPORT")
    assert "Traceback" not in captured.err
