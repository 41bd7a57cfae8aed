"""The DLQ record format: original key, value and headers, plus headers saying why/where/when.

Header names follow Kafka Connect's DLQ (`__connect.errors.*`) so existing tools read them;
`__sink.*` headers add what Connect's do not say.  A record re-DLQ'd by replay keeps the
original origin (topic/partition/offset of the input record) and counts its attempts.

The input record's own headers come first, all of them and unchanged (even ones named like
ours: a producer may send anything), then ours; H_OWN says how many are the record's, so
neither a reader of ours nor replay can mistake one for the other.  Ours come last, where
Kafka's ``Headers.lastHeader`` finds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sink import __version__
from sink.errors import record_fault
from sink.types import Headers, Rejection, UnreadableHeaders

H_TOPIC = "__connect.errors.topic"
H_PARTITION = "__connect.errors.partition"
H_OFFSET = "__connect.errors.offset"
H_CLASS = "__connect.errors.exception.class.name"
H_MESSAGE = "__connect.errors.exception.message"
H_STAGE = "__connect.errors.stage"
H_FAILED_AT = "__sink.errors.failed_at"  # ISO 8601 UTC, when it failed (this attempt)
H_ORIG_TS = "__sink.errors.original_timestamp_ms"  # the input record's Kafka timestamp
H_ATTEMPT = "__sink.errors.attempt"  # 1 for the sink, +1 per failed replay
H_SQLSTATE = "__sink.errors.sqlstate"  # for stage=write
H_VERSION = "__sink.version"
# Set when the record did not fit the DLQ topic (fit_record): what was left out ("value", or
# "value,key,headers"), and the size the whole record had.  The origin headers say where the
# original still is (until the input topic's retention deletes it).
H_DROPPED = "__sink.errors.dropped"
H_ORIG_BYTES = "__sink.errors.original_bytes"
H_OWN = "__sink.errors.own_headers"  # how many of the first headers are the input record's own
# Set when the Kafka client could not read the input record's headers (a name that is not
# UTF-8): they are not in the DLQ record; the origin headers say where the original is.
H_UNREADABLE = "__sink.errors.headers_unreadable"

_OURS = ("__connect.errors.", "__sink.")
MAX_MESSAGE_BYTES = 4096  # keep headers small; the full reason is in the log too
# A record's framing in a v2 record batch beyond its key, value and header bytes (varints,
# attributes; the batch header when it travels alone), rounded up: what librdkafka's
# message.max.bytes check and the broker's max.message.bytes check count on top.
RECORD_OVERHEAD = 128
HEADER_OVERHEAD = 10  # per header: the varint lengths of its name and value


@dataclass(frozen=True, slots=True)
class DlqRecord:
    """What the DLQ publisher produces."""

    key: bytes | None
    value: bytes | None
    headers: Headers


@dataclass(frozen=True, slots=True)
class DlqInfo:
    """The failure headers of a DLQ record, parsed back (for inspect and replay)."""

    topic: str | None
    partition: int | None
    offset: int | None
    error_class: str | None
    message: str | None
    stage: str | None
    failed_at: datetime | None
    original_timestamp_ms: int | None
    attempt: int
    sqlstate: str | None
    version: str | None
    dropped: str | None = None  # what fit_record left out ("value", "value,key,headers")


def to_dlq_record(rej: Rejection, now: datetime | None = None, *, replayed: bool = False) -> DlqRecord:
    """Envelope a rejection.  `replayed`: the record was read from the DLQ (by replay), so its
    origin and attempt are in our headers; otherwise its origin is where it was consumed, and
    any header of its own that looks like ours is just one of its headers."""
    try:
        return _envelope(rej, (now or datetime.now(UTC)).astimezone(UTC), replayed)
    except Exception as e:  # the record's content broke the envelope: keep what is certain
        return _bare(rej, record_fault(rej.record, "envelope", e))


def _envelope(rej: Rejection, when: datetime, replayed: bool) -> DlqRecord:
    rec = rej.record
    own, prior_headers = split_headers(rec.headers) if replayed else (rec.headers, ())
    prior = parse_headers(rec.headers) if prior_headers else None
    if prior is not None:
        topic, partition, offset = prior.topic or rec.topic, prior.partition, prior.offset
        orig_ts, attempt = prior.original_timestamp_ms, prior.attempt + 1
    else:
        topic, partition, offset = rec.topic, rec.partition, rec.offset
        orig_ts, attempt = rec.timestamp_ms, 1
    ours = _failure_headers(rej, topic, partition, offset, when, attempt)
    if orig_ts is not None:
        ours.append((H_ORIG_TS, str(orig_ts).encode()))
    if rej.sqlstate:
        ours.append((H_SQLSTATE, rej.sqlstate.encode()))
    if isinstance(rec.headers, UnreadableHeaders):
        ours.append((H_UNREADABLE, _truncate(rec.headers.reason)))
    if prior is not None:
        # Said again, or the next reader cannot tell: replayed without the value or the
        # headers it had.
        ours.extend((k, v) for k, v in prior_headers if k in (H_DROPPED, H_ORIG_BYTES, H_UNREADABLE))
    return DlqRecord(rec.key, rec.value, (*own, *ours, (H_OWN, str(len(own)).encode())))


def _failure_headers(rej: Rejection, topic: str, partition: int | None, offset: int | None, when: datetime,
                     attempt: int) -> list[tuple[str, bytes | None]]:
    return [
        (H_TOPIC, topic.encode()),
        (H_PARTITION, str(partition).encode()),
        (H_OFFSET, str(offset).encode()),
        (H_CLASS, rej.error_class.encode()),
        (H_MESSAGE, _truncate(rej.message)),
        (H_STAGE, rej.stage.encode()),
        (H_FAILED_AT, when.isoformat(timespec="milliseconds").replace("+00:00", "Z").encode()),
        (H_ATTEMPT, str(attempt).encode()),
        (H_VERSION, __version__.encode()),
    ]


def _bare(rej: Rejection, fault: Rejection) -> DlqRecord:
    """The DLQ record of a record whose envelope failed: its key and value, where it was consumed,
    and the fault; its own headers are left out (the original still has them)."""
    rec = rej.record
    ours = _failure_headers(fault, rec.topic, rec.partition, rec.offset, datetime.now(UTC), 1)
    return DlqRecord(rec.key, rec.value, (*ours, (H_OWN, b"0")))


def record_bytes(rec: DlqRecord) -> int:
    """An upper bound of the record's size as librdkafka and the broker count it (uncompressed)."""
    return (RECORD_OVERHEAD + len(rec.key or b"") + len(rec.value or b"")
            + sum(HEADER_OVERHEAD + len(k.encode(errors="surrogatepass")) + len(v or b"") for k, v in rec.headers))


