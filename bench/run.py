"""One command: ``python -m bench.run`` measures the sink against the reference design and the
COPY ceiling on the same data and database (throughput mode), or produce-to-visible latency at
a steady rate (``--latency``).  ``--quick`` drains a small topic and checks correctness only."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cpuquota import CpuQuota
from bench.data import DUPLICATE_SHARE, PARTITIONS, Dataset, make_dataset, preload
from bench.latency import measure_latency
from bench.profile import summarize
from bench.references import ceiling, fresh_table, reference, reference_psycopg2
from bench.report import machine, machine_line, median_figures, medians, sink_figures, table, timed_figures
from bench.sinkrun import drain
from bench.verify import verify
from dev import services, testkit
from sink.settings import Settings

DEFAULT_RECORDS = 200_000
QUICK_RECORDS = 3_000


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def template_schema(schema: str) -> str:
    """A schema whose iot_measurements was made by the sink's own migrations (copied per run)."""
    from sink.logs import configure_logging
    from sink.migrations import migrate

    configure_logging("json", "ERROR", stream=sys.stderr)
    testkit.create_schema(schema)
    env = {k.lower(): v for k, v in services.service_env().items() if k.startswith("TIMESCALE_")}
    migrate(Settings(**env, timescale_schema=schema))  # type: ignore[arg-type]  # str values, coerced
    return schema


@dataclass(frozen=True)
class Variant:
    """One way of running the sink: its code (a directory holding sink/ and sql/) and settings."""

    label: str
    sink_dir: Path | None = None
    overrides: dict[str, str] = field(default_factory=dict)


def parse_variant(spec: str, base: dict[str, str]) -> Variant:
    """Parse LABEL[,dir=PATH][,NAME=VALUE...], e.g. "lookahead,dir=/tmp/wt" or "bs10k,BATCH_SIZE=10000"."""
    label, *items = spec.split(",")
    sink_dir: Path | None = None
    overrides = dict(base)
    for name, value in parse_overrides(items).items():
        if name == "DIR":
            sink_dir = Path(value)
        else:
            overrides[name] = value
    if not label:
        raise SystemExit(f"--variant needs a label first: {spec!r}")
    return Variant(label, sink_dir, overrides)


