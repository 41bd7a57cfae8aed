"""The real sink process at startup: RETRY_MAX_ATTEMPTS bounds the startup retries too, and a
metrics port that cannot be bound is a clear fatal error, not a traceback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dev import testkit

pytestmark = pytest.mark.integration



def _fatal_exit(sink: testkit.SinkProcess) -> dict[str, Any]:
    """The sink exits 1 by itself; its one fatal_error line."""
    try:
        assert sink.wait(60) == 1
    finally:
        if sink.alive():
            sink.kill()
    (fatal,) = [e for e in sink.events() if e["event"] == "fatal_error"]
    return fatal


def test_retry_max_attempts_bounds_the_wait_for_a_database_at_startup(schema: str, topic: str, group: str,
                                                                      logdir: Path) -> None:
    sink = testkit.SinkProcess(testkit.sink_env(schema, topic, group, TIMESCALE_PORT=testkit.closed_port(),
                                                TIMESCALE_CONNECT_TIMEOUT=1, RETRY_MAX_ATTEMPTS=2,
                                                RETRY_INITIAL_BACKOFF=0.1, RETRY_MAX_BACKOFF=0.2),
                               logdir / "sink.log").start()
    fatal = _fatal_exit(sink)
    assert "after 2 attempts" in fatal["reason"]
    (retry,) = [e for e in sink.events() if e["event"] == "retrying"]
    # The class of the failure itself, not of the RetryableError wrapping every failure.
    assert (retry["cause"], retry["error_class"]) == ("migrate", "OperationalError")
    assert "Traceback" not in sink.log_text()


def test_a_metrics_port_in_use_is_a_clear_fatal_error(schema: str, topic: str, group: str, logdir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sink = testkit.SinkProcess(testkit.sink_env(schema, topic, group, METRICS_PORT=port,
                                                    METRICS_HOST="127.0.0.1"), logdir / "sink.log").start()
        fatal = _fatal_exit(sink)
    assert f"METRICS_PORT={port}" in fatal["reason"]
    assert "Traceback" not in sink.log_text()


@pytest.mark.parametrize("command", ["run", "migrate"])
def test_a_timescale_interval_the_database_refuses_exits_2_naming_the_variable(schema: str, topic: str, group: str,
                                                                               tmp_path: Path, command: str) -> None:
    # Only PostgreSQL parses an interval as TimescaleDB will, so this is found once connected;
    # it is still a bad setting (exit 2, config_invalid), not a failed migration (exit 1).
    env = testkit.sink_env(schema, topic, group, TIMESCALE_RETENTION="1 day")
    done = subprocess.run([sys.executable, "-m", "sink", command], env=env, cwd=testkit.ROOT, capture_output=True,
                          timeout=120, check=False)
    assert done.returncode == 2
    (invalid,) = [e for e in map(json.loads, done.stdout.splitlines()) if e["event"] == "config_invalid"]
    assert invalid["reason"].startswith("TIMESCALE_RETENTION='1 day' must be at least")
    assert b"TIMESCALE_RETENTION='1 day'" in done.stderr and b"Traceback" not in done.stderr
    with testkit.connect() as conn:  # refused before anything was created
        assert conn.execute("SELECT to_regclass(%s)", [f"{schema}.schema_migrations"]).fetchone() == (None,)
