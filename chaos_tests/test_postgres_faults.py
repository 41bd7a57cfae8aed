"""Scenarios 2 and 3: PostgreSQL restarted and its connections terminated while batches are in
flight; PostgreSQL down for longer than max.poll.interval.ms would allow a non-polling consumer."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from chaos_tests.faults import RssSampler, terminate_sink_backends
from chaos_tests.harness import Scenario
from dev import services, testkit
from dev.proxy import TcpProxy
from sink.settings import APPLICATION_NAME

pytestmark = pytest.mark.chaos

MiB = 1024


def _terminate_in_flight(timeout: float = 5.0) -> str:
    """pg_terminate_backend on the sink's connection while it is inside a statement or a
    transaction (polled every few ms); falls back to an idle connection at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = terminate_sink_backends(busy_only=True)
        if n:
            return f"{n} busy backend(s)"
        time.sleep(0.005)
    return f"{terminate_sink_backends(busy_only=False)} idle backend(s)"


def test_postgres_restarts_and_terminated_connections_lose_nothing(chaos: Callable[..., Scenario]) -> None:
    sc = chaos()
    plan = ["terminate"] * sc.profile.n(3) + ["restart"] * sc.profile.n(2)
    sc.rng.shuffle(plan)
    sink = sc.sink()
    sc.producer.stream(lambda: sc.factory.mixed(invalid=0.03, replay=0.03), None, rate=400)
    sc.wait_table()
    for fault in plan:
        sc.wait_progress(90)
        time.sleep(sc.rng.uniform(0.2, 2.0))
        if fault == "terminate":
            with sc.fault("pg_terminate_backend") as f:
                f.detail = _terminate_in_flight()
        else:
            down = sc.rng.uniform(0.5, 4.0)
            with sc.fault("pg_restart_immediate", f"down {down:.1f}s"):
                services.stop_postgres("immediate")
                time.sleep(down)
                services.start_postgres()
    sc.wait_progress(90)
    sc.producer.stop_stream()
    sc.assert_invariants()
    assert sink.alive(), "the sink exited on a database fault instead of retrying"
    events = {e["event"] for e in sink.events()}
    assert {"retrying", "recovered"} <= events
    assert sink.stop() == 0


def test_database_connections_reset_or_stalled_by_the_network_lose_nothing(chaos: Callable[..., Scenario]) -> None:
    """Through a TCP proxy: connections reset (RST) at random moments, including mid-COPY and
    mid-COMMIT (where the client cannot know whether the server committed), and stalls."""
    sc = chaos()
    proxy = TcpProxy("127.0.0.1", services.PG_PORT).start()
    try:
        sink = sc.sink(timescale_port=proxy.port)
        plan = ["reset"] * sc.profile.n(4) + ["stall"] * sc.profile.n(2)
        sc.rng.shuffle(plan)
        sc.producer.stream(lambda: sc.factory.mixed(invalid=0.03, replay=0.03), None, rate=500)
        sc.wait_table()
        cuts: list[int] = []
        for fault in plan:
            sc.wait_progress(90)
            time.sleep(sc.rng.uniform(0.05, 1.5))
            if fault == "reset":
                # Progress can be the Kafka commit of a batch written before the last reset,
                # while the writer reconnects only for its next batch: cut once it has.
                testkit.wait_for(lambda: proxy.open_connections > 0, 60, interval=0.05,
                                 what="the sink's database connection through the proxy")
                with sc.fault("network_reset") as f:
                    cuts.append(proxy.cut())
                    f.detail = f"{cuts[-1]} connection(s)"
            else:
                stall = sc.rng.uniform(1.0, 5.0)
                with sc.fault("network_stall", f"{stall:.1f}s"):
                    proxy.stall(stall)
        sc.wait_progress(90)
        sc.producer.stop_stream()
        sc.assert_invariants()
        assert sink.alive(), "the sink exited on a reset connection instead of retrying"
        # Each reset hit the sink's open connection(s) (it had just written), and it got going again.
        assert cuts and all(n > 0 for n in cuts), f"resets that cut no connection: {cuts}"
        events = {e["event"] for e in sink.events()}
        assert {"retrying", "recovered"} <= events, "the sink never retried or recovered from a reset"
        assert sink.stop() == 0
    finally:
        proxy.close()


