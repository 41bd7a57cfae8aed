"""Fault injection and process probes for chaos scenarios: SIGKILL on a log event, stack dumps
of hung sinks, the broker's SIGKILL, backend termination, RSS sampling."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time

from dev import services, testkit
from sink.settings import APPLICATION_NAME


def rss_kib(pid: int) -> int | None:
    """VmRSS of a process from /proc/<pid>/status, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class RssSampler:
    """(monotonic time, RSS KiB) of one process every `interval` seconds, in a thread."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            kib = rss_kib(self.pid)
            if kib is not None:
                self.samples.append((time.monotonic(), kib))
            self._stop.wait(0.2)

    def peak(self, start: float, end: float) -> int:
        return max((k for t, k in self.samples if start <= t <= end), default=0)

    def at(self, when: float) -> int:
        """The last sample taken at or before `when`."""
        before = [k for t, k in self.samples if t <= when]
        return before[-1] if before else (self.samples[0][1] if self.samples else 0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def await_event(sink: testkit.SinkProcess, events: tuple[str, ...], timeout: float) -> str:
    """Tail the sink's log (every millisecond) until it logs one of `events` from now on;
    returns the event's name, or "timeout" (also when the sink exits)."""
    path = sink.log_path
    pos = path.stat().st_size if path.exists() else 0
    deadline = time.monotonic() + timeout
    needles = [f'"event": "{e}"'.encode() for e in events]
    buf = b""
    with open(path, "rb") as f:
        f.seek(pos)
        while time.monotonic() < deadline and sink.alive():
            chunk = f.read()
            if not chunk:
                time.sleep(0.001)
                continue
            buf += chunk
            *lines, buf = buf.split(b"\n")
            hit = next((ln for ln in lines if any(n in ln for n in needles)), None)
            if hit is not None:
                return str(json.loads(hit)["event"])
    return "timeout"


def kill_on_event(sink: testkit.SinkProcess, events: tuple[str, ...], timeout: float, delay: float = 0.0) -> str:
    """SIGKILL the sink `delay` seconds after it logs one of `events` (or at `timeout`);
    returns what triggered the kill."""
    trigger = await_event(sink, events, timeout)
    if delay and trigger != "timeout":
        time.sleep(delay)
    sink.kill()
    return trigger


def dump_stack(sink: testkit.SinkProcess) -> str:
    """SIGABRT a (hung) sink started with PYTHONFAULTHANDLER=1; returns the stack it printed."""
    start = sink.log_path.stat().st_size if sink.log_path.exists() else 0
    sink.signal(signal.SIGABRT)
    with contextlib.suppress(Exception):
        sink.wait(10)
    with open(sink.log_path, "rb") as f:
        f.seek(start)
        text = f.read().decode("utf-8", "replace")
    lines = text[text.find("Fatal Python error"):].splitlines() if "Fatal Python error" in text else []
    return "\n".join(ln for ln in lines if ln.startswith(("Fatal", "Current", "Thread", "  File")))


def _port_closed(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.05)


def kill_broker() -> None:
    services.stop_kafka(kill=True)
    # stop_kafka(kill=True) can return while the JVM's threads still hold the port.
    _port_closed(services.KAFKA_PORT)


def ensure_services() -> None:
    """Leave the broker and database running for the next test, whatever this one did."""
    if not services.kafka_running():
        _port_closed(services.KAFKA_PORT)
        services.start_kafka()
    if not services.pg_running():
        services.start_postgres()


def terminate_sink_backends(busy_only: bool = True) -> int:
    """pg_terminate_backend on the sink's connections (the sink's role may signal its own
    backends, no superuser needed); busy_only: only those inside a statement or transaction."""
    state = "AND state IN ('active', 'idle in transaction')" if busy_only else ""
    with testkit.connect() as conn:
        # This session's database only: a test session beside this one has its own sinks.
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s "
            f"AND datname = current_database() AND pid <> pg_backend_pid() {state}", [APPLICATION_NAME]).fetchall()
    return sum(1 for (ok,) in rows if ok)
