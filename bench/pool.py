"""Per-run ratios pooled over saved benchmark results: is a target met in most runs, or in a few?

    .venv/bin/python -m bench.pool bench/results/s2*.json [--label sink]

One line per file (the throughput results of `bench.run --json`, with the host's CPU model when the
file records it), then one for all their runs together.  The machine's speed drifts between sets,
and the same code gave other ratios on another host, so one set of five runs says little about
how often the targets hold; pooling the sets of one host says more.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.report import per_run, per_run_line


def pool(results: Sequence[tuple[str, dict[str, Any]]], label: str = "sink") -> list[str]:
    """The report's lines: one per result with runs of `label` next to both yardsticks, then the pool."""
    lines: list[str] = []
    pooled: list[dict[str, Any]] = []
    for name, result in results:
        if result.get("mode") != "throughput":
            continue
        runs = result.get("runs", [])
        p = per_run(runs, label)
        if p["runs"]:
            about: list[str] = []
            if isinstance(records := result.get("dataset", {}).get("records"), int):
                about.append(f"{records:,} records")
            if cpu := result.get("machine", {}).get("cpu"):
                about.append(cpu)
            lines.append(per_run_line(f"{name} ({', '.join(about)})" if about else name, p))
            pooled.extend(runs)
    if not pooled:
        return [f"no throughput runs of {label!r} with both yardsticks"]
    lines.append(per_run_line(f"all {len(lines)} sets", per_run(pooled, label)))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pool", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="JSON written by bench.run --json")
    ap.add_argument("--label", default="sink", help="which sink variant (default: sink)")
    args = ap.parse_args(argv)
    results = [(f.name, json.loads(f.read_text())) for f in args.files]
    print("\n".join(pool(results, args.label)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
