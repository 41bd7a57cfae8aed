"""Log search (``kafka-timescale-sink logs search``): filter JSON log lines and trace one record's fate.

Streams line by line, so memory stays constant on a multi-GB file; garbage lines are counted,
never fatal.  Exit status: 0 something matched, 1 nothing matched, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import re
import sys
import textwrap
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO, TypeVar, cast

from sink.logs import EVENTS

PROG = "kafka-timescale-sink logs search"
# A longer line is garbage.  The cap keeps memory constant even on a file without newlines.
MAX_LINE_BYTES = 1 << 20
LEVELS: dict[str, int] = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_LEVEL_ALIASES = {"warn": "warning", "exception": "error", "fatal": "critical"}
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_GZIP_MAGIC = b"\x1f\x8b"
# `docker compose logs` prefixes each line with `<service>-1  | `; a bounded name keeps the match cheap.
_COMPOSE_PREFIX = re.compile(rb"[\w.-]{1,128}\s*\|\s(?=\{)")
# A record is re-read a handful of times, not thousands: beyond this the verdict just counts.
_FATE_CAP = 20
_HEAD = ("timestamp", "level", "event")
_NOT_INSERTED = " (its batch; this record itself went to the DLQ)"

TimeSpec = datetime | timedelta
T = TypeVar("T")
Json = dict[str, Any]


@dataclass(frozen=True)
class RecordRef:
    """One Kafka record, as given to ``--record TOPIC:PARTITION:OFFSET``."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"


@dataclass(frozen=True)
class Query:
    """All filters of one search; they are AND-ed."""

    min_level: int | None = None
    events: frozenset[str] = frozenset()
    since: datetime | None = None
    until: datetime | None = None
    where: tuple[tuple[str, str], ...] = ()
    record: RecordRef | None = None


@dataclass
class Stats:
    matched: int = 0
    garbage: int = 0


# --- argument parsing -------------------------------------------------------------------------


def parse_record(text: str) -> RecordRef:
    # Kafka topic names cannot contain ':', so the last two fields are partition and offset.
    parts = text.rsplit(":", 2)
    try:
        topic, partition, offset = parts[0], int(parts[1]), int(parts[2])
    except (IndexError, ValueError):
        raise argparse.ArgumentTypeError(f"expected TOPIC:PARTITION:OFFSET, got {text!r}") from None
    if not topic or partition < 0 or offset < 0:
        raise argparse.ArgumentTypeError(f"expected TOPIC:PARTITION:OFFSET with a topic and numbers >= 0, got {text!r}")
    return RecordRef(topic, partition, offset)


def parse_time(text: str) -> TimeSpec:
    """``90s``/``15m``/``1h``/``2d``/``1w`` back from now, or an ISO 8601 time (naive means UTC)."""
    value = text.strip()
    try:
        if m := _RELATIVE.match(value):
            return timedelta(seconds=float(m[1]) * _UNIT_SECONDS[m[2]])
        t = datetime.fromisoformat(value)
    except OverflowError:  # 99999999999999d: more days than a timedelta holds
        raise argparse.ArgumentTypeError(f"out of range (years 1 to 9999 only), got {text!r}") from None
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a relative time like 90s, 15m, 1h, 2d or an ISO 8601 time, got {text!r}"
        ) from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def parse_where(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def parse_level(text: str) -> str:
    name = _LEVEL_ALIASES.get(text.lower(), text.lower())
    if name not in LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LEVELS)}, got {text!r}")
    return name


def resolve_time(spec: TimeSpec | None, now: datetime, option: str = "--since") -> datetime | None:
    """The absolute time; raises ValueError when ``now - spec`` falls before year 1 (1000000d)."""
    if not isinstance(spec, timedelta):
        return spec
    try:
        return now - spec
    except OverflowError:
        raise ValueError(f"argument {option}: out of range (years 1 to 9999 only), got {spec.days}d ago") from None


