"""The service's command line: run, migrate, logs search, demo."""

from __future__ import annotations

import argparse
import gc
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from tenacity import RetryCallState

from sink import __version__
from sink.errors import (
    FatalError,
    RetryableError,
    SinkError,
    classify_db_error,
    classify_kafka_error,
    retry_log_fields,
)
from sink.logs import configure_logging, format_from_env, get_logger
from sink.retry import RetryPolicy, retrying
from sink.settings import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from sink.health import HealthState
    from sink.metrics import Metrics

log = get_logger("sink.cli")
T = TypeVar("T")

EXIT_OK, EXIT_FATAL, EXIT_CONFIG = 0, 1, 2
GIL_SWITCH_INTERVAL_S = 0.0002  # the writer thread gets the GIL back sooner than after the default 5 ms (bench/)
GC_GEN0_THRESHOLD = 10_000  # with gc.freeze(): far fewer collections of a batch's short-lived objects (bench/)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kafka-timescale-sink", description=__doc__)
    ap.add_argument("--version", action="version", version=__version__)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the sink (configured by env vars, see README)",
                   description="Consume the input topic into the database until SIGTERM/SIGINT.",
                   epilog=run_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_parser("migrate", help="apply the schema migrations and exit")
    check = sub.add_parser("check", help="preflight: would the sink start with this configuration?",
                           description="Ask the broker and the database what would stop or hobble the sink "
                                       "(nothing is changed). Exit 0 only when it would start.")
    check.add_argument("--json", action="store_true", help="one JSON document for scripts")
    logs = sub.add_parser("logs", help="work with the sink's JSON logs")
    logs_sub = logs.add_subparsers(dest="logs_command", required=True)
    from sink import logsearch

    search = logs_sub.add_parser("search", help="filter JSON log lines; trace a record with --record",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    logsearch.add_arguments(search)
    demo = sub.add_parser("demo", help="produce demo IoT records to the input topic")
    demo.add_argument("--count", type=int, default=10_000)
    demo.add_argument("--rate", type=float, default=0.0, help="records/s (0 = as fast as possible)")
    demo.add_argument("--invalid-share", type=float, default=0.01)
    demo.add_argument("--duplicate-share", type=float, default=0.02)
    demo.add_argument("--seed", type=int, default=42)
    args = ap.parse_args(argv)

    if args.command == "logs":
        return logsearch.run(args)
    try:
        settings = load_settings()
    except ConfigError as e:
        configure_logging(format_from_env())
        log.error("config_invalid", reason=str(e))
        print(f"kafka-timescale-sink: {e}", file=sys.stderr)
        return EXIT_CONFIG
    # check's report is its stdout; what it logs on the way (a Kafka client's warnings) goes to stderr.
    configure_logging(settings.log_format, settings.log_level, stream=sys.stderr if args.command == "check" else None)
    try:
        if args.command == "run":
            return run(settings)
        if args.command == "check":
            from sink import preflight

            findings = preflight.run_checks(settings)
            if args.json:
                print(preflight.render_json(findings))
            else:
                preflight.render_table(findings, print)
            return EXIT_OK if preflight.would_start(findings) else EXIT_FATAL
        if args.command == "migrate":
            _migrate(settings, lambda: False, None)
            return EXIT_OK
        if args.command == "demo":
            from sink.demo import produce

            n = produce(settings.kafka_bootstrap_servers, settings.kafka_input_topic, args.count, rate=args.rate,
                        seed=args.seed, invalid_share=args.invalid_share, duplicate_share=args.duplicate_share,
                        extra_config=settings.kafka_client_config())
            log.info("demo_produced", topic=settings.kafka_input_topic, rows=n)
            return EXIT_OK if n == args.count else EXIT_FATAL
    except ConfigError as e:  # found at start by the database (TIMESCALE_* intervals)
        log.error("config_invalid", reason=str(e))
        print(f"kafka-timescale-sink: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except FatalError as e:
        log.critical("fatal_error", reason=str(e))
        print(f"kafka-timescale-sink: {e}", file=sys.stderr)
        return EXIT_FATAL
    return EXIT_OK


def run_epilog() -> str:
    """`run --help`: every setting with its default (from Settings, so it cannot drift) and the exit codes."""
    from sink.watchdog import EXIT_STUCK

    lines = ["environment (what each means: README.md, Configuration):"]
    for name, f in Settings.model_fields.items():
        default = f.get_default(call_default_factory=True)
        shown = ("(secret)" if name.endswith("password") else str(default).lower() if isinstance(default, bool)
                 else "(empty)" if default == "" else default)
        lines.append(f"  {name.upper()}={shown}")
    lines += ["", "exit codes:",
              f"  {EXIT_OK}   clean stop (SIGTERM/SIGINT: the current batch is finished and committed)",
              f"  {EXIT_FATAL}   fatal error: the message says what to fix (auth, missing table, DLQ breaker...)",
              f"  {EXIT_CONFIG}   invalid configuration: the message names the variable",
              f"  {EXIT_STUCK}  a librdkafka call hung past its deadline; restart the sink (nothing is lost)"]
    return "\n".join(lines)


def tune_gc() -> None:
    """Keep the cyclic garbage collector off the hot path.  The batches in flight keep thousands
    of objects alive across young collections, so they reach the old generation and trigger full
    collections, each of which also walked every object of the startup (modules, pydantic's
    schemas).  Measured over a 200,000-record drain: 1,150 young, 105 middle and 9 full
    collections, 0.5 s of the GIL; with this, 4 collections and 32 ms.  So: freeze the startup
    objects (they live as long as the process) and collect the young generation per 10,000
    allocations instead of 700.  Rows are freed by reference counting either way; the collector
    is only for reference cycles, and it still runs."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


def run(settings: Settings) -> int:
    """Start everything, run the pipeline until SIGTERM/SIGINT, stop cleanly."""
    from sink.breaker import DlqBreaker, DlqBreakerPolicy
    from sink.committer import open_committer
    from sink.health import HealthState, serve
    from sink.metrics import Metrics
    from sink.pipeline import Pipeline, PipelineConfig
    from sink.source import KafkaSource
    from sink.topics import ensure_dlq_topic
    from sink.writer import PgWriter

    log.info("sink_starting", version=__version__, settings=settings.safe_summary())
    stopping = {"now": False}
    pipeline: Pipeline | None = None

    def on_signal(signum: int, _frame: Any) -> None:
        stopping["now"] = True
        if pipeline is not None:
            pipeline.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    metrics, health = Metrics(), HealthState()
    health.turn()
    if settings.metrics_port:
        try:
            serve(settings.metrics_host, settings.metrics_port, health, metrics)
        except OSError as e:  # the port is taken or privileged, or the host does not resolve
            raise FatalError(f"cannot serve metrics on METRICS_HOST={settings.metrics_host}:"
                             f"METRICS_PORT={settings.metrics_port}: {e}") from e
        log.info("metrics_listening", port=settings.metrics_port)

    def stop_requested() -> bool:
        health.turn()
        return stopping["now"]

    if settings.run_migrations:
        _migrate(settings, stop_requested, health, metrics)
    # One connection per batch written at the same time (sink/write_stage.py).
    writer, *more_writers = [PgWriter.from_settings(settings) for _ in range(settings.write_concurrency)]
    for w in (writer, *more_writers):
        _startup_retry("db_connect", w.connect, stop_requested, settings, metrics)
    if stopping["now"]:
        return EXIT_OK
    health.db_ok = True
    dlq_max_bytes = _startup_retry("dlq_topic", lambda: ensure_dlq_topic(settings), stop_requested, settings,
                                   metrics)
    if dlq_max_bytes is None:  # stop requested
        return EXIT_OK

    source = KafkaSource(settings)
    committer = open_committer(settings, source, settings.dlq_topic, settings.kafka_transactional, dlq_max_bytes)
    _startup_retry("init_transactions", committer.prepare, stop_requested, settings, metrics)
    breaker = DlqBreaker(DlqBreakerPolicy(enabled=settings.dlq_breaker_enabled, ratio=settings.dlq_breaker_ratio,
                                          window=settings.dlq_breaker_window,
                                          consecutive=settings.dlq_breaker_consecutive))
    pipeline = Pipeline(PipelineConfig.from_settings(settings), source, writer, committer, breaker=breaker,
                        metrics=metrics, health=health, more_writers=more_writers)
    # The writer thread needs the GIL for a moment after each database round trip; with the
    # default 5 ms switch interval it waits that long behind the decoding loop every time.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    tune_gc()
    if stopping["now"]:
        pipeline.request_stop()
    try:
        pipeline.run()
    except FatalError as e:
        health.fatal = str(e)
        raise
    finally:
        source.close()
        committer.close()
        for w in (writer, *more_writers):
            w.close()
    log.info("sink_stopped")
    return EXIT_OK


def _migrate(settings: Settings, stop_requested: Callable[[], bool], health: HealthState | None,
             metrics: Metrics | None = None) -> None:
    from sink.migrations import MigrationError, migrate

    def attempt() -> None:
        try:
            migrate(settings)
        except ConfigError:
            raise  # a TIMESCALE_* value the database refuses: exit 2, like any bad setting
        except MigrationError as e:
            raise FatalError(f"migrations failed: {e}") from e
        except SinkError:
            raise
        except Exception as e:  # psycopg errors: classify (connection trouble is retryable)
            import psycopg

            if isinstance(e, psycopg.Error):
                raise classify_db_error(e, "migrate") from e
            raise

    if health is not None:
        health.migrating = True  # /healthz stays 200 through a long migration statement
    try:
        _startup_retry("migrate", attempt, stop_requested, settings, metrics)
    finally:
        if health is not None:
            health.migrating = False
            health.turn()


def _startup_retry(cause: str, fn: Callable[[], T], stop_requested: Callable[[], bool],
                   settings: Settings, metrics: Metrics | None = None) -> T | None:
    """Retry a startup step while the database/broker is unreachable (RETRY_* settings, as the
    loop's retries; counted in sink_retries_total, which /metrics serves from the start); stop
    on SIGTERM."""

    def sleep(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not stop_requested():
            time.sleep(min(0.2, end - time.monotonic()))

    def before_sleep(state: RetryCallState) -> None:
        if metrics is not None:
            metrics.retries.labels(cause=cause).inc()
        log.warning("retrying", **retry_log_fields(cause, state))

    policy = RetryPolicy.from_settings(settings)
    try:
        for attempt in retrying(policy, sleep=sleep, before_sleep=before_sleep):
            if stop_requested():
                return None
            with attempt:
                try:
                    return fn()
                except SinkError:
                    raise
                except Exception as e:
                    from confluent_kafka import KafkaException

                    if isinstance(e, KafkaException):
                        raise classify_kafka_error(e, cause) from e
                    raise
    except RetryableError as e:  # RETRY_MAX_ATTEMPTS used up
        raise FatalError(f"{cause} failed after {policy.attempts} attempts: {e}") from e
    return None


if __name__ == "__main__":
    sys.exit(main())