class _SessionTrace:
    """The sink's database sessions over time, as changes (one line each): state, wait, open
    transaction and the transaction each one waits for.  A background thread polls on its own
    autocommit connection (pg_stat_activity is a snapshot per transaction).  For an assertion
    message: what the server saw when a test's picture of it turns out wrong."""

    def __init__(self, every: float = 0.05) -> None:
        self._every = every
        self._t0 = time.monotonic()
        self._last: dict[int, tuple[object, ...]] = {}
        self.changes: list[str] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-session-trace", daemon=True)

    def start(self) -> _SessionTrace:
        self.mark(f"trace started at {datetime.now(UTC).isoformat()} (the sink logs UTC)")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(5)

    def mark(self, what: str) -> None:
        self.changes.append(f"{time.monotonic() - self._t0:7.2f}s  -- {what} (polls: {self.polls})")

    def _run(self) -> None:
        with testkit.connect() as conn:
            while not self._stop.wait(self._every):
                rows = conn.execute(
                    "SELECT a.pid, a.state, a.wait_event_type, a.wait_event, a.backend_xid::text, "
                    "       left(a.query, 24), "
                    "       (SELECT string_agg(DISTINCT l.transactionid::text, ',') FROM pg_locks l "
                    "        WHERE l.pid = a.pid AND NOT l.granted AND l.locktype = 'transactionid') "
                    "FROM pg_stat_activity a WHERE a.application_name = %s", [APPLICATION_NAME]).fetchall()
                now = time.monotonic() - self._t0
                self.polls += 1
                seen = set()
                for pid, *rest in rows:
                    seen.add(pid)
                    if self._last.get(pid) != tuple(rest):
                        self._last[pid] = tuple(rest)
                        state, wtype, wevent, xid, query, waits_for = rest
                        self.changes.append(f"{now:7.2f}s  pid {pid} {state} wait={wtype}/{wevent} xid={xid} "
                                            f"waits_for_xid={waits_for} {query!r}")
                for pid in set(self._last) - seen:
                    del self._last[pid]
                    self.changes.append(f"{now:7.2f}s  pid {pid} gone")


def _sink_backends() -> list[tuple[int, str, str, str]]:
    """(pid, state, query, wait_event_type) of the sink's database sessions."""
    with testkit.connect() as conn:
        return [(int(pid), str(state), str(query), str(wait)) for pid, state, query, wait in conn.execute(
            "SELECT pid, state, query, wait_event_type FROM pg_stat_activity "
            "WHERE application_name = %s", [APPLICATION_NAME])]


def test_connection_reset_while_its_backend_stays_in_a_transaction_does_not_wedge_the_sink(
        chaos: Callable[..., Scenario]) -> None:
    """A load balancer or NAT that loses its state resets the sink's connection, and the server
    never hears of it: the old session stays 'idle in transaction', holding the rows of the batch
    the sink is about to retry.  The sink must get going again by itself, not wait on those row
    locks until the server's TCP keepalive notices (hours by default)."""
    sc = chaos()
    proxy = TcpProxy("127.0.0.1", services.PG_PORT).start()
    trace = _SessionTrace()
    try:
        sink = sc.sink(timescale_port=proxy.port)
        sc.producer.stream(lambda: sc.factory.mixed(invalid=0.03, replay=0.03), None, rate=500)
        sc.wait_table()
        sc.wait_progress(90)
        trace.start()
        with sc.fault("half_open_connection") as f, testkit.connect(sc.schema, autocommit=False) as lock:
            # Hold the sink's next INSERT on a SHARE lock (shorter than its lock_timeout, 10 s), so
            # that the connection goes while the INSERT is surely in flight: let go, the INSERT
            # completes on the server, whose session then waits, in its transaction and holding
            # the batch's rows, for a COMMIT from a client that is gone.
            lock.execute("LOCK TABLE iot_measurements IN SHARE MODE")
            blocked = testkit.wait_for(
                lambda: {pid for pid, state, query, wait in _sink_backends()
                         if state == "active" and query.startswith("INSERT") and wait == "Lock"},
                8, interval=0.05, what="the sink's INSERT waiting on the table lock")
            severed = proxy.sever()
            trace.mark(f"severed {severed} connection(s); blocked INSERT: {sorted(blocked)}")
            # Hold the sink's new connections (its retry of the batch) until the old session's
            # INSERT has gone in: a retry that got its rows in first would leave that session
            # holding none of them (its own INSERT then skips them as conflicts).
            stall = threading.Thread(target=proxy.stall, args=(2.0,), name="chaos-stall", daemon=True)
            stall.start()
            lock.rollback()
            trace.mark("table lock released")
            zombies = testkit.wait_for(
                lambda: [b for b in _sink_backends() if b[0] in blocked and b[1] == "idle in transaction"],
                1.5, interval=0.05, what="a session left in its transaction after its INSERT")
            trace.mark(f"zombie(s) seen: {zombies}")
            stall.join()
            trace.mark("stall over")
            f.detail = f"{severed} connection(s) severed; sessions left in a transaction: {[b[0] for b in zombies]}"
        assert zombies and all(query.startswith("INSERT") for _, _, query, _ in zombies), zombies
        sc.producer.stop_stream()
        sc.extra["catch_up_s"] = sc.wait_caught_up(60)
        trace.stop()
        sc.assert_invariants()
        events = sink.events()
        assert "recovered" in {e["event"] for e in events}, "the sink did not recover from its severed connection"
        # The retried batch did run into the old session's rows (its lock_timeout, 10 s, is shorter
        # than the server's idle_in_transaction_session_timeout, 20 s, that ends the old session).
        # That session holds them because the INSERT reached the server whole: when psycopg still
        # prepared it (on its 6th run on a connection, in a round trip of its own), the statement
        # waiting on the lock was, in 1 run of ~6, the PREPARE, and the session held no rows.
        reasons = [str(e.get("reason")) for e in events if e["event"] == "retrying"]
        if not any("55P03" in r for r in reasons):
            # What the server and the sink did, for a failure that must be explained, not guessed.
            told = [f"{e['timestamp']} {e['event']} " + " ".join(f"{k}={e[k]}" for k in
                                                                ("batch_id", "attempt", "reason", "inserted",
                                                                 "duplicates", "insert_ms") if k in e)
                    for e in events if e["event"] in {"retrying", "recovered", "db_connected", "db_disconnected",
                                                        "batch_written"}][-40:]
            pytest.fail("the retry never waited on the old session's rows\nsessions:\n  "
                        + "\n  ".join(trace.changes) + "\nsink:\n  " + "\n  ".join(told))
        assert sink.stop() == 0
    finally:
        trace.stop()
        proxy.close()