def throughput(*, count: int, repeat: int, variants: Sequence[Variant], references: bool, logdir: Path,
               profile: Path | None = None, pyspy: Path | None = None, keep: bool = False,
               outage: float = 0.0, psycopg2_reference: bool = False,
               duplicate_share: float = DUPLICATE_SHARE, correction_share: float = 0.0,
               quota: CpuQuota | None = None, ceiling_connections: int = 1) -> dict[str, Any]:
    """Pre-load one topic, then per run: each sink variant from a fresh group into a fresh schema
    (verified), then the COPY ceiling and the reference design into fresh copies of the table.
    Variants take turns within a run, so that the machine's changing load hits them alike."""
    data: Dataset = make_dataset(count, duplicate_share=duplicate_share, correction_share=correction_share)
    _log(f"dataset: {data.describe()}")
    topic = testkit.unique_name("bench")
    created_topics: list[str] = [topic]
    created_schemas: list[str] = []

    def new_schema(prefix: str) -> str:
        # Named for the cleanup before it exists: a run that fails half-way leaves nothing behind.
        created_schemas.append(testkit.unique_name(prefix))
        return created_schemas[-1]

    batch_size = int(variants[0].overrides.get("BATCH_SIZE", Settings.model_fields["batch_size"].default))
    runs: list[dict[str, Any]] = []
    try:
        testkit.create_topic(topic, partitions=PARTITIONS)
        t0 = time.monotonic()
        preload(topic, data.values)
        ends = testkit.end_offsets(topic)
        _log(f"pre-loaded {topic}: {ends} in {time.monotonic() - t0:.1f}s")
        template = template_schema(new_schema("bench_tpl"))
        for i in range(repeat):
            run: dict[str, Any] = {"sinks": {}, "verdicts": {}}
            for k, v in enumerate(variants):
                n = i * len(variants) + k
                schema = testkit.create_schema(new_schema("bench_sink"))
                dlq = f"{topic}.dlq{n}"
                created_topics.append(dlq)
                testkit.create_topic(dlq, partitions=PARTITIONS)
                group = testkit.unique_name("bench")
                spy_out = _numbered(pyspy, n) if pyspy else None
                d = drain(topic=topic, ends=ends, schema=schema, group=group, dlq_topic=dlq,
                          log_path=logdir / f"{topic}-{v.label}-{i}.log", overrides=v.overrides,
                          prefix=_profiler(profile, n) if profile else (), sink_dir=v.sink_dir, pyspy=spy_out,
                          outage=outage, quota=quota)
                if spy_out is not None:
                    summary = spy_out.with_suffix(".summary.txt")
                    summary.write_text(summarize(spy_out) + "\n")
                    _log(f"py-spy profile: {spy_out} (collapsed stacks), summary in {summary}")
                run["sinks"][v.label] = sink_figures(d)
                verdict = verify(data, schema=schema, topic=topic, group=group, dlq_topic=dlq, ends=ends)
                run["verdicts"][v.label] = verdict.as_dict()
                _log(f"run {i + 1}/{repeat} {v.label}: {run['sinks'][v.label]['records_per_s']:,} records/s, "
                     f"correct={verdict.ok}")
                if d.throttling:
                    t = d.throttling
                    _log(f"run {i + 1}/{repeat} {v.label}: CPU quota exhausted in {t['throttled_periods']:,} "
                         f"of {t['periods']:,} periods, {t['throttled_s']}s throttled")
                if d.incidents:
                    _log(f"run {i + 1}/{repeat} {v.label} was DISTURBED (its timing is not the sink's): {d.incidents}")
                if not keep:
                    testkit.drop_schema(schema)
            if references:
                ref_schema = fresh_table(template, new_schema("bench_ref"))
                run["ceiling"] = timed_figures(ceiling(ref_schema, data.distinct_rows, count, batch_size,
                                                       ceiling_connections))
                testkit.drop_schema(ref_schema)
                ref_schema = fresh_table(template, new_schema("bench_ref"))
                run["reference"] = timed_figures(reference(ref_schema, data.values))
                testkit.drop_schema(ref_schema)
                _log(f"run {i + 1}/{repeat} ceiling: {run['ceiling']['records_per_s']:,} records/s, "
                     f"reference: {run['reference']['records_per_s']:,} records/s")
            if psycopg2_reference:
                ref_schema = fresh_table(template, new_schema("bench_ref"))
                run["reference_psycopg2"] = timed_figures(reference_psycopg2(ref_schema, data.values))
                testkit.drop_schema(ref_schema)
                _log(f"run {i + 1}/{repeat} reference, psycopg 2 execute_batch: "
                     f"{run['reference_psycopg2']['records_per_s']:,} records/s")
            runs.append(run)
    finally:
        if not keep:
            testkit.delete_topics(created_topics)
            for s in created_schemas:
                testkit.drop_schema(s)
    return {"mode": "throughput", "dataset": data.describe(),
            "variants": {v.label: {"sink_dir": str(v.sink_dir or testkit.ROOT), "settings": _settings(v.overrides)}
                         for v in variants},
            "runs": runs, "median": medians(runs), "ceiling_connections": ceiling_connections,
            "correct": all(ok["ok"] for r in runs for ok in r["verdicts"].values())}


def _numbered(path: Path, n: int) -> Path:
    return path.with_name(f"{path.stem}-{n}{path.suffix}") if n else path


def _profiler(path: Path, n: int) -> tuple[str, ...]:
    renderer = "html" if path.suffix == ".html" else "text"
    return ("-m", "pyinstrument", "-r", renderer, "-o", str(_numbered(path, n)))


