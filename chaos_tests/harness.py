"""The chaos scenario harness: seed, producer + ledger, checker, sinks, faults, summary.

A Scenario owns everything one test starts and tears it all down (sinks killed, threads
stopped, the broker and database running again for the next test).  Fault *plans* (what,
when, how long) and record contents come from Randoms seeded with CHAOS_SEED and the
scenario's name; the operating system's timing is not reproducible, the plan is.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos_tests.checker import DlqReader, OffsetChecker
from chaos_tests.faults import dump_stack, ensure_services
from chaos_tests.invariants import Outcome, check_final
from chaos_tests.ledger import Ledger, StreamProducer
from chaos_tests.records import RecordFactory
from dev import testkit
from sink.watchdog import EXIT_STUCK

# ---------------------------------------------------------------------------- seed and profile


def _seed_from_env() -> int:
    raw = os.environ.get("CHAOS_SEED", "").strip()
    return int(raw) if raw else random.SystemRandom().randrange(1, 2**31)


SEED = _seed_from_env()
SUMMARIES: list[str] = []  # one line per scenario, printed again in pytest's terminal summary


@dataclass(frozen=True)
class Profile:
    """CI (default): short streams, few faults.  CHAOS_SOAK=1: longer streams, more faults;
    CHAOS_SCALE=N multiplies both further (soak only)."""

    soak: bool
    scale: int

    @classmethod
    def from_env(cls) -> Profile:
        soak = os.environ.get("CHAOS_SOAK", "").strip().lower() in {"1", "true", "yes", "on"}
        scale = int(os.environ.get("CHAOS_SCALE", "5" if soak else "1")) if soak else 1
        return cls(soak, max(1, scale))

    def n(self, ci: int) -> int:
        """A count (records, faults) for this profile."""
        return ci * self.scale

    def secs(self, ci: float, soak: float) -> float:
        return soak if self.soak else ci


PROFILE = Profile.from_env()

# Sinks in chaos tests: small batches (many commits, many places to crash), fast retries, and a
# short session timeout so that a SIGKILLed member leaves the group in seconds, not 45.
CHAOS_SINK_ENV: dict[str, Any] = {
    "batch_size": 200,
    "batch_timeout": 0.3,
    "retry_initial_backoff": 0.2,
    "retry_max_backoff": 2,
    "kafka_extra_config": json.dumps({"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"}),
    # SIGABRT then dumps every thread's Python stack into the log: how a hung sink is diagnosed.
    "pythonfaulthandler": "1",
}


# ---------------------------------------------------------------------------- the scenario


@dataclass
class Fault:
    kind: str
    started: float
    healed: float | None = None
    detail: str = ""


@dataclass
class Scenario:
    name: str
    topic: str
    schema: str
    group: str
    logdir: Path
    partitions: int = 3
    seed: int = SEED
    profile: Profile = PROFILE
    sinks: list[testkit.SinkProcess] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    latest_wins: bool = False  # the sinks run WRITE_MODE=update: a key ends with its last record's row

    def __post_init__(self) -> None:
        self.t0 = time.monotonic()
        self.rng = random.Random(f"{self.seed}/{self.name}/faults")
        self.factory = RecordFactory(random.Random(f"{self.seed}/{self.name}/data"), self.name)
        self.ledger = Ledger(self.partitions)
        self.producer = StreamProducer(self.topic, self.ledger, random.Random(f"{self.seed}/{self.name}/route"))
        self.dlq = DlqReader(f"{self.topic}.dlq")
        self.checker = OffsetChecker(self.ledger, self.topic, self.group, self.schema, self.dlq).start()
        self.outcome: Outcome | None = None
        # The checker's completed verifications (and the records they verified) before the final one.
        self.samples_during_run = 0
        self.verified_during_run = 0
        self.note(f"seed={self.seed} profile={'soak' if self.profile.soak else 'ci'} "
                  f"(CHAOS_SEED={self.seed} reproduces this plan)")

    # ------------------------------------------------------------------ logging

    def note(self, msg: str) -> None:
        print(f"[chaos {self.name} +{time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ sinks

    def sink(self, **env: Any) -> testkit.SinkProcess:
        merged = {**CHAOS_SINK_ENV, **env}
        s = testkit.SinkProcess(testkit.sink_env(self.schema, self.topic, self.group, **merged),
                                self.logdir / f"sink-{len(self.sinks)}.log").start()
        self.sinks.append(s)
        self.note(f"sink {len(self.sinks) - 1} started (pid {s.pid})")
        return s

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return [e for s in self.sinks for e in s.events() if name is None or e.get("event") == name]

    def wait_table(self, timeout: float = 60) -> None:
        testkit.wait_table(self.schema, timeout)

    def wait_assigned(self, sink: testkit.SinkProcess, timeout: float = 60) -> None:
        testkit.wait_for(lambda: any(e.get("event") == "partitions_assigned" for e in sink.events()), timeout,
                         what="partitions assigned to the sink")

    def wait_progress(self, timeout: float = 60) -> None:
        """Until the committed offsets grow past where they are now."""
        start = self.checker.stats.progress[-1][1] if self.checker.stats.progress else 0
        self._wait(lambda: bool(self.checker.stats.progress) and self.checker.stats.progress[-1][1] > start,
                   timeout, "an offset commit")

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """wait_for, but fails at once if every sink has exited, and a timeout SIGABRTs the
        live sinks (PYTHONFAULTHANDLER=1) to show in the assertion where each of them hangs."""

        def done() -> bool:
            if predicate():
                return True
            if self.sinks and not any(s.alive() for s in self.sinks):
                raise AssertionError(f"every sink exited while waiting for {what} (CHAOS_SEED={self.seed}): "
                                     + "; ".join(f"pid {s.pid} exit {s.proc.returncode if s.proc else None}, "
                                                 f"last event {self._last_event(s)}" for s in self.sinks[-3:]))
            return False

        try:
            testkit.wait_for(done, timeout, interval=0.3, what=what)
        except TimeoutError:
            stacks = [f"sink pid {s.pid} (last event {self._last_event(s)}):\n{dump_stack(s)}"
                      for s in self.sinks if s.alive()]
            raise AssertionError(f"no {what} within {timeout:.0f}s (CHAOS_SEED={self.seed}); "
                                 f"{len(stacks)} live sink(s)\n" + "\n".join(stacks)) from None

    def supervise(self, sink: testkit.SinkProcess, wait: Callable[[float], object], deadline: float,
                  restart: Callable[[], testkit.SinkProcess] | None = None) -> testkit.SinkProcess:
        """wait(seconds left); a sink that its watchdog ended (exit 75), and only such a sink, is
        started again (`restart`, default sink()), as compose's `restart: unless-stopped` would,
        and counted in the summary (sink_restarts).  Returns the sink running now."""
        while True:
            try:
                wait(max(1.0, deadline - time.monotonic()))
                return sink
            except Exception:
                if sink.alive() or time.monotonic() > deadline:
                    raise
                code = sink.wait(5)
                assert code == EXIT_STUCK, f"the sink exited with {code}, not its watchdog's {EXIT_STUCK}"
                self.extra["sink_restarts"] = self.extra.get("sink_restarts", 0) + 1
                self.note(f"sink ended by its watchdog (exit {code}); restarted as a supervisor would")
                sink = restart() if restart is not None else self.sink()

    @staticmethod
    def _last_event(sink: testkit.SinkProcess) -> str:
        evs = sink.events()
        if not evs:
            return "none"
        last = evs[-1]
        reason = f" ({last['reason']})" if "reason" in last else ""
        return f"{last.get('event')}{reason} at {last.get('timestamp')}"

    # ------------------------------------------------------------------ faults

    @contextlib.contextmanager
    def fault(self, kind: str, detail: str = "") -> Iterator[Fault]:
        """Record a fault: from entering the block (injected) to leaving it (healed)."""
        f = Fault(kind, time.monotonic(), detail=detail)
        self.faults.append(f)
        self.note(f"fault {kind} {detail}".rstrip())
        try:
            yield f
        finally:
            f.healed = time.monotonic()
            self.note(f"healed {kind} {f.detail} after {f.healed - f.started:.1f}s")

    def all_committed_after(self, since: float) -> float | None:
        """Seconds from `since` until every partition's committed offset had moved past where it
        stood then (None: not yet): the whole input flowing again, not just some partitions."""
        history = self.checker.stats.history
        before = [c for t, c in history if t <= since]
        start = before[-1] if before else {}
        for t, committed in history:
            if t > since and all(committed.get(p, 0) > start.get(p, 0) for p in range(self.partitions)):
                return t - since
        return None

    def wait_all_committed_after(self, since: float, timeout: float = 60) -> None:
        """Until every partition's committed offset has moved past where it stood at `since`."""
        self._wait(lambda: self.all_committed_after(since) is not None, timeout, "a commit on every partition")

    def recovery_times(self) -> list[tuple[Fault, float]]:
        """Per healed fault: from healing to the next growth of the committed offsets."""
        out = []
        for f in self.faults:
            if f.healed is None:
                continue
            nxt = [t for t, _ in self.checker.stats.progress if t > f.healed]
            if nxt:
                out.append((f, nxt[0] - f.healed))
        return out

    # ------------------------------------------------------------------ the end

    def wait_caught_up(self, timeout: float = 120) -> float:
        """Until the group committed every input record; returns how long that took."""
        start = time.monotonic()
        # The end offsets are read once: first let the stream's last records be acknowledged.
        # After stop_stream() they may still be in flight (retried after a broker restart), and
        # the sink's commit then passes the ends read too early and never equals them.
        self.producer.wait()
        ends = {p: o for p, o in testkit.end_offsets(self.topic).items() if o > 0}
        last: dict[int, int] = {}

        def caught_up() -> bool:
            try:
                last.update(testkit.committed_offsets(self.group, self.topic))
            except Exception:  # the broker may still be finding its feet
                return False
            return last == ends

        try:
            self._wait(caught_up, timeout, "commit of every input record")
        except AssertionError as e:
            behind = {p: f"{last.get(p, 0)}/{o}" for p, o in sorted(ends.items()) if last.get(p, 0) < o}
            raise AssertionError(f"{e}\npartitions behind (committed/end): {behind}") from None
        return time.monotonic() - start

    def finish(self, upto: dict[int, int] | None = None, catch_up: float = 120) -> Outcome:
        """Stop producing, wait until everything is committed (unless `upto` says where the
        sink stopped), take a last checker sample, and check the final invariants."""
        self.producer.wait()
        self.assert_ledger_complete()
        if upto is None:
            self.extra["catch_up_s"] = self.wait_caught_up(catch_up)
        self.checker.stop()
        self.samples_during_run = self.checker.stats.samples
        self.verified_during_run = self.checker.stats.records_verified
        # The DLQ is complete once no transaction is open on it (an abandoned one times out).
        t = time.monotonic()
        testkit.wait_for(self.dlq.stable, 90, interval=0.5, what="no open transaction on the DLQ")
        self.extra["dlq_settle_s"] = time.monotonic() - t
        self.dlq.drain(10)
        self.checker.check_once(final=True)
        table = testkit.rows(self.schema)
        out = check_final(self.ledger.all(), table, self.dlq.records, self.topic, upto, self.latest_wins)
        self.outcome = out
        self.summarise()
        # Invariants over an empty expectation hold for any sink.
        assert out.expected_rows > 0, f"scenario {self.name} expected no rows: nothing was checked"
        return out

    def assert_ledger_complete(self) -> None:
        """The ledger holds every record of the input topic: the invariants compare the table
        and the DLQ with the ledger, so a record the ledger missed would go unchecked.  The
        harness is the only writer of the topic (idempotent, no transactions: no gaps)."""
        ends = testkit.end_offsets(self.topic)
        known = {p: self.ledger.known(p) for p in range(self.partitions)}
        assert len(self.ledger) == self.producer.sent == sum(ends.values()), (
            f"ledger incomplete: {len(self.ledger)} records in the ledger, {self.producer.sent} sent, "
            f"{sum(ends.values())} in the topic {ends}")
        assert known == ends, f"ledger has gaps: known up to {known}, topic ends at {ends}"

    def assert_invariants(self, upto: dict[int, int] | None = None) -> Outcome:
        out = self.outcome or self.finish(upto)
        stats = self.checker.stats
        problems = out.problems + [f"during the run: {v}" for v in stats.violations[:10]] + stats.regressions[:10]
        assert not problems, (f"chaos scenario {self.name} (CHAOS_SEED={self.seed}) broke invariants:\n  "
                              + "\n  ".join(problems) + f"\n{self.dlq.describe()}\nsink logs: {self.logdir}")
        # At least one completed verification during the run besides the final one, which
        # verified records (a busy machine samples slowly; samples that raised do not count).
        assert self.samples_during_run >= 1 and self.verified_during_run > 0, (
            f"the offset checker completed {self.samples_during_run} verification(s) during the run, "
            f"verifying {self.verified_during_run} records ({stats.failed_samples} samples failed)")
        return out

    def summarise(self) -> str:
        produced = self.ledger.all()
        kinds: dict[str, int] = {}
        for r in produced:
            k = r.planned.kind if r.planned.kind in ("valid", "replay", "correction", "write_poison") else "invalid"
            kinds[k] = kinds.get(k, 0) + 1
        written = self.events("batch_written")
        fault_kinds: dict[str, int] = {}
        for f in self.faults:
            fault_kinds[f.kind] = fault_kinds.get(f.kind, 0) + 1
        recs = self.recovery_times()
        rec = [r for _, r in recs]
        if recs:
            self.note("recovery per fault: " + ", ".join(f"{f.kind}[{f.detail}] {r:.1f}s" for f, r in recs))
        out = self.outcome
        line = (
            f"chaos {self.name}: seed={self.seed} produced={len(produced)} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}) "
            f"inserted={out.rows if out else '?'} (sink says {sum(e.get('inserted', 0) for e in written)}) "
            f"duplicates_absorbed={sum(e.get('duplicates', 0) for e in written)} "
            + (f"updated={sum(e.get('updated', 0) for e in written)} " if self.latest_wins else "")
            + f"dlq={out.dlq if out else '?'} "
            f"faults={len(self.faults)} ({', '.join(f'{k} x{v}' for k, v in fault_kinds.items()) or 'none'}) "
            f"recovery={f'max {max(rec):.1f}s mean {statistics.mean(rec):.1f}s' if rec else '-'} "
            f"checker_samples={self.checker.stats.samples} "
            + " ".join(f"{k}={v:.1f}s" if isinstance(v, float) else f"{k}={v}" for k, v in self.extra.items())
            + f" duration={time.monotonic() - self.t0:.0f}s"
        )
        SUMMARIES.append(line)
        print(line, file=sys.stderr, flush=True)
        (self.logdir / "summary.txt").parent.mkdir(parents=True, exist_ok=True)
        (self.logdir / "summary.txt").write_text(line + "\n")
        return line

    def close(self) -> None:
        for s in self.sinks:
            if s.alive():
                s.kill()
        self.producer.close()
        self.checker.close()
        if self.outcome is None:
            self.summarise()  # a partial line for a scenario that failed early
        ensure_services()
        with contextlib.suppress(Exception):
            self.dlq.close()
