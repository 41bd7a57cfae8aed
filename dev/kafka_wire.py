"""Two Kafka requests the Python clients do not offer, sent by hand: DescribeQuorum (what
`kafka-metadata-quorum.sh describe --status --replication` shows) and FindCoordinator for a
transactional id (which broker coordinates a producer's transactions).

Standard library only, like dev/services.py: flexible request header v2, one request per
connection, no authentication (the local cluster's plaintext listeners).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

_DESCRIBE_QUORUM = 55
_FIND_COORDINATOR = 10
_METADATA_TOPIC = "__cluster_metadata"
_TRANSACTION_KEY = 1  # FindCoordinator's key type for a transactional id (0: a group)


class WireError(RuntimeError):
    """The broker answered with an error code, or not at all."""


@dataclass(frozen=True)
class Quorum:
    """The KRaft controller quorum: who leads it, and how far each voter's log has come."""

    leader_id: int
    leader_epoch: int
    high_watermark: int
    voters: dict[int, int]  # voter id -> its log end offset (-1: unknown to the leader)

    def lag(self) -> dict[int, int]:
        return {v: self.high_watermark - end if end >= 0 else -1 for v, end in self.voters.items()}


# --------------------------------------------------------------------------- encoding


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        if n < 0x80:
            out.append(n)
            return bytes(out)
        out.append((n & 0x7F) | 0x80)
        n >>= 7


def _compact_str(s: str) -> bytes:
    b = s.encode()
    return _uvarint(len(b) + 1) + b


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, fmt: str) -> int:
        (v,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return int(v)

    def uvarint(self) -> int:
        shift = n = 0
        while True:
            b = self.data[self.pos]
            self.pos += 1
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
            shift += 7

    def compact_str(self) -> str | None:
        n = self.uvarint() - 1
        if n < 0:
            return None
        s = self.data[self.pos:self.pos + n].decode()
        self.pos += n
        return s

    def skip_tags(self) -> None:
        for _ in range(self.uvarint()):
            self.uvarint()  # tag
            self.pos += self.uvarint()  # size, then the value


def _call(host: str, port: int, api_key: int, version: int, body: bytes, timeout: float) -> _Reader:
    client = b"dev-kafka-wire"
    header = struct.pack(">hhih", api_key, version, 1, len(client)) + client + b"\x00"
    with socket.create_connection((host, port), timeout=timeout) as s:
        payload = header + body
        s.sendall(struct.pack(">i", len(payload)) + payload)
        size = struct.unpack(">i", recv_exactly(s, 4))[0]
        r = _Reader(recv_exactly(s, size))
    if r.take(">i") != 1:
        raise WireError("response to another request")
    r.skip_tags()  # response header v1
    return r


def recv_exactly(s: socket.socket, n: int) -> bytes:
    """n bytes from the socket (a response is framed by its size)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise WireError("connection closed mid-response")
        buf += chunk
    return bytes(buf)


# --------------------------------------------------------------------------- the requests


def describe_quorum(host: str, port: int, timeout: float = 5.0) -> Quorum:
    """DescribeQuorum v1 to a broker (which forwards it to the active controller)."""
    body = (_uvarint(2) + _compact_str(_METADATA_TOPIC)  # one topic
            + _uvarint(2) + struct.pack(">i", 0) + b"\x00"  # one partition, no tags
            + b"\x00" + b"\x00")  # topic tags, request tags
    r = _call(host, port, _DESCRIBE_QUORUM, 1, body, timeout)
    if (code := r.take(">h")) != 0:
        raise WireError(f"DescribeQuorum error {code}")
    r.uvarint()  # topics: one
    r.compact_str()
    r.uvarint()  # partitions: one
    r.take(">i")
    if (code := r.take(">h")) != 0:
        raise WireError(f"DescribeQuorum partition error {code}")
    leader, epoch, hw = r.take(">i"), r.take(">i"), r.take(">q")
    voters: dict[int, int] = {}
    for _ in range(r.uvarint() - 1):
        replica, end = r.take(">i"), r.take(">q")
        r.take(">q")  # last fetch timestamp
        r.take(">q")  # last caught-up timestamp
        r.skip_tags()
        voters[replica] = end
    return Quorum(leader, epoch, hw, voters)


def find_transaction_coordinator(host: str, port: int, transactional_id: str, timeout: float = 5.0) -> int:
    """The node id of the broker coordinating `transactional_id` (FindCoordinator v4)."""
    body = struct.pack(">b", _TRANSACTION_KEY) + _uvarint(2) + _compact_str(transactional_id) + b"\x00"
    r = _call(host, port, _FIND_COORDINATOR, 4, body, timeout)
    r.take(">i")  # throttle time
    r.uvarint()  # coordinators: one
    r.compact_str()
    node = r.take(">i")
    r.compact_str()  # host
    r.take(">i")  # port
    if (code := r.take(">h")) != 0:
        raise WireError(f"FindCoordinator error {code}: {r.compact_str()}")
    return node