def build_query(args: argparse.Namespace, now: datetime) -> Query:
    """The parsed arguments as a Query; raises ValueError for combinations argparse cannot check."""
    since, until = resolve_time(args.since, now, "--since"), resolve_time(args.until, now, "--until")
    if since is not None and until is not None and since > until:
        raise ValueError(f"--since ({since.isoformat()}) is after --until ({until.isoformat()})")
    return Query(
        min_level=LEVELS[args.level] if args.level else None,
        events=frozenset(args.event),
        since=since,
        until=until,
        where=tuple(args.where),
        record=args.record,
    )


# --- matching ---------------------------------------------------------------------------------


def matches(obj: Json, q: Query) -> bool:
    """Every filter except ``--record`` (search() applies that one, as the verdict sees every line)."""
    return (
        _level_ok(obj, q.min_level)
        and _event_ok(obj, q.events)
        and _time_ok(obj, q.since, q.until)
        and all(field_equals(obj, key, want) for key, want in q.where)
    )


def _event_ok(obj: Json, events: frozenset[str]) -> bool:
    # ECS-style logs carry an object in "event": unhashable, and never a match.
    event = obj.get("event")
    return not events or (isinstance(event, str) and event in events)


def _level_ok(obj: Json, min_level: int | None) -> bool:
    if min_level is None:
        return True
    level = obj.get("level")
    if not isinstance(level, str):
        return False
    rank = LEVELS.get(_LEVEL_ALIASES.get(level.lower(), level.lower()))
    return rank is not None and rank >= min_level


def line_time(obj: Json) -> datetime | None:
    ts = obj.get("timestamp")
    if not isinstance(ts, str):
        return None
    try:
        t = datetime.fromisoformat(ts)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _time_ok(obj: Json, since: datetime | None, until: datetime | None) -> bool:
    if since is None and until is None:
        return True
    t = line_time(obj)  # a line without a readable time cannot be shown to be in range
    return t is not None and (since is None or t >= since) and (until is None or t <= until)


def field_equals(obj: Json, key: str, want: str) -> bool:
    found, value = _lookup(obj, key)
    return found and _equal(value, want)


def _lookup(obj: Json, key: str) -> tuple[bool, Any]:
    if key in obj:
        return True, obj[key]
    current: Any = obj
    for part in key.split("."):  # dotted keys: offsets.3, offsets.3.0
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and (index := _decimal(part)) is not None and index < len(current):
            current = current[index]
        else:
            return False, None
    return True, current


def _equal(value: Any, want: str) -> bool:
    if isinstance(value, str):
        return value == want
    if isinstance(value, bool):  # before int: True == 1 in Python
        return want.strip().lower() == ("true" if value else "false")
    if value is None:
        return want.strip().lower() in ("null", "none")
    if isinstance(value, int | float):
        number = _as_number(want)
        return number is not None and value == number
    try:
        return bool(json.loads(want) == value)
    except (ValueError, RecursionError):
        return False


def _as_number(text: str) -> int | float | None:
    for convert in (int, float):
        try:
            return convert(text.strip())
        except ValueError:
            pass
    return None


def _decimal(text: str) -> int | None:
    # isdigit() lets "²" through to int(); isdecimal() does not, and int() still refuses over 4300 digits.
    if not text.isdecimal():
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _as_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return _decimal(value) if isinstance(value, str) else None


def _partition_range(offsets: Any, partition: int) -> tuple[int, int] | None:
    """``offsets = {"<partition>": [first, last]}`` -> (first, last) of one partition."""
    entry = offsets.get(str(partition)) if isinstance(offsets, dict) else None
    if not isinstance(entry, list) or len(entry) != 2:
        return None
    first, last = _as_int(entry[0]), _as_int(entry[1])
    return (first, last) if first is not None and last is not None else None


def _in_range(first: Any, last: Any, offset: int) -> bool:
    lo, hi = _as_int(first), _as_int(last)
    return lo is not None and hi is not None and lo <= offset <= hi


def covers(obj: Json, ref: RecordRef) -> bool:
    """Does this line speak about the record: its offset, its first..last range or its offsets entry?"""
    if obj.get("topic") != ref.topic:
        return False
    if _as_int(obj.get("partition")) == ref.partition and (
        _as_int(obj.get("offset")) == ref.offset
        or _in_range(obj.get("first_offset"), obj.get("last_offset"), ref.offset)
    ):
        return True
    rng = _partition_range(obj.get("offsets"), ref.partition)
    return rng is not None and rng[0] <= ref.offset <= rng[1]


