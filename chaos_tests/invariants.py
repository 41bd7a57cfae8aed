"""The end-of-scenario invariants, against the producer's ledger (pure: data in, problems out).

* Rows in the table == the distinct primary keys of the records that should be rows, with the
  values sink.decode made of them (no loss, no duplicate, nothing extra).
* DLQ records == the records that should be DLQ'd, exactly once each, with their original key
  and value and headers pointing back to the input topic, partition and offset, at the
  expected stage.
`upto` limits the expectation to records below given offsets per partition (when a scenario
ends with the sink stopped on purpose, e.g. by the DLQ breaker).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from chaos_tests.checker import DlqSeen
from chaos_tests.ledger import Produced
from sink.envelope import H_STAGE
from sink.model import PRIMARY_KEY

_PK = len(PRIMARY_KEY)
_SHOW = 8  # problems listed per kind; the count says how many there were


@dataclass
class Outcome:
    expected_rows: int = 0
    rows: int = 0
    expected_dlq: int = 0
    dlq: int = 0
    problems: list[str] = field(default_factory=list)

    def add(self, kind: str, items: Sequence[str]) -> None:
        if items:
            shown = "first ones" if len(items) > _SHOW else "all"
            self.problems.append(f"{kind}: {len(items)} ({shown}: " + "; ".join(items[:_SHOW]) + ")")


def check_final(produced: Sequence[Produced], table: Sequence[tuple[Any, ...]], dlq: Sequence[DlqSeen],
                topic: str, upto: dict[int, int] | None = None, latest_wins: bool = False) -> Outcome:
    """latest_wins: WRITE_MODE=update, where a key's row is its last committed record's (a key's
    records are in one partition), or a later one's whose batch was written but not committed."""
    out = Outcome()

    def covered(r: Produced) -> bool:
        return upto is None or r.offset < upto.get(r.partition, 0)

    # ---- the table
    of_key: dict[tuple[Any, ...], list[Produced]] = {}
    for r in sorted(produced, key=lambda r: (r.partition, r.offset)):
        if r.planned.expect == "row" and r.planned.row is not None:
            of_key.setdefault(r.planned.row[:_PK], []).append(r)
    want: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    allowed: dict[tuple[Any, ...], set[tuple[Any, ...]]] = {}  # the rows a key may hold
    for pk, records in of_key.items():
        done = [i for i, r in enumerate(records) if covered(r)]
        if latest_wins:
            first = done[-1] if done else 0
            allowed[pk] = {tuple(r.planned.row or ()) for r in records[first:]}
            if done:
                want[pk] = tuple(records[done[-1]].planned.row or ())
        else:  # every record of a key makes the same row
            allowed[pk] = {tuple(records[0].planned.row or ())}
            if done:
                want[pk] = tuple(records[0].planned.row or ())
    got: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    dup_pk: list[str] = []
    for row in table:
        pk = tuple(row[:_PK])
        if pk in got:
            dup_pk.append(repr(pk))
        got[pk] = tuple(row)
    out.expected_rows, out.rows = len(want), len(got)
    out.add("rows lost (valid record produced, no row)", [repr(pk) for pk in want if pk not in got])
    out.add("duplicate rows", dup_pk)
    out.add("unexpected rows (no valid record has this key)", [repr(pk) for pk in got if pk not in allowed])
    out.add("rows with wrong values", [f"{got[pk]!r} not in the expected {sorted(map(repr, rows))}"
                                      for pk, rows in allowed.items() if pk in got and got[pk] not in rows])

    # ---- the DLQ
    by_origin: dict[tuple[int, int], Produced] = {(r.partition, r.offset): r for r in produced}
    expected = {(r.partition, r.offset) for r in produced if r.planned.expect == "dlq" and covered(r)}
    seen: Counter[tuple[int | None, int | None]] = Counter()
    bad_headers: list[str] = []
    unexpected: list[str] = []
    for d in dlq:
        t, p, o = d.origin()
        seen[(p, o)] += 1
        where = f"dlq {d.dlq_partition}/{d.dlq_offset} -> {p}/{o}"
        if t != topic or p is None or o is None:
            bad_headers.append(f"{where}: origin topic {t!r}")
            continue
        src = by_origin.get((p, o))
        if src is None or src.planned.expect != "dlq":
            unexpected.append(f"{where}: {'unknown record' if src is None else src.planned.kind + ' should be a row'}")
            continue
        if not covered(src):
            unexpected.append(f"{where}: beyond the committed offset {upto.get(p) if upto else None}")
        if d.key != src.planned.key or d.value != src.planned.value:
            bad_headers.append(f"{where}: key/value differ from the original")
        stage = d.headers.get(H_STAGE, b"").decode()
        if src.planned.stage and stage != src.planned.stage:
            bad_headers.append(f"{where}: stage {stage!r}, expected {src.planned.stage!r}")
    out.expected_dlq, out.dlq = len(expected), len(dlq)
    out.add("invalid records missing from the DLQ", [f"{p}/{o} ({by_origin[(p, o)].planned.kind})"
                                                    for p, o in sorted(expected) if not seen[(p, o)]])
    out.add("DLQ duplicates (same origin more than once)", [f"{p}/{o} x{n}" for (p, o), n in sorted(
        seen.items(), key=lambda kv: (kv[0][0] or -1, kv[0][1] or -1)) if n > 1])
    out.add("unexpected DLQ records", unexpected)
    out.add("DLQ records with wrong headers or payload", bad_headers)
    return out
