"""`sink-dlq`: inspect and replay the sink's dead letter queue (configured by the sink's env vars).

Results go to stdout (a table, or JSON with --json); log lines go to stderr.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO, cast

from dlq.filters import STAGES, ReplayFilter, build_filter
from dlq.replay import OnFailure, ReplayOptions
from sink import __version__
from sink.errors import FatalError, RetryableError
from sink.logs import configure_logging, format_from_env, get_logger
from sink.settings import ConfigError, Settings, load_settings

log = get_logger("dlq.cli")

EXIT_OK, EXIT_FATAL, EXIT_USAGE = 0, 1, 2

EPILOG = """\
environment: the sink's own variables (KAFKA_BOOTSTRAP_SERVERS, KAFKA_INPUT_TOPIC, KAFKA_DLQ_TOPIC,
KAFKA_GROUP_ID, KAFKA_EXTRA_CONFIG, KAFKA_TRANSACTIONAL, TIMESCALE_*, RETRY_*, BISECT_MAX_SPLITS,
LOG_FORMAT, LOG_LEVEL); a replay gives up after RETRY_MAX_ATTEMPTS attempts (8 when it is 0).
exit codes: 0 done, 1 fatal error or Kafka/PostgreSQL unavailable, 2 bad usage or configuration,
3 replay stopped on a failure (--on-failure stop), 130 interrupted.  See docs/dlq.md.
"""

REPLAY_EPILOG = """\
Each batch: rows committed in PostgreSQL (or records re-published) first, then one Kafka
transaction holds the records written back to the DLQ and the replay group's DLQ offsets.
A killed replay resumes where it stopped; replaying twice inserts nothing new.

A filtered replay (--error-class, --stage, --partition, --offset-range, --since, --until)
uses its own group, <group>.f-<hash of the filter>: it commits past the records it skips,
which therefore stay available to the default group and to any other filter.

examples:
  sink-dlq replay --dry-run
  sink-dlq replay --error-class CheckViolation
  sink-dlq replay --to-topic decoded_iot_data --stage write
  sink-dlq replay --on-failure stop --max 100
