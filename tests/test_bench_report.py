"""The benchmark's summary arithmetic (pure: no Kafka, no database)."""

from __future__ import annotations

from bench.report import medians, sink_figures, table
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
