"""The producer's own record of what it sent, and the producer that streams into the input topic.

The ledger learns where each record landed from the broker's acks (partition, offset).  The
harness is the only writer of the input topic and produces idempotently without transactions,
so every partition's offsets are 0, 1, 2, ... with no gaps: "known up to offset n" is exact.
"""

from __future__ import annotations

import random
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Producer

from chaos_tests.records import Planned
from dev import services
from sink.produce import produce_waiting


@dataclass(frozen=True, slots=True)
class Produced:
    partition: int
    offset: int
    planned: Planned


class Ledger:
    """Thread-safe: the producer thread adds, the checker and the test read."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self._lock = threading.Lock()
        self._by_partition: list[dict[int, Produced]] = [{} for _ in range(partitions)]
        self._known = [0] * partitions  # offsets 0.._known[p]-1 are all in the ledger

    def add(self, rec: Produced) -> None:
        with self._lock:
            part = self._by_partition[rec.partition]
            if rec.offset in part:
                raise AssertionError(f"offset {rec.partition}/{rec.offset} acked twice")
            part[rec.offset] = rec
            n = self._known[rec.partition]
            while n in part:
                n += 1
            self._known[rec.partition] = n

    def known(self, partition: int) -> int:
        """Every offset below this one is in the ledger."""
        with self._lock:
            return self._known[partition]

    def between(self, partition: int, lo: int, hi: int) -> list[Produced]:
        with self._lock:
            part = self._by_partition[partition]
            return [part[o] for o in range(lo, hi)]

    def all(self) -> list[Produced]:
        with self._lock:
            return [r for part in self._by_partition for _, r in sorted(part.items())]

    def get(self, partition: int, offset: int) -> Produced | None:
        with self._lock:
            if 0 <= partition < self.partitions:
                return self._by_partition[partition].get(offset)
            return None

    def __len__(self) -> int:
        with self._lock:
            return sum(len(p) for p in self._by_partition)


class StreamProducer:
    """Produces Planned records, to a chosen or random partition, and fills the ledger from acks.

    `stream()` runs a paced background stream; `send()` produces synchronously.  Delivery
    errors are kept: they mean the harness, not the sink, lost a record, and fail the test."""

    def __init__(self, topic: str, ledger: Ledger, rng: random.Random) -> None:
        self.topic = topic
        self.ledger = ledger
        self._rng = rng
        self.errors: list[str] = []
        self._producer = Producer({
            "bootstrap.servers": services.KAFKA_BOOTSTRAP, "log_level": 2,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            # Rides out a broker restart: records wait in the queue instead of failing.
            "message.timeout.ms": 600_000,
        })
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.sent = 0
        self.failure: BaseException | None = None  # what ended the background stream early
        # Route each record by its key (as keyed producers do), so that a key's records, its
        # corrections among them, are in one partition in the order they were sent.
        self.by_key = False

    def _produce_one(self, planned: Planned, partition: int | None) -> None:
        if partition is not None:
            part = partition
        elif self.by_key:
            part = zlib.crc32(planned.key) % self.ledger.partitions
        else:
            part = self._rng.randrange(self.ledger.partitions)

        def on_ack(err: Any, msg: Any) -> None:
            if err is not None:
                self.errors.append(f"{planned.kind} seq={planned.seq}: {err}")
            else:
                self.ledger.add(Produced(msg.partition(), msg.offset(), planned))

        produce_waiting(self._producer, self.topic, 0.05, value=planned.value, key=planned.key, partition=part,
                        on_delivery=on_ack)
        self.sent += 1
        self._producer.poll(0)

    def send(self, records: Iterable[Planned], partition: int | None = None, flush: bool = True) -> None:
        with self._lock:
            for planned in records:
                self._produce_one(planned, partition)
            if flush:
                self._flush()

    def _flush(self, timeout: float = 120.0) -> None:
        left = self._producer.flush(timeout)
        if left:
            raise AssertionError(f"harness producer: {left} records unacknowledged after {timeout}s")

    def stream(self, make: Callable[[], Planned], count: int | None, rate: float) -> None:
        """Produce `count` records (None: until stop_stream()) in the background at about `rate`
        per second, in bursts of random size (batches fill unevenly, faults hit varied points)."""
        if self._thread is not None:
            raise RuntimeError("a stream is already running")
        self._stop.clear()
        # Own Random: the background thread must not interleave draws with the test's thread.
        rng = random.Random(self._rng.random())

        def run() -> None:
            try:
                done = 0
                start = time.monotonic()
                limit = count if count is not None else 2**62
                while done < limit and not self._stop.is_set():
                    burst = min(limit - done, rng.randint(1, max(1, int(rate / 5))))
                    with self._lock:
                        for _ in range(burst):
                            self._produce_one(make(), None)
                    done += burst
                    ahead = done / rate - (time.monotonic() - start)
                    if ahead > 0:
                        self._stop.wait(ahead)
                with self._lock:
                    self._flush()
            except BaseException as e:
                # Kept for wait() to raise: a thread's exception is otherwise only printed, and
                # the invariants, checked against the ledger, would pass on a stream that died.
                self.failure = e
                raise

        self._thread = threading.Thread(target=run, name="chaos-producer", daemon=True)
        self._thread.start()

    def stop_stream(self) -> None:
        """End the background stream (what was produced is flushed by wait())."""
        self._stop.set()

    @property
    def streaming(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float = 300.0) -> None:
        """Until the background stream has been produced and acknowledged; raises what ended
        the stream if it failed."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise AssertionError(f"harness producer still streaming after {timeout}s")
            self._thread = None
        if self.failure is not None:
            raise AssertionError(f"harness producer stream failed: {self.failure!r}") from self.failure
        with self._lock:
            self._flush()
        if self.errors:
            raise AssertionError(f"harness producer lost records (not a sink bug): {self.errors[:5]}")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        self._producer.flush(10)