"""


def _add_filters(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters (on the failure headers; all given ones must match)")
    g.add_argument("--error-class", action="append", default=[], metavar="NAME",
                   help="error class, e.g. CheckViolation, InvalidJson (repeat for several)")
    g.add_argument("--stage", action="append", default=[], choices=STAGES, help="failure stage (repeatable)")
    g.add_argument("--partition", action="append", default=[], type=int, metavar="N",
                   help="original (input topic) partition (repeatable)")
    g.add_argument("--offset-range", metavar="A:B", help="original offsets, inclusive; A: or :B leave an end open")
    g.add_argument("--since", metavar="TIME", help="failed at or after TIME (ISO 8601; UTC if no offset)")
    g.add_argument("--until", metavar="TIME", help="failed before TIME (ISO 8601; UTC if no offset)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sink-dlq", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=__version__)
    sub = ap.add_subparsers(dest="command", required=True)

    insp = sub.add_parser("inspect", aliases=["stats"], formatter_class=argparse.RawDescriptionHelpFormatter,
                          help="summarise the DLQ: counts by error class, stage, origin, attempt; examples",
                          description="Reads the DLQ from its start to its end as of now, with assigned "
                                      "partitions: no consumer group, nothing committed.")
    insp.add_argument("--dlq-topic", metavar="TOPIC", help="the DLQ topic (default: KAFKA_DLQ_TOPIC or <input>.dlq)")
    insp.add_argument("--json", action="store_true", help="print the summary as JSON (for scripts)")
    insp.add_argument("--examples", type=int, default=5, metavar="N", help="example records to show (default 5)")
    insp.add_argument("--value-bytes", type=int, default=120, metavar="N",
                      help="bytes of each key/value/header to show (default 120)")
    _add_filters(insp)

    rep = sub.add_parser("replay", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=REPLAY_EPILOG,
                         help="re-process DLQ records through the current validation and writer",
                         description="Reads the DLQ from the replay group's committed offsets up to the end "
                                     "offsets as of the start, then stops.")
    rep.add_argument("--dlq-topic", metavar="TOPIC", help="the DLQ topic (default: KAFKA_DLQ_TOPIC or <input>.dlq)")
    rep.add_argument("--group", metavar="GROUP",
                     help="consumer group of the replay (default: <KAFKA_GROUP_ID>.dlq-replay; a filter adds a suffix)")
    rep.add_argument("--dry-run", action="store_true",
                     help="validate and report only: write nothing, produce nothing, commit nothing")
    rep.add_argument("--to-topic", metavar="TOPIC",
                     help="re-publish valid records (original key, value, headers) to TOPIC instead of writing them")
    rep.add_argument("--on-failure", choices=[m.value for m in OnFailure], default=OnFailure.DLQ.value,
                     help="records that fail again: dlq = back to the DLQ with attempt+1 (default), "
                          "skip = leave out, stop = end the run at the first one (it stays uncommitted)")
    rep.add_argument("--max", type=int, metavar="N", help="replay at most N selected records in this run")
    rep.add_argument("--batch-size", type=int, default=500, metavar="N", help="records per transaction (default 500)")
    rep.add_argument("--json", action="store_true", help="print the final summary as JSON")
    _add_filters(rep)
    return ap


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # --help / usage errors: return the code instead of raising it
        return int(e.code or 0)
    try:
        settings = load_settings()
    except ConfigError as e:
        configure_logging(format_from_env(), stream=_STDERR)
        log.error("config_invalid", reason=str(e))
        print(f"sink-dlq: {e}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_format, settings.log_level, stream=_STDERR)
    try:
        flt = build_filter(error_classes=args.error_class, stages=args.stage, partitions=args.partition,
                           offset_range=args.offset_range, since=args.since, until=args.until)
        if args.command in ("inspect", "stats"):
            return _inspect(settings, args, flt)
        return _replay(settings, args, flt)
    except ValueError as e:
        print(f"sink-dlq {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except FatalError as e:
        log.critical("fatal_error", reason=str(e))
        print(f"sink-dlq: {e}", file=sys.stderr)
        return EXIT_FATAL
    except RetryableError as e:
        # Kafka unreachable or stalled where nothing retries it (inspect does not: the operator
        # is better served by a prompt answer).  Exit 1 like a replay whose retries ran out.
        log.critical("fatal_error", reason=str(e), retryable=True)
        print(f"sink-dlq {args.command}: unavailable, try again later: {e}", file=sys.stderr)
        return EXIT_FATAL


def _inspect(settings: Settings, args: argparse.Namespace, flt: ReplayFilter) -> int:
    from dlq.inspect import DlqStats, inspect_topic

    if args.examples < 0 or args.value_bytes < 1:
        raise ValueError("--examples must be >= 0 and --value-bytes >= 1")
    stats = DlqStats(examples=args.examples, value_bytes=args.value_bytes, flt=flt)
    summary = inspect_topic(settings, args.dlq_topic or settings.dlq_topic, stats)
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        from dlq.render import inspect_view, show

        show(inspect_view(summary))
    return EXIT_OK


def _replay(settings: Settings, args: argparse.Namespace, flt: ReplayFilter) -> int:
    from dlq.render import replay_view, show
    from dlq.runner import replay_group, run_replay
    from sink.retry import RetryPolicy
    from sink.upsert import WriteMode

    opts = ReplayOptions(
        dlq_topic=args.dlq_topic or settings.dlq_topic, filter=flt, on_failure=OnFailure(args.on_failure),
        dry_run=args.dry_run, to_topic=args.to_topic, max_records=args.max, batch_size=args.batch_size,
        max_splits=settings.bisect_max_splits, write_mode=WriteMode.from_settings(settings),
        retry=RetryPolicy(attempts=settings.retry_max_attempts or RetryPolicy.attempts,
                          initial_backoff=settings.retry_initial_backoff,
                          max_backoff=max(settings.retry_max_backoff, settings.retry_initial_backoff)),
    )
    group = replay_group(args.group, settings, opts)
    with _stop_on_signals() as stop_requested:
        code, summary = run_replay(settings, opts, group, tty=sys.stderr.isatty(), stop_requested=stop_requested)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        if summary["counts"] is not None:
            show(replay_view(summary))
        if summary["error"]:
            print(f"sink-dlq replay: {summary['error']}", file=sys.stderr)
    return code


@contextmanager
def _stop_on_signals() -> Iterator[Any]:
    """SIGINT/SIGTERM: finish the batch in flight, commit it, stop.  A second one interrupts at once."""
    state = {"stop": False}

    def handler(signum: int, _frame: Any) -> None:
        if state["stop"]:
            raise KeyboardInterrupt
        state["stop"] = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: state["stop"]
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class _CurrentStderr:
    """Writes to whatever sys.stderr is at the time: rich's progress bar swaps it while it runs
    so that log lines print above the bar instead of through it."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


# cast: configure_logging only calls write/flush/isatty on its stream.
_STDERR = cast(TextIO, _CurrentStderr())


if __name__ == "__main__":
    sys.exit(main())
