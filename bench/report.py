"""Summaries: medians over repeated runs, the comparison table, and machine facts for the record."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from bench.latency import percentile
from bench.references import Timed
from bench.sinkrun import Drain
from dev import testkit


def sink_figures(d: Drain) -> dict[str, Any]:
    return {
        "records": d.records, "seconds": round(d.seconds, 3), "records_per_s": round(d.records_per_s),
        "batches": d.batches, "mean_batch_rows": round(d.records / d.batches, 1) if d.batches else 0,
        "write_p50_ms": percentile(d.write_ms, 50), "write_p99_ms": percentile(d.write_ms, 99),
        "commit_p50_ms": percentile(d.commit_ms, 50), "commit_p99_ms": percentile(d.commit_ms, 99),
        "peak_rss_mib": round(d.peak_rss_kib / 1024, 1), "drain_rss_mib": round(d.drain_rss_kib / 1024, 1),
        "cpu_s": round(d.cpu_s, 2), "cpu_total_s": round(d.cpu_total_s, 2), "db_cpu_s": round(d.db_cpu_s, 2),
        "cpu_us_per_record": _per_record(d.cpu_s, d.records),
        "db_cpu_us_per_record": _per_record(d.db_cpu_s, d.records),
        "broker_cpu_s": round(d.broker_cpu_s, 2),
        "incidents": d.incidents,
        **({"throttling": d.throttling} if d.throttling else {}),
        **({"outage_rss_mib": round(d.outage_rss_kib / 1024, 1)} if d.outage_rss_kib else {}),
        # The share of the drain in which the database ran one of the sink's INSERTs (one at a
        # time): near 1, the sink waits on the database's insert and nothing client-side helps.
        **({"insert_busy": round(d.insert_ms / 1000 / d.seconds, 3)} if d.insert_ms is not None and d.seconds else {}),
    }


def _per_record(seconds: float, records: int) -> float:
    return round(seconds / records * 1e6, 1) if records else 0.0


def timed_figures(t: Timed) -> dict[str, Any]:
    return {"records": t.records, "rows": t.rows, "seconds": round(t.seconds, 3),
            "records_per_s": round(t.records_per_s), "rows_per_s": round(t.rows_per_s),
            "cpu_s": round(t.cpu_s, 2), "db_cpu_s": round(t.db_cpu_s, 2),
            "cpu_us_per_record": _per_record(t.cpu_s, t.records),
            "db_cpu_us_per_record": _per_record(t.db_cpu_s, t.records)}


_YARDSTICKS = ("reference", "ceiling", "reference_psycopg2")
# Issue 8's throughput targets, each a ratio of two numbers measured in the same run.
TARGET_VS_REFERENCE = 3.0
TARGET_VS_CEILING = 0.5


def medians(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per sink variant and yardstick, the median of each figure over the runs, and the ratios
    of the sink's median records/s to the yardsticks' medians."""
    out: dict[str, Any] = {"sinks": {}}
    labels = list(runs[0]["sinks"]) if runs else []
    for label in labels:
        out["sinks"][label] = median_figures([r["sinks"][label] for r in runs])
    for method in _YARDSTICKS:
        rows = [r[method] for r in runs if method in r]
        if rows:
            out[method] = median_figures(rows)
    ratios: dict[str, dict[str, float]] = {}
    for label, figures in out["sinks"].items():
        for method in _YARDSTICKS:
            base = out.get(method, {}).get("records_per_s", 0)
            if base:
                ratios.setdefault(label, {})[f"vs_{method}"] = round(figures["records_per_s"] / base, 2)
    out["ratios"] = ratios
    out["per_run"] = {label: per_run(runs, label) for label in labels}
    return out


def per_run(runs: Sequence[Mapping[str, Any]], label: str = "sink") -> dict[str, Any]:
    """The sink's ratios to the reference and the ceiling run by run (the targets compare numbers
    of one run), and in how many runs both targets held.  Runs without both yardsticks are left out."""
    vs_ref: list[float] = []
    vs_ceiling: list[float] = []
    met = 0
    for r in runs:
        sink = r.get("sinks", {}).get(label, {}).get("records_per_s")
        ref = r.get("reference", {}).get("records_per_s")
        ceiling = r.get("ceiling", {}).get("records_per_s")
        if sink and ref and ceiling:
            # Judged before rounding: 2.996x is not 3x.
            met += sink / ref >= TARGET_VS_REFERENCE and sink / ceiling >= TARGET_VS_CEILING
            vs_ref.append(round(sink / ref, 2))
            vs_ceiling.append(round(sink / ceiling, 2))
    return {"runs": len(vs_ref), "vs_reference": vs_ref, "vs_ceiling": vs_ceiling, "targets_met": met}


