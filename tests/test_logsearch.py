"""The log search command, over small log files written in tmp_path (no broker, no database)."""

from __future__ import annotations

import gzip
import io
import json
import sys
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sink import logsearch

TOPIC = "decoded_iot_data"
Result = tuple[int, str, str]


def line(event: str, *, ts: str = "2026-11-28T06:01:02.123456Z", level: str = "info", **fields: Any) -> str:
    return json.dumps({"timestamp": ts, "level": level, "event": event, "logger": "sink.loop", **fields})


def write_log(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{x}\n" for x in lines), encoding="utf-8")
    return path


def search(capsysbinary: pytest.CaptureFixture[bytes], *argv: str) -> Result:
    rc = logsearch.main(list(argv))
    out, err = capsysbinary.readouterr()
    return rc, out.decode(), err.decode()


def events_of(out: str) -> list[str]:
    """The event column of the readable lines (verdict lines excluded)."""
    return [x.split()[2] for x in out.splitlines() if x[:4].isdigit()]


# A small story of partition 3: 12345 inserted, 12346 DLQ'd, 12347 a duplicate, all committed;
# 12400 written in a batch that never got committed.
STORY = [
    line("sink_starting", ts="2026-11-28T06:00:00.000000Z"),
    line("record_rejected", ts="2026-11-28T06:01:00.000000Z", level="warning", topic=TOPIC, partition=3,
         offset=12346, stage="validate", error_class="ValidationError", reason="temperature: not a number"),
    line("batch_written", topic=TOPIC, offsets={"3": [12340, 12349], "1": [5, 9]}, rows=14, inserted=12,
         duplicates=1, dlq=1, batch_id=17, latency_ms=12.5, duplicate_offsets={"3": [12347]}),
    line("batch_committed", ts="2026-11-28T06:01:02.200000Z", topic=TOPIC,
         offsets={"3": [12340, 12349], "1": [5, 9]}, batch_id=17),
    line("retrying", ts="2026-11-28T06:02:00.000000Z", level="warning", cause="db_write", attempt=1, delay_s=0.5),
    line("batch_written", ts="2026-11-28T06:03:00.000000Z", topic=TOPIC, offsets={"3": [12400, 12409]},
         rows=10, inserted=10, duplicates=0, dlq=0, batch_id=18, latency_ms=9.0),
    line("fatal_error", ts="2026-11-28T06:04:00.000000Z", level="critical", error_class="FatalError"),
]


@pytest.fixture
def story(tmp_path: Path) -> Path:
    return write_log(tmp_path / "sink.log", STORY)


# --- filters ----------------------------------------------------------------------------------


def test_level_is_a_minimum(capsysbinary: pytest.CaptureFixture[bytes], story: Path) -> None:
    rc, out, _ = search(capsysbinary, str(story), "--level", "warning")
    assert rc == 0
    assert events_of(out) == ["record_rejected", "retrying", "fatal_error"]


def test_event_is_repeatable(capsysbinary: pytest.CaptureFixture[bytes], story: Path) -> None:
    _, out, _ = search(capsysbinary, str(story), "--event", "retrying", "--event", "fatal_error")
    assert events_of(out) == ["retrying", "fatal_error"]


def test_filters_are_anded(capsysbinary: pytest.CaptureFixture[bytes], story: Path) -> None:
    _, out, _ = search(capsysbinary, str(story), "--event", "batch_written", "--where", "batch_id=18")
    assert events_of(out) == ["batch_written"]
    assert "batch_id=18" in out


def test_where_compares_numbers_numerically(capsysbinary: pytest.CaptureFixture[bytes], tmp_path: Path) -> None:
    log = write_log(tmp_path / "s.log", [line("a", partition=3), line("b", partition=13), line("c", partition="3"),
                                         line("d", latency_ms=3.0), line("e")])
    assert events_of(search(capsysbinary, str(log), "--where", "partition=3")[1]) == ["a", "c"]
    assert events_of(search(capsysbinary, str(log), "--where", "latency_ms=3")[1]) == ["d"]


def test_where_on_strings_bools_and_dotted_keys(capsysbinary: pytest.CaptureFixture[bytes], tmp_path: Path) -> None:
    log = write_log(tmp_path / "s.log", [
        line("a", cause="db_write", ok=True, offsets={"3": [10, 20]}),
        line("b", cause="commit", ok=1, offsets={"4": [10, 20]}),
    ])
    assert events_of(search(capsysbinary, str(log), "--where", "cause=db_write")[1]) == ["a"]
    assert events_of(search(capsysbinary, str(log), "--where", "ok=true")[1]) == ["a"]
    assert events_of(search(capsysbinary, str(log), "--where", "offsets.3=[10,20]")[1]) == ["a"]
    assert events_of(search(capsysbinary, str(log), "--where", "offsets.4.1=20")[1]) == ["b"]
    assert search(capsysbinary, str(log), "--where", "missing=1")[0] == 1


def test_since_and_until_relative_to_now(capsysbinary: pytest.CaptureFixture[bytes], tmp_path: Path) -> None:
    now = datetime.now(UTC)

    def stamp(ago: timedelta) -> str:
        return (now - ago).isoformat().replace("+00:00", "Z")  # structlog's format
    log = write_log(tmp_path / "s.log", [line("old", ts=stamp(timedelta(hours=3))),
                                         line("mid", ts=stamp(timedelta(minutes=40))),
                                         line("new", ts=stamp(timedelta(seconds=30)))])
    assert events_of(search(capsysbinary, str(log), "--since", "1h")[1]) == ["mid", "new"]
    assert events_of(search(capsysbinary, str(log), "--since", "90s")[1]) == ["new"]
    assert events_of(search(capsysbinary, str(log), "--until", "15m")[1]) == ["old", "mid"]
    assert events_of(search(capsysbinary, str(log), "--since", "2d", "--until", "1h")[1]) == ["old"]


def test_since_and_until_absolute_naive_means_utc(capsysbinary: pytest.CaptureFixture[bytes], story: Path) -> None:
    _, out, _ = search(capsysbinary, str(story), "--since", "2026-11-28T06:01:30", "--until", "2026-11-28T06:03:00Z")
    assert events_of(out) == ["retrying", "batch_written"]
    # 07:02+01:00 is 06:02 UTC
    _, out, _ = search(capsysbinary, str(story), "--since", "2026-11-28T07:02:00+01:00")
    assert events_of(out) == ["retrying", "batch_written", "fatal_error"]


def test_time_filter_drops_lines_without_a_readable_time(
    capsysbinary: pytest.CaptureFixture[bytes], tmp_path: Path
) -> None:
    log = write_log(tmp_path / "s.log", [line("a", ts="yesterday"), line("b", ts="2026-11-28T06:00:00Z")])
    assert events_of(search(capsysbinary, str(log), "--since", "2026-01-01")[1]) == ["b"]


def test_a_field_of_an_unexpected_type_does_not_match(
    capsysbinary: pytest.CaptureFixture[bytes], tmp_path: Path
) -> None:
    # ECS-format logs carry an object in "event": it must not crash the set lookup.
    ecs = json.dumps({"timestamp": "2026-11-28T06:00:00Z", "level": "info", "event": {"action": "retrying"}})
    log = write_log(tmp_path / "s.log", [ecs, line("retrying")])
    rc, out, _ = search(capsysbinary, str(log), "--event", "retrying")
    assert rc == 0
    assert events_of(out) == ["retrying"]


@pytest.mark.parametrize("value", ["\u00b2", "\u00b2\u00b3", "9" * 5000])
def test_odd_digit_strings_never_crash(
    capsysbinary: pytest.CaptureFixture[bytes], tmp_path: Path, value: str
) -> None:
    # "²".isdigit() is True but int("²") raises; 5000 digits exceed int()'s string limit.
    log = write_log(tmp_path / "s.log", [
        line("a", topic=TOPIC, partition=value, offset=value, offsets={"3": [value, value]}, l=[1, 2]),
        line("b", topic=TOPIC, partition=3, offset=1),
    ])
    assert search(capsysbinary, str(log), "--where", f"l.{value}=1")[0] == 1
    rc, out, _ = search(capsysbinary, str(log), "--record", f"{TOPIC}:3:1")
    assert rc == 0
    assert events_of(out) == ["b"]


# --- --record ---------------------------------------------------------------------------------


def verdict(out: str) -> list[str]:
    return out.split("--- verdict for ", 1)[1].splitlines()[1:]


def test_record_inserted_and_committed(capsysbinary: pytest.CaptureFixture[bytes], story: Path) -> None:
    rc, out, _ = search(capsysbinary, str(story), "--record", f"{TOPIC}:3:12345")
    assert rc == 0
    assert events_of(out) == ["batch_written", "batch_committed"]
    assert verdict(out) == [
        "inserted   2026-11-28T06:01:02.123456Z  batch_id=17",
        "committed  2026-11-28T06:01:02.200000Z  batch_id=17",
    ]


def test_record_duplicate(capsysbinary: pytest.CaptureFixture[bytes], story: Path) -> None:
    _, out, _ = search(capsysbinary, str(story), "--record", f"{TOPIC}:3:12347")
    assert verdict(out)[0].startswith("duplicate  2026-11-28T06:01:02.123456Z  batch_id=17 (already present")


def test_record_dlqd_with_stage_error_class_reason_and_time(
    capsysbinary: pytest.CaptureFixture[bytes], story: Path
) -> None:
    _, out, _ = search(capsysbinary, str(story), "--record", f"{TOPIC}:3:12346")
    assert events_of(out) == ["record_rejected", "batch_written", "batch_committed"]
    dlq, written, committed = verdict(out)
    assert dlq == ("DLQ'd      2026-11-28T06:01:00.000000Z  stage=validate error_class=ValidationError "
                   'reason="temperature: not a number"')
    assert written.startswith("written") and "went to the DLQ" in written  # its batch did not insert it
    assert committed.startswith("committed")


def test_record_dlqd_when_the_rejection_is_logged_after_its_batch(
    capsysbinary: pytest.CaptureFixture[bytes], tmp_path: Path
) -> None:
    log = write_log(tmp_path / "s.log", [
        line("batch_written", ts="2026-11-28T06:00:00Z", topic=TOPIC, offsets={"3": [1, 10]}, duplicates=0,
             dlq=1, batch_id=4),
        line("record_rejected", ts="2026-11-28T06:00:01Z", topic=TOPIC, partition=3, offset=5, stage="write",
             error_class="NumericValueOutOfRange", reason="value out of range"),
    ])
    _, out, _ = search(capsysbinary, str(log), "--record", f"{TOPIC}:3:5")
    assert [x.split()[0] for x in verdict(out)] == ["written", "DLQ'd", "not"]
    assert "stage=write error_class=NumericValueOutOfRange" in out


def test_record_in_an_uncommitted_batch(capsysbinary: pytest.CaptureFixture[bytes], story: Path) -> None:
    _, out, _ = search(capsysbinary, str(story), "--record", f"{TOPIC}:3:12405")
    assert verdict(out) == [
        "inserted   2026-11-28T06:03:00.000000Z  batch_id=18",
        "not committed: no batch_committed line covers this record",
    ]


def test_record_no_line_covers_it(capsysbinary: pytest.CaptureFixture[bytes], story: Path) -> None:
    for ref in (f"{TOPIC}:3:99999", f"{TOPIC}:2:12345", "other_topic:3:12345"):
        rc, out, _ = search(capsysbinary, str(story), "--record", ref)
        assert rc == 1
        assert verdict(out) == ["no line covers this record"]


def test_record_matches_single_partition_ranges_and_later_commits(
    capsysbinary: pytest.CaptureFixture[bytes], tmp_path: Path
) -> None:
    log = write_log(tmp_path / "s.log", [
        line("batch_discarded", ts="2026-11-28T06:00:00Z", topic=TOPIC, partition=0, first_offset=100,
             last_offset=199),
        line("batch_discarded", ts="2026-11-28T06:00:01Z", topic=TOPIC, partition=1, first_offset=100,
             last_offset=199),
        line("batch_committed", ts="2026-11-28T06:09:00Z", topic=TOPIC, offsets={"0": [200, 299]}, batch_id=9),
    ])
    rc, out, _ = search(capsysbinary, str(log), "--record", f"{TOPIC}:0:150")
    assert rc == 0
    assert events_of(out) == ["batch_discarded"]
    discarded, committed = verdict(out)
    assert discarded.startswith("discarded  2026-11-28T06:00:00Z")
    # Kafka commits are cumulative: committing up to 299 commits 150 as well.
    assert committed == ("committed  2026-11-28T06:09:00Z  batch_id=9 committed partition 0 up to offset 299 "
                         "(past this record)")


def test_record_verdict_is_chronological_across_files_in_any_order(
    capsysbinary: pytest.CaptureFixture[bytes], tmp_path: Path
) -> None:
    # Inserted, crash before the commit, re-read after the restart: a duplicate the second time.
    old = write_log(tmp_path / "sink.log.1", [line("batch_written", ts="2026-11-28T05:00:00Z", topic=TOPIC,
                                                   offsets={"3": [1, 10]}, duplicates=0, batch_id=4)])
    new = write_log(tmp_path / "sink.log", [line("batch_written", ts="2026-11-28T06:00:00Z", topic=TOPIC,
                                                 offsets={"3": [1, 10]}, duplicates=10, batch_id=1,
                                                 duplicate_offsets={"3": list(range(1, 11))})])
    _, out, _ = search(capsysbinary, str(new), str(old), "--record", f"{TOPIC}:3:5")
    assert [x.split()[0] for x in verdict(out)] == ["inserted", "duplicate", "not"]


def test_record_verdict_is_honest_when_duplicates_are_not_listed(
    capsysbinary: pytest.CaptureFixture[bytes], tmp_path: Path
) -> None:
    log = write_log(tmp_path / "s.log", [line("batch_written", topic=TOPIC, offsets={"3": [1, 10]}, duplicates=2,
                                              batch_id=4)])
    _, out, _ = search(capsysbinary, str(log), "--record", f"{TOPIC}:3:5")
    assert "inserted or duplicate" in verdict(out)[0]


def test_record_with_json_passes_lines_without_a_verdict(
    capsysbinary: pytest.CaptureFixture[bytes], story: Path
) -> None:
    _, out, _ = search(capsysbinary, str(story), "--json", "--record", f"{TOPIC}:3:12346")
    assert out == "".join(f"{x}\n" for x in STORY[1:4])


@pytest.mark.parametrize("other", [
    ["--level", "warning"],
    ["--event", "record_rejected"],
    ["--until", "2026-11-28T06:01:00Z"],
    ["--where", "stage=validate"],
])
def test_record_verdict_sees_lines_the_other_filters_hide(
    capsysbinary: pytest.CaptureFixture[bytes], story: Path, other: list[str]
) -> None:
    # The printed lines obey every filter; the verdict is about the record, so it reads them all.
    rc, out, _ = search(capsysbinary, str(story), "--record", f"{TOPIC}:3:12346", *other)
    assert rc == 0
    assert events_of(out) == ["record_rejected"]
    assert [x.split()[0] for x in verdict(out)] == ["DLQ'd", "written", "committed"]


def test_record_verdict_when_the_other_filters_hide_every_covering_line(
    capsysbinary: pytest.CaptureFixture[bytes], story: Path
) -> None:
    rc, out, _ = search(capsysbinary, str(story), "--record", f"{TOPIC}:3:12345", "--level", "warning")
    assert rc == 1
    assert events_of(out) == []
    assert verdict(out) == [
        "inserted   2026-11-28T06:01:02.123456Z  batch_id=17",
        "committed  2026-11-28T06:01:02.200000Z  batch_id=17",
    ]


# --- output -----------------------------------------------------------------------------------


def test_readable_output_is_one_line_per_match(capsysbinary: pytest.CaptureFixture[bytes], tmp_path: Path) -> None:
    log = write_log(tmp_path / "s.log", [line("fatal_error", level="error", reason="boom\nTraceback:\n  x",
                                              partition=3, exception="\x1b[31mred")])
    _, out, _ = search(capsysbinary, str(log))
    assert out == ('2026-11-28T06:01:02.123456Z ERROR    fatal_error reason="boom\\nTraceback:\\n  x" partition=3 '
                   'exception="\\u001b[31mred" logger=sink.loop\n')


def test_json_passes_matching_lines_through_byte_for_byte(
    capsysbinary: pytest.CaptureFixture[bytes], tmp_path: Path
) -> None:
    keep = [
        b'{ "event" : "batch_written",  "level":"info", "z": 1, "a": "\xc3\xa9t\xc3\xa9", "f": 1.50 }\n',
        b'{"level":"info","event":"batch_written","timestamp":"2026-11-28T06:01:02Z"}\r\n',
    ]
    drop = b'{"level":"info","event":"retrying"}\n'
    log = tmp_path / "s.log"
    log.write_bytes(keep[0] + drop + keep[1])
    rc = logsearch.main([str(log), "--json", "--event", "batch_written"])
    assert rc == 0
    assert capsysbinary.readouterr().out == keep[0] + keep[1]


# --- inputs -----------------------------------------------------------------------------------


def test_garbage_lines_are_skipped_and_counted(
    capsysbinary: pytest.CaptureFixture[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logsearch, "MAX_LINE_BYTES", 200)
    log = tmp_path / "s.log"
    log.write_bytes(b"\n".join([
        b"not json", b"[1, 2]", b'"a string"', b"{truncated", b"\xff\xfe binary",
        b'{"event": "' + b"x" * 500 + b'"}',  # over the line cap: garbage, not buffered
        b"", b"   ",  # blank lines are spacing, not garbage
        line("kept").encode(),
    ]) + b"\n" + b"no newline at the end")
    rc, out, err = search(capsysbinary, str(log))
    assert rc == 0
    assert events_of(out) == ["kept"]
    assert "skipped 7 garbage line(s)" in err


def test_gz_files_are_read_transparently(capsysbinary: pytest.CaptureFixture[bytes], tmp_path: Path) -> None:
    gz = tmp_path / "sink.log.1.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(f"{line('from_gz')}\n")
    plain = write_log(tmp_path / "sink.log", [line("from_plain")])
    assert events_of(search(capsysbinary, str(gz), str(plain))[1]) == ["from_gz", "from_plain"]


def test_truncated_gz_is_reported_and_the_search_goes_on(
    capsysbinary: pytest.CaptureFixture[bytes], tmp_path: Path
) -> None:
    data = gzip.compress("".join(f"{line('e', n=i)}\n" for i in range(2000)).encode())
    cut = tmp_path / "cut.log.gz"
    cut.write_bytes(data[: len(data) // 2])
    plain = write_log(tmp_path / "sink.log", [line("after")])
    rc, out, err = search(capsysbinary, str(cut), str(plain))
    assert rc == 0
    assert events_of(out)[-1] == "after"
    assert "stopped reading" in err


def stdin_of(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


def test_stdin_without_files_or_with_dash(
    capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    stdin_of(monkeypatch, f"{line('piped')}\n".encode())
    assert events_of(search(capsysbinary)[1]) == ["piped"]
    stdin_of(monkeypatch, f"{line('piped')}\n".encode())
    assert events_of(search(capsysbinary, "-", "--event", "piped")[1]) == ["piped"]


def test_gzipped_stdin(capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    stdin_of(monkeypatch, gzip.compress(f"{line('zipped')}\n".encode()))
    assert events_of(search(capsysbinary, "-")[1]) == ["zipped"]


def test_docker_compose_logs_prefix_is_tolerated(
    capsysbinary: pytest.CaptureFixture[bytes], tmp_path: Path
) -> None:
    log = tmp_path / "compose.log"
    log.write_bytes(b"".join([
        f"sink-1  | {line('retrying', level='warning', partition=3)}\n".encode(),
        f"my_project.sink-12 |{line('ignored', level='warning')}\n".encode(),  # no space after '|': not compose
        f"sink 1 | {line('ignored', level='warning')}\n".encode(),  # a space inside the name: not compose
        b"sink-1  | Traceback (most recent call last):\n",
    ]))
    rc, out, err = search(capsysbinary, str(log), "--level", "warning", "--where", "partition=3")
    assert rc == 0
    assert events_of(out) == ["retrying"]
    assert "skipped 3 garbage line(s)" in err
    # --json feeds jq: the prefix is dropped.
    _, out, _ = search(capsysbinary, str(log), "--json", "--event", "retrying")
    assert out == f"{line('retrying', level='warning', partition=3)}\n"


# --- exit status ------------------------------------------------------------------------------


def test_exit_1_when_nothing_matches(capsysbinary: pytest.CaptureFixture[bytes], story: Path) -> None:
    assert search(capsysbinary, str(story), "--event", "consumer_paused") == (1, "", "")


@pytest.mark.parametrize("argv, message", [
    (["--since", "yesterday"], "relative time like 90s"),
    (["--until", "5x"], "relative time like 90s"),
    (["--where", "partition"], "KEY=VALUE"),
    (["--where", "=3"], "KEY=VALUE"),
    (["--record", f"{TOPIC}:3"], "TOPIC:PARTITION:OFFSET"),
    (["--record", f"{TOPIC}:x:1"], "TOPIC:PARTITION:OFFSET"),
    (["--record", ":3:1"], "TOPIC:PARTITION:OFFSET"),
    (["--level", "loud"], "debug, info, warning, error, critical"),
    (["--since", "1h", "--until", "2h"], "--since"),
    (["--since", "1000000d"], "argument --since: out of range"),
    (["--until", "1000000d"], "argument --until: out of range"),
    (["--since", "99999999999999d"], "argument --since: out of range"),
    (["--until", "1" * 400 + "s"], "argument --until: out of range"),
    (["--bogus"], "unrecognized arguments"),
])
def test_exit_2_on_bad_arguments_with_a_clear_message(
    capsysbinary: pytest.CaptureFixture[bytes], story: Path, argv: list[str], message: str
) -> None:
    rc, out, err = search(capsysbinary, str(story), *argv)
    assert (rc, out) == (2, "")
    assert message in err


def test_exit_2_on_a_missing_file(capsysbinary: pytest.CaptureFixture[bytes], tmp_path: Path) -> None:
    rc, _, err = search(capsysbinary, str(tmp_path / "nope.log"))
    assert rc == 2
    assert "nope.log" in err


def test_unknown_event_warns_but_searches(capsysbinary: pytest.CaptureFixture[bytes], story: Path) -> None:
    rc, _, err = search(capsysbinary, str(story), "--event", "batch_writen")
    assert rc == 1
    assert "'batch_writen' is not in sink.logs.EVENTS" in err


# --- streaming --------------------------------------------------------------------------------


class GeneratedLog(io.RawIOBase):
    """A log file that exists only as a generator: reading it cannot have loaded it whole."""

    def __init__(self, lines: Iterator[bytes]) -> None:
        self._lines = lines
        self._pending = b""
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = next(self._lines)
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n], self._pending = self._pending[:n], self._pending[n:]
        self.size += n
        return n


def test_streams_without_loading_the_input(
    capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    needle = 17_777
    # Few long lines keep the test quick under tracemalloc; the input is still 10x the allowed peak.
    template = line("batch_written", topic=TOPIC, offsets={"3": [0, 0]}, batch_id=0, pad="x" * 700)
    head, tail = template.split('{"3": [0, 0]}, "batch_id": 0')
    lines = (
        f'{head}{{"3": [{i * 10}, {i * 10 + 9}]}}, "batch_id": {i}{tail}\n'.encode() for i in range(25_000)
    )
    source = GeneratedLog(lines)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(source)))
    tracemalloc.start()
    try:
        rc = logsearch.main(["--record", f"{TOPIC}:3:{needle * 10 + 4}"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rc == 0
    assert source.size > 20_000_000
    assert peak < 2_000_000, f"peak {peak} bytes for a {source.size} byte input"
    assert f"batch_id={needle}" in capsysbinary.readouterr().out.decode()
