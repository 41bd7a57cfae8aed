"""The real sink process at startup: RETRY_MAX_ATTEMPTS bounds the startup retries too, and a
metrics port that cannot be bound is a clear fatal error, not a traceback."""

from __future__ import annotations

import socket
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
    assert len([e for e in sink.events() if e["event"] == "retrying"]) == 1
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