def _listed(offsets: Any, ref: RecordRef) -> bool:
    """Is the record in ``duplicate_offsets = {"<partition>": [offset, ...]}``?"""
    entry = offsets.get(str(ref.partition)) if isinstance(offsets, dict) else None
    return isinstance(entry, list) and any(_as_int(o) == ref.offset for o in entry)


# --- the verdict ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fate:
    kind: str  # "DLQ'd", "inserted", "duplicate", "written", "discarded", "committed"
    when: str
    detail: str


class Verdict:
    """What the log says happened to one record; keeps a few small facts, never the lines."""

    def __init__(self, ref: RecordRef) -> None:
        self.ref = ref
        self.covered = 0
        self.rejections: list[Fate] = []
        self.writes: list[tuple[Fate, bool]] = []  # (fate, explicitly listed as a duplicate)
        self.discards: list[Fate] = []
        self.dropped = 0
        self.commit: Fate | None = None
        self._commit_covers = False

    def observe(self, obj: Json, covering: bool) -> None:
        event = obj.get("event")
        if event == "batch_committed" and obj.get("topic") == self.ref.topic:
            self._observe_commit(obj, covering)
        if not covering:
            return
        self.covered += 1
        when = str(obj.get("timestamp", "?"))
        if event == "record_rejected":
            detail = " ".join(f"{k}={format_value(obj.get(k))}" for k in ("stage", "error_class", "reason"))
            self._keep(self.rejections, Fate("DLQ'd", when, detail))
        elif event == "batch_written":
            self._keep(self.writes, self._write_fate(obj, when))
        elif event == "batch_discarded":
            self._keep(self.discards, Fate("discarded", when, "partitions revoked before writing; re-read later"))

    def _keep(self, facts: list[T], fact: T) -> None:
        if len(facts) < _FATE_CAP:
            facts.append(fact)
        else:
            self.dropped += 1

    def _write_fate(self, obj: Json, when: str) -> tuple[Fate, bool]:
        batch = f"batch_id={format_value(obj.get('batch_id'))}"
        if _listed(obj.get("duplicate_offsets"), self.ref):
            return Fate("duplicate", when, f"{batch} (already present in the table)"), True
        duplicates = _as_int(obj.get("duplicates")) or 0
        if duplicates and not isinstance(obj.get("duplicate_offsets"), dict):
            note = f"{batch} (inserted or duplicate: {duplicates} duplicates, no duplicate_offsets on the line)"
            return Fate("written", when, note), False
        return Fate("inserted", when, batch), False

    def _observe_commit(self, obj: Json, covering: bool) -> None:
        # Kafka commits are cumulative: a later batch committed past the offset commits it too.
        rng = _partition_range(obj.get("offsets"), self.ref.partition)
        if rng is None or rng[1] < self.ref.offset:
            return
        when = str(obj.get("timestamp", "?"))
        better = self.commit is None or (covering and not self._commit_covers) or (
            covering == self._commit_covers and when < self.commit.when
        )
        if better:
            detail = f"batch_id={format_value(obj.get('batch_id'))}"
            if not covering:
                detail += f" committed partition {self.ref.partition} up to offset {rng[1]} (past this record)"
            self.commit, self._commit_covers = Fate("committed", when, detail), covering

    def fates(self) -> list[Fate]:
        """Chronological; a write that covered a DLQ'd record did not insert it."""
        writes = [
            fate if listed or not self.rejections else Fate("written", fate.when, f"{fate.detail}{_NOT_INSERTED}")
            for fate, listed in self.writes
        ]
        return sorted([*self.rejections, *writes, *self.discards], key=lambda f: f.when)

    def render(self) -> str:
        lines = [f"--- verdict for {self.ref}"]
        if not self.covered:
            lines.append("no line covers this record")
        lines += [f"{f.kind:<10} {f.when}  {f.detail}" for f in self.fates()]
        if self.dropped:
            lines.append(f"... and {self.dropped} more lines about this record")
        if self.commit is not None:
            lines.append(f"{self.commit.kind:<10} {self.commit.when}  {self.commit.detail}")
        elif self.covered:
            lines.append("not committed: no batch_committed line covers this record")
        return "\n".join(lines) + "\n"


