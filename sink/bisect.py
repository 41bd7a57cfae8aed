"""Isolate rows the database rejects by splitting a batch (pure: the write is injected).

A batch that fails with a PoisonError is split in halves, each written on its own, until
each bad row stands alone.  k bad rows among n cost about 2k*log2(n/k) extra writes.  The
work is bounded: after `max_splits` splits the remaining segments are written row by row,
so a batch that is mostly bad costs O(n) statements, never more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from sink.errors import PoisonError

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Isolated(Generic[T, R]):
    """What was written (segment start index, result) and which rows are poison."""

    written: list[tuple[int, int, R]] = field(default_factory=list)  # (start, length, result)
    poison: list[tuple[int, PoisonError]] = field(default_factory=list)  # (index, error)
    writes: int = 0


def write_isolating_poison(
    items: Sequence[T], write: Callable[[Sequence[T]], R], max_splits: int = 64
) -> Isolated[T, R]:
    """Write `items`; return results of the segments that went in and the rows that did not.

    Retryable and fatal errors from `write` propagate unchanged: only PoisonError splits.
    """
    out: Isolated[T, R] = Isolated()
    splits = 0
    stack: list[tuple[int, int]] = [(0, len(items))] if items else []
    while stack:
        start, end = stack.pop()
        try:
            out.writes += 1
            res = write(items[start:end])
            out.written.append((start, end - start, res))
            continue
        except PoisonError as e:
            if end - start == 1:
                out.poison.append((start, e))
                continue
        # The segment holds poison somewhere: split it, or go row by row when over budget.
        if splits >= max_splits:
            _row_by_row(items, write, start, end, out)
            continue
        splits += 1
        mid = (start + end) // 2
        # Push the right half first so the left half (earlier offsets) is written first.
        stack.append((mid, end))
        stack.append((start, mid))
    out.written.sort(key=lambda w: w[0])
    out.poison.sort(key=lambda p: p[0])
    return out


def _row_by_row(items: Sequence[T], write: Callable[[Sequence[T]], R], start: int, end: int,
                out: Isolated[T, R]) -> None:
    for i in range(start, end):
        try:
            out.writes += 1
            out.written.append((i, 1, write(items[i:i + 1])))
        except PoisonError as e:
            out.poison.append((i, e))
