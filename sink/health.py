"""HTTP endpoints for probes and Prometheus: /healthz (the loop turns), /readyz (broker and
database reachable, partitions assigned or awaited), /metrics."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sink.metrics import Metrics

# The loop turns at least every poll timeout (0.05 s), also between retries.  It blocks longer
# only inside one database statement (the writer's statement_timeout, 120 s; a dead connection
# is found by TCP keepalives within ~60-90 s) or one Kafka commit (the watchdog's 90 s): three
# minutes without a turn means it is stuck (a hung call), and the container should be restarted.
LOOP_STALL_SECONDS = 180.0


@dataclass
class HealthState:
    """Written by the pipeline thread, read by the HTTP thread (plain attribute stores)."""

    last_turn: float = 0.0
    db_ok: bool = False
    broker_ok: bool = False
    assigned: int = 0
    stopping: bool = False
    fatal: str | None = None
    # Startup migrations run: one statement may take long (e.g. moving rows into chunks), and
    # killing the process would only start it over.  Alive, not ready.
    migrating: bool = False

    def turn(self) -> None:
        self.last_turn = time.monotonic()

    def alive(self) -> tuple[bool, dict[str, Any]]:
        age = time.monotonic() - self.last_turn
        ok = self.fatal is None and (self.migrating or age < LOOP_STALL_SECONDS)
        return ok, {"loop_age_s": round(age, 3), "fatal": self.fatal, "migrating": self.migrating}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        alive, info = self.alive()
        ok = alive and self.db_ok and self.broker_ok and not self.stopping and not self.migrating
        return ok, {**info, "db": self.db_ok, "kafka": self.broker_ok, "assigned_partitions": self.assigned,
                    "stopping": self.stopping}


def serve(host: str, port: int, state: HealthState, metrics: Metrics) -> ThreadingHTTPServer:
    """Start the server in a daemon thread."""
    # Read at scrape time, so /metrics and /readyz cannot disagree.
    metrics.ready.set_function(lambda: float(state.ready()[0]))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                ok, info = state.alive() if path == "/healthz" else state.ready()
                body = json.dumps({"status": "ok" if ok else "unavailable", **info}).encode()
                self._send(200 if ok else 503, body, "application/json")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # probes are not worth a log line
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health-http", daemon=True).start()
    return server
