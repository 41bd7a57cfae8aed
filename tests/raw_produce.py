"""A Kafka Produce request built by hand: records whose header names are arbitrary bytes.

Kafka header names are bytes on the wire; Go and other clients send ones that are not UTF-8,
but the Python and Java clients will not produce them.  This writes one v2 record batch
(CRC-32C) in a Produce v3 request straight to a single local broker, which must lead the
partition (the dev broker leads them all).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Sequence

from dev.kafka_wire import recv_exactly

RawHeaders = Sequence[tuple[bytes, bytes | None]]


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _varint(n: int) -> bytes:
    z = (n << 1) ^ (n >> 63)  # zigzag
    out = bytearray()
    while True:
        if z < 0x80:
            out.append(z)
            return bytes(out)
        out.append((z & 0x7F) | 0x80)
        z >>= 7


def _vbytes(b: bytes | None) -> bytes:
    return _varint(-1) if b is None else _varint(len(b)) + b


def record_batch(records: Sequence[tuple[bytes | None, bytes | None, RawHeaders]], timestamp_ms: int) -> bytes:
    body = bytearray()
    for i, (key, value, headers) in enumerate(records):
        rec = bytearray(b"\x00")  # attributes
        rec += _varint(0) + _varint(i) + _vbytes(key) + _vbytes(value) + _varint(len(headers))
        for name, hval in headers:
            rec += _vbytes(name) + _vbytes(hval)
        body += _varint(len(rec)) + rec
    after_crc = (struct.pack(">hiqqqhii", 0, len(records) - 1, timestamp_ms, timestamp_ms, -1, -1, -1,
                             len(records)) + bytes(body))
    tail = struct.pack(">ibI", -1, 2, crc32c(after_crc)) + after_crc  # leader epoch, magic, crc
    return struct.pack(">qi", 0, len(tail)) + tail


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">h", len(b)) + b


def produce_raw(bootstrap: str, topic: str, partition: int,
                records: Sequence[tuple[bytes | None, bytes | None, RawHeaders]], timeout: float = 10.0) -> int:
    """Append the records to topic/partition (acks=all); returns the first record's offset."""
    host, port = bootstrap.split(",")[0].rsplit(":", 1)
    batch = record_batch(records, int(time.time() * 1000))
    body = (struct.pack(">hhi", 0, 3, 1) + _string("raw-produce")  # Produce v3, correlation id 1
            + struct.pack(">hhi", -1, -1, int(timeout * 1000))  # no transactional id, acks=all
            + struct.pack(">i", 1) + _string(topic) + struct.pack(">ii", 1, partition)
            + struct.pack(">i", len(batch)) + batch)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(struct.pack(">i", len(body)) + body)
        size = struct.unpack(">i", recv_exactly(sock, 4))[0]
        resp = recv_exactly(sock, size)
    # correlation id, topics=1, topic name, partitions=1, partition, error code, base offset
    pos = 4 + 4
    name_len = struct.unpack_from(">h", resp, pos)[0]
    pos += 2 + name_len + 4
    _, error, base_offset = struct.unpack_from(">ihq", resp, pos)
    if error:
        raise RuntimeError(f"produce to {topic}/{partition} failed: Kafka error code {error}")
    return int(base_offset)
