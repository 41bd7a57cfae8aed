"""dev/services.py: a state directory remembers the ports its servers were started with, checks
its ports before any install, and tells its own servers from someone else's on its ports."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dev import testkit

pytestmark = pytest.mark.integration

PORT_VARIABLES = ("DEV_KAFKA_PORT", "DEV_KAFKA_CONTROLLER_PORT", "DEV_PG_PORT", "TIMESCALE_PORT", "DEV_PG_HOME")


def services(action: str, state: Path, timeout: float = 180, **ports: int) -> subprocess.CompletedProcess[str]:
    """`python3 dev/services.py <action>` for state directory `state`, in a shell with no port
    variables but those given."""
    env = {k: v for k, v in os.environ.items() if k not in PORT_VARIABLES}
    env.update({"DEV_STATE_DIR": str(state), "DEV_KAFKA_HEAP": "-Xms64m -Xmx256m"})
    env.update({k: str(v) for k, v in ports.items()})
    return subprocess.run([sys.executable, "dev/services.py", action], env=env, cwd=testkit.ROOT,
                          capture_output=True, text=True, timeout=timeout)


def free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(testkit.closed_port())
    return sorted(ports)


@contextmanager
def listening(port: int) -> Iterator[None]:
    """Someone else's server on `port`."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        yield


def test_status_env_and_down_find_the_ports_up_was_given(infra: None, tmp_path: Path) -> None:
    state = tmp_path / "state"
    kafka, controller, pg = free_ports(3)
    pg_home: Path | None = None
    try:
        up = services("up", state, DEV_KAFKA_PORT=kafka, DEV_KAFKA_CONTROLLER_PORT=controller, DEV_PG_PORT=pg)
        assert up.returncode == 0, up.stderr[-3000:]

        # Another shell: only the state directory is named.
        status = services("status", state)
        assert status.returncode == 0
        assert re.search(rf"^kafka +running \(ours, pid \d+\) +127\.0\.0\.1:{kafka} \(controller {controller}\)$",
                         status.stdout, re.M), status.stdout
        found = re.search(rf"^postgres running \(ours, pid \d+\) +127\.0\.0\.1:{pg} \((.+)\)$", status.stdout, re.M)
        assert found, status.stdout
        pg_home = Path(found.group(1))
        env = services("env", state).stdout
        assert f"export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{kafka}\n" in env
        assert f"export TIMESCALE_PORT={pg}\n" in env

        assert services("down", state).returncode == 0
        with listening(kafka):
            stopped = services("status", state).stdout
        assert re.search(rf"^kafka +stopped +127\.0\.0\.1:{kafka}; port {kafka} in use by someone else's process$",
                         stopped, re.M), stopped
        assert re.search(rf"^postgres stopped +127\.0\.0\.1:{pg} \(", stopped, re.M), stopped
    finally:
        services("down", state)
        if pg_home is not None and pg_home.parent.name.startswith("kafka-timescale-sink-"):
            shutil.rmtree(pg_home.parent, ignore_errors=True)  # outside the state directory (see pg_home)


def test_up_on_a_taken_port_fails_at_once_before_installing_or_creating_anything(tmp_path: Path) -> None:
    state = tmp_path / "state"
    kafka, controller, pg = free_ports(3)
    with listening(pg):
        t0 = time.monotonic()
        up = services("up", state, timeout=30, DEV_KAFKA_PORT=kafka, DEV_KAFKA_CONTROLLER_PORT=controller,
                      DEV_PG_PORT=pg)
        elapsed = time.monotonic() - t0

    assert up.returncode == 1
    assert f"port {pg} is taken by another process, not the postgres cluster of {state}: set DEV_PG_PORT" in up.stderr
    assert "kafka up" not in up.stderr
    assert not state.exists() or list(state.iterdir()) == []  # no broker data, no cluster, no downloads
    assert elapsed < 10