def per_run_line(name: str, p: Mapping[str, Any]) -> str:
    """One line: the per-run ranges and medians, and how often both targets held."""
    ref, ceiling = p["vs_reference"], p["vs_ceiling"]
    return (f"{name} per run: {min(ref):.2f}-{max(ref):.2f}x the reference (median {_median(ref):.2f}x), "
            f"{min(ceiling):.2f}-{max(ceiling):.2f}x the ceiling (median {_median(ceiling):.2f}x); "
            f">= {TARGET_VS_REFERENCE:g}x and >= {TARGET_VS_CEILING:g}x in the same run: "
            f"{p['targets_met']} of {p['runs']}")


def median_figures(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {k: _median([row[k] for row in rows]) for k, v in rows[0].items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def _median(values: Sequence[float]) -> float:
    m = statistics.median(values)
    return round(m, 2) if isinstance(m, float) else m


def table(summary: Mapping[str, Any], runs: int) -> str:
    """The one table: the sink end to end, the reference design, the COPY ceiling, and the ratios
    of the sink to each (one sink row per variant)."""
    lines = [f"{'':30}{'records/s':>10}{'rows/s':>9}{'write p50':>11}{'write p99':>11}{'peak RSS':>10}"
             f"{'CPU s':>7}{'DB CPU s':>9}{'Kafka CPU s':>12}{'INSERT busy':>12}{'vs ref':>8}{'vs ceiling':>11}"]
    rows: list[tuple[str, Mapping[str, Any], Mapping[str, float]]] = []
    for label, f in summary.get("sinks", {}).items():
        name = "sink, end to end" if label == "sink" else f"sink {label}"
        rows.append((name, f, summary.get("ratios", {}).get(label, {})))
    if summary.get("reference"):
        rows.append(("reference: 100 rows/commit", summary["reference"], {}))
    if summary.get("ceiling"):
        rows.append(("ceiling: binary COPY", summary["ceiling"], {}))
    if summary.get("reference_psycopg2"):
        rows.append(("reference, psycopg 2 itself", summary["reference_psycopg2"], {}))
    for name, f, ratio in rows:
        lines.append(
            f"{name:30}{f['records_per_s']:>10,.0f}"
            f"{_opt(f.get('rows_per_s'), '{:,.0f}'):>9}"
            f"{_opt(f.get('write_p50_ms'), '{:.1f} ms'):>11}{_opt(f.get('write_p99_ms'), '{:.1f} ms'):>11}"
            f"{_opt(f.get('peak_rss_mib'), '{:.0f} MiB'):>10}{_opt(f.get('cpu_s'), '{:.1f}'):>7}"
            f"{_opt(f.get('db_cpu_s'), '{:.1f}'):>9}{_opt(f.get('broker_cpu_s'), '{:.1f}'):>12}"
            f"{_opt(f.get('insert_busy'), '{:.0%}'):>12}"
            f"{_opt(ratio.get('vs_reference'), '{:.2f}x'):>8}{_opt(ratio.get('vs_ceiling'), '{:.2f}x'):>11}")
    lines.append(f"(medians of {runs} run{'s' if runs != 1 else ''}; records/s = input records / wall time, "
                 "sink timed from partition assignment to the last offset commit; CPU s = the client process, "
                 "DB CPU s = its PostgreSQL backends, Kafka CPU s = the broker while the sink drains, "
                 "INSERT busy = share of the drain in which the database ran one of the sink's INSERTs)")
    for label, p in summary.get("per_run", {}).items():
        if p["runs"]:
            lines.append(per_run_line(label, p))
    for label, ratio in summary.get("ratios", {}).items():
        if "vs_reference_psycopg2" in ratio:
            lines.append(f"{label} vs the reference design run with psycopg 2's execute_batch itself: "
                         f"{ratio['vs_reference_psycopg2']:.2f}x")
    return "\n".join(lines)


def _opt(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def machine() -> dict[str, Any]:
    """What the numbers were measured on (they mean little without it)."""
    cpu = "?"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    pg = "?"
    try:
        with testkit.connect() as conn:
            row = conn.execute("SHOW server_version").fetchone()
            pg = str(row[0]) if row else "?"
    except Exception:  # the figures are still useful without the version
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "postgresql": pg,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def machine_line(facts: Mapping[str, Any]) -> str:
    """machine() in one printed line: the same code gave other ratios on another host
    (docs/performance.md), so a pasted table should say which one it ran on."""
    load = " ".join(f"{x:g}" for x in facts.get("load_average", []))
    return (f"machine: {facts.get('cpu', '?')}, {facts.get('cores', '?')} cores, Python {facts.get('python', '?')}, "
            f"PostgreSQL {facts.get('postgresql', '?')}, load average {load or '?'}")