def test_long_postgres_outage_keeps_the_sink_in_its_group_with_bounded_memory(
        chaos: Callable[..., Scenario]) -> None:
    sc = chaos()
    max_poll_ms = 10_000
    outages = [sc.rng.uniform(13, 16) if not sc.profile.soak else sc.rng.uniform(30, 60)
               for _ in range(sc.profile.n(1))]
    sink = sc.sink(kafka_max_poll_interval_ms=max_poll_ms, batch_size=1000)
    rss = RssSampler(sink.pid)
    sc.producer.stream(lambda: sc.factory.mixed(invalid=0.02, replay=0.02), None, rate=300)
    sc.wait_table()
    growth: list[int] = []
    for down in outages:
        sc.wait_progress(90)
        time.sleep(sc.rng.uniform(0.2, 2.0))
        with sc.fault("pg_down", f"{down:.1f}s > max.poll.interval {max_poll_ms / 1000:.0f}s"):
            services.stop_postgres(sc.rng.choice(["fast", "immediate"]))
            t_down = time.monotonic()
            # A backlog for the paused consumer: if the sink buffered what it cannot write, it
            # would show in its memory.
            sc.producer.send((sc.factory.valid() for _ in range(sc.profile.n(30_000) // sc.profile.scale)),
                             flush=False)
            time.sleep(max(0.0, down - (time.monotonic() - t_down)))
            t_up = time.monotonic()
            services.start_postgres()
        growth.append(rss.peak(t_down, t_up) - rss.at(t_down))
        sc.note(f"RSS while the database was down: start {rss.at(t_down) / MiB:.0f} MiB, "
                f"peak {rss.peak(t_down, t_up) / MiB:.0f} MiB")
        assert sink.alive(), "the sink exited while the database was down"
    sc.wait_progress(120)
    sc.producer.stop_stream()
    rss.stop()
    sc.extra["rss_growth_mib"] = max(growth) // MiB
    sc.assert_invariants()
    events = sink.events()
    names = [e["event"] for e in events]
    assert "partitions_revoked" not in names and "partitions_lost" not in names, \
        "the sink left its group during the outage (max.poll.interval.ms exceeded?)"
    assert not [e for e in events if e["event"] == "kafka_error" and "POLL" in str(e.get("error_class"))]
    assert names.count("partitions_assigned") == 1
    assert "recovered" in names
    # Paused partitions are not fetched; what is held is one batch and librdkafka's bounded
    # prefetch (16 MiB).  Buffering the ~10 MB backlog as Python objects would show as >100 MiB.
    assert max(growth) < 64 * MiB, f"RSS grew by {max(growth) / MiB:.0f} MiB while the database was down"
    assert sink.stop() == 0
