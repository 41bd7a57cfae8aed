"""bench/cpuquota.py: a process started through the quota runs inside its cgroup and is throttled."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from bench.cpuquota import CpuQuota, QuotaUnavailable
from bench.report import sink_figures
from tests.test_bench_report import _drain

# Spins for a second of wall time, then prints the cgroups it ran in.
BUSY = ("import time\nend = time.monotonic() + 1.0\nwhile time.monotonic() < end: pass\n"
        "print(open('/proc/self/cgroup').read())")


def test_a_wrapped_process_runs_in_the_group_and_is_held_to_the_quota() -> None:
    try:
        quota = CpuQuota(0.1, name=f"kafka-timescale-sink-test-{os.getpid()}")
        with quota:
            res = subprocess.run(quota.wrap([sys.executable, "-c", BUSY]), capture_output=True, text=True, timeout=60)
            throttled = quota.throttling()
            path = quota.path
    except QuotaUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs as root on a host with the cgroup v1 cpu controller: {e}")
        pytest.skip(str(e))

    assert res.returncode == 0, res.stderr
    assert f"cpu:/{quota.name}" in res.stdout.replace(",cpuacct", "")  # inside, not merely next to it
    # One second of wall time spinning at 10% of a core: throttled in most 100 ms periods.
    assert throttled["throttled_periods"] >= 5, throttled
    assert not path.exists(), "the group is removed on exit"


def test_throttling_is_reported_only_for_quota_runs() -> None:
    plain = sink_figures(_drain(None))
    throttling = {"periods": 40, "throttled_periods": 3, "throttled_s": 0.1}
    limited = sink_figures(dataclasses.replace(_drain(None), throttling=throttling))

    assert "throttling" not in plain
    assert limited["throttling"] == throttling