def _settings(overrides: dict[str, str]) -> dict[str, Any]:
    defaults = {name.upper(): Settings.model_fields[name].default for name in ("batch_size", "batch_timeout")}
    return {**defaults, **overrides, "KAFKA_TRANSACTIONAL": overrides.get("KAFKA_TRANSACTIONAL", "true")}


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--set expects NAME=VALUE, got {item!r}")
        out[name.upper()] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    ap.add_argument("--records", type=int, help=f"records to pre-load (default {DEFAULT_RECORDS:,}; "
                                                f"{QUICK_RECORDS:,} with --quick)")
    ap.add_argument("--repeat", type=int, help="runs per method; medians are reported (default 3; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="a small topic, one run: the correctness check of dev/test")
    ap.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    ap.add_argument("--latency", action="store_true", help="measure produce-to-visible latency at --rate")
    ap.add_argument("--rate", type=float, default=5000.0, help="records/s in latency mode (default 5000)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of producing in latency mode")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds left out of the latency figures")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="sink env var for every run, e.g. --set BATCH_SIZE=10000 (default: the sink's defaults)")
    ap.add_argument("--no-references", action="store_true", help="measure the sink only")
    ap.add_argument("--psycopg2-reference", action="store_true",
                    help="also run the reference design with psycopg 2's execute_batch itself (pip install "
                         "psycopg2-binary; not a dependency): a calibration of the psycopg 3 port")
    ap.add_argument("--profile", type=Path, help="run the sink under pyinstrument (pip install pyinstrument); "
                                                 "report to this file (.html or text)")
    ap.add_argument("--py-spy", type=Path, dest="pyspy",
                    help="attach py-spy (pip install py-spy) to the sink: collapsed stacks to this file, "
                         "a per-function summary next to it")
    ap.add_argument("--sink-dir", type=Path, help="run `python -m sink` from this directory (a copy of sink/ and "
                                                  "sql/ with a proposal applied, say); default: this checkout")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL[,dir=PATH][,NAME=VALUE...]",
                    help="compare sinks on the same data, taking turns in each run, e.g. --variant now "
                         "--variant lookahead,dir=/tmp/wt --variant big,BATCH_SIZE=10000 (repeatable)")
    ap.add_argument("--db-outage", type=float, default=0.0, metavar="SECONDS",
                    help="stop PostgreSQL this long after the first committed batch and report the sink's RSS "
                         "meanwhile; only with a private pair of servers (DEV_STATE_DIR set)")
    ap.add_argument("--duplicate-share", type=float, default=DUPLICATE_SHARE, metavar="SHARE",
                    help=f"share of records that repeat an earlier one (default {DUPLICATE_SHARE}; 0: a stream "
                         "without redelivery, where every batch is all new)")
    ap.add_argument("--correction-share", type=float, default=0.0, metavar="SHARE",
                    help="share of records that correct an earlier one (its key, another value): what "
                         "WRITE_MODE=update overwrites (--variant update,WRITE_MODE=update)")
    ap.add_argument("--ceiling-connections", type=int, metavar="N",
                    help="COPY connections of the ceiling (default: the sink's WRITE_CONCURRENCY, from --set or "
                         "its default), so that the ratio compares like with like")
    ap.add_argument("--cpu-quota", type=float, metavar="CORES",
                    help="run the sink inside a cgroup v1 cpu group limited to this many cores (0.3 = a Kubernetes "
                         "CPU limit of 300m: 30 ms per 100 ms period); needs root")
    ap.add_argument("--keep", action="store_true", help="keep topics and schemas (to inspect them)")
    ap.add_argument("--logdir", type=Path, default=testkit.ROOT / "bench" / "results" / "logs",
                    help="where the sink logs go (git-ignored)")
    args = ap.parse_args(argv)
    overrides = parse_overrides(args.set)
    if args.db_outage and not os.environ.get("DEV_STATE_DIR"):
        raise SystemExit("--db-outage stops PostgreSQL: use a private pair of servers (set DEV_STATE_DIR and the "
                         "DEV_*_PORT variables, see docs/performance.md), not the one other sessions share")
    services.start_kafka()
    services.start_postgres()
    facts = machine()
    with cpu_quota(args.cpu_quota) as quota:
        result, ok = measure(args, overrides, quota)
    result["machine"] = facts
    if quota is not None:
        result["cpu_quota_cores"] = quota.cores
    print(machine_line(result["machine"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if ok else 1


@contextlib.contextmanager
def cpu_quota(cores: float | None) -> Iterator[CpuQuota | None]:
    if not cores:
        yield None
        return
    with CpuQuota(cores) as quota:
        _log(f"sink limited to {cores:g} CPU ({quota.path})")
        yield quota


def measure(args: argparse.Namespace, overrides: dict[str, str], quota: CpuQuota | None) -> tuple[dict[str, Any], bool]:
    """The mode's runs, printed; the result document and whether it was correct."""
    if args.latency:
        timeout = float(overrides.get("BATCH_TIMEOUT", Settings.model_fields["batch_timeout"].default))
        runs = []
        for i in range(args.repeat or 3):
            runs.append(measure_latency(rate=args.rate, seconds=args.duration, warmup=args.warmup,
                                        batch_timeout=timeout, overrides=overrides, sink_dir=args.sink_dir,
                                        log_path=args.logdir / f"latency-{int(time.time())}-{i}.log", quota=quota))
            _log(f"latency run {i + 1}: p50 {runs[-1]['visible_p50_ms']} ms, p99 {runs[-1]['visible_p99_ms']} ms"
                 + (f", DISTURBED {runs[-1]['incidents']}" if runs[-1]["incidents"] else ""))
        m = median_figures(runs)
        result: dict[str, Any] = {"mode": "latency", "settings": _settings(overrides), "runs": runs, "median": m}
        m["meets_target"] = m["visible_p99_ms"] < m["target_ms"]
        print(f"latency at {m['rate']:,.0f} records/s for {m['seconds']:.0f}s, medians of {len(runs)} runs "
              f"({m['measured']:,.0f} records each after {m['warmup_s']:.0f}s warm-up)\n"
              f"  produce ack -> rows visible (batch_written):        p50 {m['visible_p50_ms']:.0f} ms, "
              f"p99 {m['visible_p99_ms']:.0f} ms, max {m['visible_max_ms']:.0f} ms\n"
              f"  produce ack -> offsets committed (batch_committed): p50 {m['committed_p50_ms']:.0f} ms, "
              f"p99 {m['committed_p99_ms']:.0f} ms\n"
              f"  target: p99 < BATCH_TIMEOUT + 250 ms = {m['target_ms']:.0f} ms: "
              f"{'met' if m['meets_target'] else 'MISSED'} (per run p99: "
              f"{', '.join(str(r['visible_p99_ms']) for r in runs)} ms)\n"
              f"  {m['batches']:.0f} batches of {m['mean_batch_rows']:.0f} records on average, write p50 "
              f"{m['write_p50_ms']:.1f} ms / p99 {m['write_p99_ms']:.1f} ms, peak RSS "
              f"{m['peak_rss_mib']:.0f} MiB, CPU {m['cpu_s']:.1f}s in {m['wall_s']:.0f}s")
        for i, r in enumerate(runs):
            if "throttling" in r:
                t = r["throttling"]
                print(f"  run {i + 1}: CPU quota exhausted in {t['throttled_periods']:,} of {t['periods']:,} periods "
                      f"({t['throttled_s']}s throttled)")
        ok = True
    else:
        quick = args.quick
        variants = [parse_variant(spec, overrides) for spec in args.variant] or [
            Variant("sink", args.sink_dir, overrides)]
        result = throughput(count=args.records or (QUICK_RECORDS if quick else DEFAULT_RECORDS),
                            repeat=args.repeat or (1 if quick else 3), variants=variants,
                            references=not args.no_references, logdir=args.logdir, profile=args.profile,
                            pyspy=args.pyspy, keep=args.keep, outage=args.db_outage,
                            psycopg2_reference=args.psycopg2_reference, duplicate_share=args.duplicate_share,
                            correction_share=args.correction_share, quota=quota,
                            ceiling_connections=args.ceiling_connections or int(overrides.get(
                                "WRITE_CONCURRENCY", Settings.model_fields["write_concurrency"].default)))
        ds = result["dataset"]
        print(f"{ds['records']:,} records ({ds['invalid']:,} invalid, {ds['distinct_rows']:,} distinct rows, "
              f"{ds['devices']:,} devices, {ds['partitions']} partitions)")
        for label, v in result["variants"].items():
            st = v["settings"]
            print(f"  {label}: BATCH_SIZE={st['BATCH_SIZE']} BATCH_TIMEOUT={st['BATCH_TIMEOUT']} from {v['sink_dir']}")
        if not args.no_references:
            print(f"  ceiling: binary COPY over {result['ceiling_connections']} connection(s)")
        print(table(result["median"], len(result["runs"])))
        disturbed = sum(1 for r in result["runs"] for f in r["sinks"].values() if f["incidents"])
        if disturbed:
            print(f"WARNING: {disturbed} sink run(s) met retries or broker errors (see the JSON's incidents); "
                  "another session may have restarted the shared broker or database")
        ok = bool(result["correct"])
        if not ok:
            bad = [v for r in result["runs"] for v in r["verdicts"].values() if not v["ok"]]
            print("INCORRECT: " + json.dumps(bad))
    return result, ok


if __name__ == "__main__":
    sys.exit(main())