# --- output -----------------------------------------------------------------------------------


def format_value(value: Any) -> str:
    """One token, never a newline or a terminal escape: plain words raw, everything else as JSON."""
    if isinstance(value, str) and value and value.isprintable() and not any(c in value for c in ' "='):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def format_line(obj: Json) -> str:
    head = [format_value(obj.get(k, "-")) for k in _HEAD]
    # The logger goes last: it says who, the other fields say what.
    context = [f"{k}={format_value(v)}" for k, v in obj.items() if k not in _HEAD and k != "logger"]
    if "logger" in obj:
        context.append(f"logger={format_value(obj['logger'])}")
    return " ".join([head[0], f"{head[1].upper():<8}", head[2], *context])


# --- input ------------------------------------------------------------------------------------


def _lines(stream: BinaryIO, name: str) -> Iterator[bytes | None]:
    """Each line of the stream; None for a line over MAX_LINE_BYTES (garbage, never buffered whole)."""
    try:
        while line := stream.readline(MAX_LINE_BYTES):
            if len(line) == MAX_LINE_BYTES and not line.endswith(b"\n"):
                while (rest := stream.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    pass
                yield None
            else:
                yield line
    except (EOFError, OSError, zlib.error) as e:
        # A truncated .gz (still being written, or cut by rotation) ends that file, not the search.
        print(f"{PROG}: stopped reading {name}: {e}", file=sys.stderr)


def _gunzipped(stream: BinaryIO) -> BinaryIO:
    """Sniff the gzip magic, so `.gz` files and gzipped stdin both work."""
    peek = getattr(stream, "peek", None)
    if peek is None:
        stream = cast(BinaryIO, io.BufferedReader(cast(Any, stream)))
        peek = cast(Any, stream).peek
    if peek(2)[:2] == _GZIP_MAGIC:
        return cast(BinaryIO, gzip.GzipFile(fileobj=stream, mode="rb"))
    return stream


def open_inputs(files: Sequence[str]) -> Iterator[tuple[str, BinaryIO]]:
    """The inputs one at a time, opened lazily; ``-`` or no file at all is stdin."""
    for name in files or ["-"]:
        if name == "-":
            yield "<stdin>", _gunzipped(sys.stdin.buffer)
            continue
        with open(name, "rb") as f:
            yield name, _gunzipped(cast(BinaryIO, f))


def _parse(raw: bytes) -> Json | None:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return obj if isinstance(obj, dict) else None


def _parse_line(raw: bytes) -> tuple[bytes, Json] | None:
    """The line's JSON text and object; a `docker compose logs` prefix is dropped (so --json feeds jq)."""
    obj = _parse(raw)
    if obj is None and (m := _COMPOSE_PREFIX.match(raw)):
        raw = raw[m.end():]
        obj = _parse(raw)
    return None if obj is None else (raw, obj)


# --- the search -------------------------------------------------------------------------------


def search(
    inputs: Iterable[tuple[str, BinaryIO]], q: Query, out: BinaryIO, *, as_json: bool, flush_each: bool = False
) -> Stats:
    """Write matching lines to ``out`` (readable, or raw with ``as_json``) and, for ``--record``, a verdict."""
    stats = Stats()
    verdict = Verdict(q.record) if q.record is not None else None
    for name, stream in inputs:
        for raw in _lines(stream, name):
            parsed = _parse_line(raw) if raw is not None else None
            if raw is None or parsed is None:
                # Blank lines are not garbage, just spacing (e.g. a trailing newline pair).
                stats.garbage += raw is None or bool(raw.strip())
                continue
            text, obj = parsed
            covering = q.record is None or covers(obj, q.record)
            if verdict is not None:
                # Before the other filters: --level warning must not hide the info-level batch_committed.
                verdict.observe(obj, covering)
            if covering and matches(obj, q):
                stats.matched += 1
                _emit(out, text if as_json else format_line(obj).encode(), flush_each)
    if verdict is not None and not as_json:
        out.write(verdict.render().encode())
    return stats


def _emit(out: BinaryIO, line: bytes, flush: bool) -> None:
    out.write(line if line.endswith(b"\n") else line + b"\n")  # --json: unchanged, newline-terminated
    if flush:
        out.flush()


# --- command line -----------------------------------------------------------------------------


def _epilog() -> str:
    width = max(map(len, EVENTS)) + 4
    events = [
        textwrap.fill(desc, 110, initial_indent=f"  {name:<{width}}", subsequent_indent=" " * (width + 2))
        for name, desc in EVENTS.items()
    ]
    return "\n".join(
        [
            "events (sink.logs.EVENTS):",
            *events,
            "",
            "examples:",
            f"  {PROG} sink.log --record decoded_iot_data:3:12345      where did this record go?",
            f"  {PROG} sink.log.1.gz sink.log --event retrying --since 15m      why is lag growing?",
            f"  tail -f sink.log | {PROG} --level warning",
            "",
            "exit status: 0 something matched, 1 nothing matched, 2 bad arguments",
        ]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the search options to ``parser`` (the service CLI's ``logs search`` or a standalone one)."""
    parser.description = parser.description or "Search the sink's JSON log lines; all filters are AND-ed."
    parser.epilog = _epilog()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the event table's layout
    parser.add_argument("files", nargs="*", metavar="FILE", help="JSON log files, plain or .gz; none or - reads stdin")
    parser.add_argument("--level", type=parse_level, help="minimum level: debug, info, warning, error, critical")
    parser.add_argument("--event", action="append", default=[], metavar="NAME", help="event name (repeatable)")
    parser.add_argument("--since", type=parse_time, metavar="TIME", help="90s, 15m, 1h, 2d ago, or ISO 8601 (UTC)")
    parser.add_argument("--until", type=parse_time, metavar="TIME", help="like --since")
    parser.add_argument(
        "--where", action="append", default=[], type=parse_where, metavar="KEY=VALUE",
        help="field equality (repeatable); numbers compare numerically; dotted keys reach inside: offsets.3",
    )
    parser.add_argument(
        "--record", type=parse_record, metavar="TOPIC:PARTITION:OFFSET",
        help="lines whose offset or offset range covers this record, then its verdict",
    )
    parser.add_argument(
        "--json", action="store_true", help="pass matching lines through unchanged (no --record verdict)"
    )


def _check_files(files: Sequence[str]) -> str | None:
    for name in files:
        if name != "-" and not (os.path.isfile(name) and os.access(name, os.R_OK)):
            return f"cannot read {name!r}: not a readable file"
    return None


def run(args: argparse.Namespace) -> int:
    """Run a parsed search; see the module docstring for the exit status."""
    try:
        query = build_query(args, now=datetime.now(UTC))
    except ValueError as e:
        return _usage_error(str(e))
    if problem := _check_files(args.files):
        return _usage_error(problem)
    for name in sorted(query.events - EVENTS.keys()):
        # Not fatal: an old log file may hold events that were renamed since.
        print(f"{PROG}: warning: event {name!r} is not in sink.logs.EVENTS; searching anyway", file=sys.stderr)
    out = sys.stdout.buffer
    # Follow mode (tail -f | search) and terminals want each match now, not when the buffer fills.
    flush_each = not args.files or "-" in args.files or out.isatty()
    try:
        stats = search(open_inputs(args.files), query, out, as_json=args.json, flush_each=flush_each)
        out.flush()
    except BrokenPipeError:
        # `search ... | head` closed the pipe: not an error; keep Python from complaining at exit.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    if stats.garbage:
        print(f"{PROG}: skipped {stats.garbage} garbage line(s) (not a JSON object)", file=sys.stderr)
    return 0 if stats.matched else 1


def _usage_error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG)
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help exits 0, bad arguments 2 (argparse has printed why)
        return e.code if isinstance(e.code, int) else 2
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
