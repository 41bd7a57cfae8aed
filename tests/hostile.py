"""A seeded mix of hostile records, as an attacker or a broken upstream sends them (pure: no I/O).

Each record is (kind, key, value, headers).  Header names are str, except the ones the Python
client cannot send (not UTF-8): those are bytes and must be produced by hand (tests/raw_produce.py).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

Header = tuple[str | bytes, bytes | None]


@dataclass(frozen=True)
class Hostile:
    kind: str
    key: bytes | None
    value: bytes | None
    headers: tuple[Header, ...]

    @property
    def raw(self) -> bool:
        """Needs a hand-built Produce request (a header name that is not a str)."""
        return any(isinstance(name, bytes) for name, _ in self.headers)


TOKENS = [b"NaN", b"-Infinity", b"1e400", b"1" * 4301, b'"\\u0000"', b'"\\ud800"', b"\x00", b"\xff", b"\xc3",
          b"[" * 2000, b"null", b"true", b"{}", b'"' + b"x" * 300 + b'"', b"\\", b'"', b"}", b":"]
SQLISH = ["'; DROP TABLE iot_measurements; --", "Robert'); DELETE FROM x;--", "$$; SELECT pg_sleep(10); $$",
          "\\x00\\'", "%s%s%n", "{{7*7}}"]


def measurement(rng: random.Random, device: str) -> dict[str, Any]:
    return {"timestamp": 1_700_000_000 + rng.randrange(10_000_000), "mac_address": device,
            "mode": rng.choice(["analog", "digital"]), "data_point_label": rng.choice(["temperature", "humidity"]),
            "pin": rng.choice([rng.randrange(40), f"A{rng.randrange(8)}"]), "value": round(rng.uniform(-50, 50), 3),
            "unit": "C", "original_topic": f"devices/{device}"}


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(buf) + 1)
        op = rng.randrange(4)
        if op == 0 and buf:
            buf[min(at, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[at:at] = rng.choice(TOKENS)
        elif op == 2:
            del buf[at:at + rng.randint(1, 8)]
        else:
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    return bytes(buf)


def _headers(rng: random.Random) -> tuple[Header, ...]:
    out: list[Header] = []
    for _ in range(rng.choice([0, 0, 1, 2, 3])):
        out.append((rng.choice(["trace-id", "source", "app", "é-unicode", ""]),
                    rng.choice([None, b"", b"\x00\xff\xfe", bytes(rng.randrange(256) for _ in range(8))])))
    return tuple(out)


def generate(seed: int, count: int, tag: str) -> list[Hostile]:
    """`count` records; `tag` makes device names unique to one run (each valid record has its own
    device, so its row is found again; exact duplicates repeat one)."""
    rng = random.Random(seed)
    out: list[Hostile] = []
    valid: list[Hostile] = []
    for i in range(count):
        device = f"{tag}-{i}-{rng.getrandbits(32):08x}"
        base = measurement(rng, device)
        key = rng.choice([device.encode(), None, bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))])
        headers = _headers(rng)
        kind = KINDS[i] if i < len(KINDS) else rng.choices(KINDS, WEIGHTS)[0]  # each kind at least once
        value: bytes | None
        if kind == "valid":
            value = json.dumps(base).encode()
        elif kind == "duplicate" and valid:
            again = rng.choice(valid)
            out.append(Hostile(kind, again.key, again.value, again.headers))
            continue
        elif kind == "mutated":
            value = _mutate(rng, json.dumps(base).encode())
        elif kind == "truncated":
            data = json.dumps(base).encode()
            value = data[: rng.randrange(len(data))]
        elif kind == "invalid_utf8":
            value = json.dumps(base).encode().replace(b'"C"', b'"\xc3\x28"')
        elif kind == "surrogate":
            value = json.dumps(base).encode().replace(b'"C"', b'"\\udc80"')
        elif kind == "nul":
            value = json.dumps({**base, "unit": "a\u0000b"}).encode()
        elif kind == "too_long":
            value = json.dumps({**base, "unit": "u" * rng.choice([21, 1000, 100_000])}).encode()
        elif kind == "deep":
            value = b'{"a":' * 5000 + b"1" + b"}" * 5000
        elif kind == "huge_valid":  # an extra field the model ignores: a 900 KB row
            value = json.dumps({**base, "padding": "p" * 900_000}).encode()
        elif kind == "huge_invalid":
            value = b'{"mac_address": "' + b"x" * 900_000 + b'"}'
        elif kind == "not_object":
            value = rng.choice([b"[1,2,3]", b'"text"', b"42", b"null", b"true", b"[]"])
        elif kind == "duplicate_keys":
            value = json.dumps(base).encode()[:-1] + b', "mac_address": "' + device.encode() + b'-second"}'
        elif kind == "tombstone":
            value = rng.choice([None, b""])
        elif kind == "time_range":
            value = json.dumps({**base, "timestamp": rng.choice(
                ["10000-01-01T00:00:00Z", "0000-01-01T00:00:00Z", 10**17, -(10**17), "1e30", "2026-13-01T00:00:00Z",
                 True, "soon"])}).encode()
        elif kind == "sql_text":
            value = json.dumps({**base, "data_point_label": rng.choice(SQLISH)[:50],
                                "original_topic": rng.choice(SQLISH)}).encode()
        elif kind == "non_finite_text":
            field = rng.choice(["mac_address", "mode", "pin", "unit"])
            token = rng.choice(["NaN", "Infinity", "1e400"])
            value = json.dumps(base).encode()[:-1] + f', "{field}": {token}}}'.encode()
        elif kind == "huge_int":
            field = rng.choice(["value", "mac_address", "timestamp", "extra"])
            digits = b"7" * rng.choice([4300, 4301, 9000])
            value = json.dumps(base).encode()[:-1] + f', "{field}": '.encode() + digits + b"}"
        elif kind == "reserved_headers":
            value = rng.choice([b"x", json.dumps(base).encode()])
            headers = (("__connect.errors.topic", b"t"), ("__connect.errors.offset", b"999"),
                       ("__sink.errors.attempt", b"2"), ("__sink.errors.own_headers", b"0"), *headers)
        elif kind == "header_name_ff":
            value = rng.choice([None, b"x", json.dumps(base).encode()])
            headers = ((b"\xff", b"v"), (b"ok", b"w"))
        elif kind == "header_name_nul":
            value = rng.choice([b"x", json.dumps(base).encode()])
            headers = (("k\x00zz", b"v"), *headers)
        else:  # "scalar" and fallbacks: plain garbage bytes
            value = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        rec = Hostile(kind, key, value, headers)
        if kind == "valid":
            valid.append(rec)
        out.append(rec)
    return out


# Valid records dominate, as on a real topic; every hostile kind shows up in 2,000 records.
_MIX = {"valid": 30, "duplicate": 5, "mutated": 20, "truncated": 4, "invalid_utf8": 2, "surrogate": 2, "nul": 2,
        "too_long": 2, "deep": 1, "huge_valid": 0.1, "huge_invalid": 0.1, "not_object": 2, "duplicate_keys": 2,
        "tombstone": 2, "time_range": 3, "sql_text": 3, "non_finite_text": 3, "huge_int": 3, "reserved_headers": 3,
        "header_name_ff": 1, "header_name_nul": 1, "garbage": 3}
KINDS = list(_MIX)
WEIGHTS = list(_MIX.values())
