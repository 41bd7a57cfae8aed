"""The benchmark's summary arithmetic (pure: no Kafka, no database)."""

from __future__ import annotations

from bench.pool import pool
from bench.report import machine_line, medians, per_run, sink_figures, table
from bench.sinkrun import Drain


def _run(sink: int, ref: int, ceiling: int, pg2: int | None = None) -> dict[str, object]:
    run: dict[str, object] = {"sinks": {"sink": {"records_per_s": sink}}, "reference": {"records_per_s": ref},
                              "ceiling": {"records_per_s": ceiling}}
    if pg2 is not None:
        run["reference_psycopg2"] = {"records_per_s": pg2}
    return run


def test_ratios_are_of_the_medians() -> None:
    m = medians([_run(60_000, 20_000, 100_000), _run(30_000, 25_000, 50_000), _run(45_000, 15_000, 90_000)])
    assert m["sinks"]["sink"]["records_per_s"] == 45_000
    assert m["ratios"]["sink"] == {"vs_reference": 2.25, "vs_ceiling": 0.5}
    assert "reference_psycopg2" not in m


def test_the_psycopg2_calibration_gets_its_own_ratio_and_line() -> None:
    m = medians([_run(60_000, 20_000, 100_000, 10_000), _run(50_000, 20_000, 100_000, 12_000)])
    assert m["ratios"]["sink"]["vs_reference_psycopg2"] == 5.0  # 55,000 / 11,000
    text = table(m, 2)
    assert "reference, psycopg 2 itself" in text
    assert "execute_batch itself: 5.00x" in text


def _drain(insert_ms: float | None) -> Drain:
    return Drain(records=200_000, seconds=4.0, batches=80, write_ms=[100.0], commit_ms=[10.0], peak_rss_kib=1024,
                 drain_rss_kib=1024, cpu_s=2.0, cpu_total_s=3.0, db_cpu_s=3.0, broker_cpu_s=0.3, incidents={},
                 insert_ms=insert_ms)


def test_insert_busy_is_the_inserts_share_of_the_drain_and_absent_when_not_logged() -> None:
    busy = sink_figures(_drain(3_500.0))
    assert busy["insert_busy"] == 0.875
    old = sink_figures(_drain(None))  # a variant whose sink does not log insert_ms
    assert "insert_busy" not in old
    text = table(medians([{"sinks": {"sink": busy, "old": old}}]), 1)
    lines = text.splitlines()
    assert "88%" in next(ln for ln in lines if ln.startswith("sink, end to end"))
    assert "%" not in next(ln for ln in lines if ln.startswith("sink old"))


def test_per_run_ratios_count_the_runs_where_both_targets_held() -> None:
    runs = [_run(60_000, 20_000, 100_000),  # 3.00x, 0.60x: both held
            _run(45_000, 15_000, 100_000),  # 3.00x, 0.45x: not the ceiling
            _run(58_000, 20_000, 80_000),  # 2.90x, 0.72x: not the reference
            _run(59_950, 20_000, 100_000),  # 2.9975x, shown as 3.00x: not the reference either
            {"sinks": {"sink": {"records_per_s": 90_000}}}]  # no yardsticks (--no-references): left out
    p = per_run(runs)
    assert p == {"runs": 4, "vs_reference": [3.0, 3.0, 2.9, 3.0], "vs_ceiling": [0.6, 0.45, 0.72, 0.6],
                 "targets_met": 1}
    text = table(medians(runs), 5)
    assert ("sink per run: 2.90-3.00x the reference (median 3.00x), 0.45-0.72x the ceiling (median 0.60x); "
            ">= 3x and >= 0.5x in the same run: 1 of 4") in text


def test_no_per_run_line_without_yardsticks() -> None:
    assert "per run" not in table(medians([{"sinks": {"sink": {"records_per_s": 90_000}}}]), 1)


def test_pool_reports_each_set_and_all_their_runs_together() -> None:
    a = {"mode": "throughput", "dataset": {"records": 200_000},
         "runs": [_run(60_000, 20_000, 100_000), _run(40_000, 20_000, 100_000)]}
    b = {"mode": "throughput", "dataset": {"records": 500_000}, "runs": [_run(70_000, 20_000, 100_000)],
         "machine": {"cpu": "AMD EPYC", "cores": 2}}
    latency = {"mode": "latency", "runs": [{}]}
    lines = pool([("a.json", a), ("lat.json", latency), ("b.json", b)])
    assert len(lines) == 3
    assert lines[0].startswith("a.json (200,000 records) per run: 2.00-3.00x") and lines[0].endswith("1 of 2")
    assert lines[1].startswith("b.json (500,000 records, AMD EPYC) per run: 3.50-3.50x") and lines[1].endswith("1 of 1")
    assert lines[2].startswith("all 2 sets per run: 2.00-3.50x the reference (median 3.00x)")
    assert lines[2].endswith("2 of 3")
    assert pool([("lat.json", latency)]) == ["no throughput runs of 'sink' with both yardsticks"]


def test_machine_line_names_the_host_and_survives_missing_facts() -> None:
    facts = {"cpu": "AMD EPYC", "cores": 2, "python": "3.11.7", "postgresql": "15.18", "load_average": [0.96, 0.7, 1.0]}
    assert machine_line(facts) == ("machine: AMD EPYC, 2 cores, Python 3.11.7, PostgreSQL 15.18, "
                                   "load average 0.96 0.7 1")
    assert machine_line({}) == "machine: ?, ? cores, Python ?, PostgreSQL ?, load average ?"
