"""produce() that waits for room: librdkafka raises BufferError when its local queue is full."""

from __future__ import annotations

from typing import Any


def produce_waiting(producer: Any, topic: str, poll_s: float = 0.1, **fields: Any) -> None:
    """Producer.produce(topic, **fields), serving delivery reports for `poll_s` at a time while
    the queue is full, until the record is queued."""
    while True:
        try:
            producer.produce(topic, **fields)
            return
        except BufferError:
            producer.poll(poll_s)
