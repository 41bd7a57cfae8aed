"""Realistic demo IoT records (and a few bad ones) for the local demo, compose's demo profile
and the benchmark: many devices, several components and pins, mixed timestamp formats."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime

from sink.produce import produce_waiting

COMPONENTS = [("temperature", "°C", 15.0, 35.0), ("humidity", "%", 20.0, 90.0), ("pressure", "hPa", 980.0, 1040.0),
              ("voltage", "V", 3.0, 5.2), ("light", "lux", 0.0, 2000.0), ("relay", "", 0.0, 1.0)]
MODES = ["analog", "digital", "i2c", "modbus"]
INVALID = [b"", b"\xff\xfenot-utf8", b"{not json", b"[1, 2, 3]", b'"just a string"',
           b'{"timestamp": "2024-02-30T00:00:00Z", "mac_address": "aa:bb"}',
           b'{"mac_address": "aa:bb:cc", "value": 1}',
           b'{"timestamp": 1700000000, "mac_address": "aa", "value": "twelve"}',
           b'{"timestamp": 1700000000, "mac_address": "aa", "value": "NaN"}']


def _mac(i: int) -> str:
    return "02:00:" + ":".join(f"{(i >> s) & 0xFF:02x}" for s in (24, 16, 8, 0))


def _timestamp(rng: random.Random, ts: float) -> object:
    """The formats upstream decoders actually send."""
    kind = rng.randrange(5)
    if kind == 0:
        return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")
    if kind == 1:
        return datetime.fromtimestamp(ts, UTC).astimezone().isoformat()
    if kind == 2:
        return int(ts * 1000)
    if kind == 3:
        return round(ts, 3)
    return str(int(ts * 1_000_000))


def records(count: int, *, seed: int = 42, devices: int = 1000, invalid_share: float = 0.0,
            duplicate_share: float = 0.0, correction_share: float = 0.0, start: float | None = None
            ) -> Iterator[bytes]:
    """`count` JSON values; a share of them invalid, a share exact repeats of earlier ones, and a
    share corrections (an earlier record's key with another value)."""
    rng = random.Random(seed)
    t0 = start if start is not None else time.time() - count / 1000
    sent: list[bytes] = []
    for i in range(count):
        r = rng.random()
        if r < invalid_share:
            yield rng.choice(INVALID)
            continue
        if sent and r < invalid_share + duplicate_share:
            yield rng.choice(sent[-5000:])
            continue
        if sent and r < invalid_share + duplicate_share + correction_share:
            corrected = json.loads(rng.choice(sent[-5000:]))
            if isinstance(corrected["value"], bool):
                corrected["value"] = not corrected["value"]
            else:
                corrected["value"] = round(float(corrected["value"]) + rng.uniform(0.01, 1.0), 2)
            yield json.dumps(corrected, ensure_ascii=False).encode()
            continue
        label, unit, lo, hi = rng.choice(COMPONENTS)
        dev = rng.randrange(devices)
        value: object = round(rng.uniform(lo, hi), 2)
        if label == "relay":
            value = rng.choice([True, False])
        elif rng.random() < 0.1:
            value = str(value)
        msg = {
            "timestamp": _timestamp(rng, t0 + i / 1000),
            "mac_address": _mac(dev),
            "mode": MODES[dev % len(MODES)],
            "data_point_label": label,
            "pin": rng.choice([0, 1, 2, 3, "A0", "A1", "D4"]),
            "value": value,
            "unit": unit,
            "original_topic": f"devices/{_mac(dev)}/{label}",
        }
        data = json.dumps(msg, ensure_ascii=False).encode()
        sent.append(data)
        yield data


def produce(bootstrap: str, topic: str, count: int, *, rate: float = 0.0, seed: int = 42,
            invalid_share: float = 0.01, duplicate_share: float = 0.02, devices: int = 50,
            extra_config: dict[str, str] | None = None) -> int:
    """Send demo records (rate 0 = as fast as possible); returns how many were acknowledged."""
    from confluent_kafka import Producer

    p = Producer({**(extra_config or {}), "bootstrap.servers": bootstrap, "linger.ms": 20,
                  "enable.idempotence": True})
    acked = 0

    def on_ack(err: object, _msg: object) -> None:
        nonlocal acked
        if err is None:
            acked += 1

    t0 = time.monotonic()
    for i, value in enumerate(records(count, seed=seed, devices=devices, invalid_share=invalid_share,
                                      duplicate_share=duplicate_share)):
        produce_waiting(p, topic, 0.05, value=value, key=None, on_delivery=on_ack)
        p.poll(0)
        if rate > 0:
            ahead = (i + 1) / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
    p.flush(60)
    return acked