def fit_record(rec: DlqRecord, max_bytes: int) -> DlqRecord:
    """The record as a DLQ topic that takes at most max_bytes per record can hold it.

    Unchanged if it fits.  Else without its value, and if that is still too large without its
    key and the input record's own headers too; H_DROPPED says what was left out and
    H_ORIG_BYTES how large it was.  Our headers stay: they say why and where the original is.
    A record refused for its size would otherwise be retried for ever and block every batch
    after it."""
    size = record_bytes(rec)
    if size <= max_bytes:
        return rec
    note = ((H_ORIG_BYTES, str(size).encode()),)
    out = DlqRecord(rec.key, None, (*rec.headers, (H_DROPPED, b"value"), *note))
    if record_bytes(out) <= max_bytes:
        return out
    ours = tuple(h for h in split_headers(rec.headers)[1] if h[0] != H_OWN)
    return DlqRecord(None, None, (*ours, (H_DROPPED, b"value,key,headers"), *note, (H_OWN, b"0")))


def _truncate(text: str) -> bytes:
    data = text.encode("utf-8", errors="replace")
    if len(data) <= MAX_MESSAGE_BYTES:
        return data
    return data[: MAX_MESSAGE_BYTES - 3].decode("utf-8", errors="ignore").encode() + b"..."


def split_headers(headers: Headers | list[tuple[str, bytes | None]] | None) -> tuple[Headers, Headers]:
    """A DLQ record's headers as (the input record's own, ours).  The last H_OWN says how many
    are its own; DLQ records without one (older versions) kept none named like ours."""
    hs = tuple(headers or ())
    for k, v in reversed(hs):
        if k == H_OWN:
            try:
                n = int(v or b"")
            except ValueError:
                break
            if 0 <= n <= len(hs):
                return hs[:n], hs[n:]
            break
    return (tuple((k, v) for k, v in hs if not k.startswith(_OURS)),
            tuple((k, v) for k, v in hs if k.startswith(_OURS)))


def original_headers(headers: Headers) -> Headers:
    """The input record's own headers, without ours (what replay re-publishes)."""
    return split_headers(headers)[0]


def parse_headers(headers: Headers | list[tuple[str, bytes | None]] | None) -> DlqInfo:
    """Read our headers back (the record's own are not looked at); missing or malformed ones
    become None; where a name repeats, the last one counts."""
    h: dict[str, str] = {}
    for k, v in split_headers(headers)[1]:  # only ours, whichever way they were told apart
        if v is not None:
            h[k] = v.decode("utf-8", errors="replace")

    def num(name: str) -> int | None:
        try:
            return int(h[name])
        except (KeyError, ValueError):
            return None

    failed_at: datetime | None
    try:
        failed_at = datetime.fromisoformat(h[H_FAILED_AT].replace("Z", "+00:00"))
        # In UTC, always aware: a time without an offset (another producer) is taken as UTC,
        # as --since/--until are; compared as it is with an aware one it raises TypeError.
        failed_at = failed_at.replace(tzinfo=UTC) if failed_at.utcoffset() is None else failed_at.astimezone(UTC)
    except (KeyError, ValueError, OverflowError):  # OverflowError: year 1 or 9999 off UTC
        failed_at = None
    return DlqInfo(
        topic=h.get(H_TOPIC),
        partition=num(H_PARTITION),
        offset=num(H_OFFSET),
        error_class=h.get(H_CLASS),
        message=h.get(H_MESSAGE),
        stage=h.get(H_STAGE),
        failed_at=failed_at,
        original_timestamp_ms=num(H_ORIG_TS),
        attempt=num(H_ATTEMPT) or 1,
        sqlstate=h.get(H_SQLSTATE),
        version=h.get(H_VERSION),
        dropped=h.get(H_DROPPED),
    )
