"""A failing assertion over large values fails in seconds with a bounded message, under CI too
(pytest stops truncating there by default)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def probe_large_results_differ() -> None:
    """Fails on purpose; run only by the test below (pytest collects `test_*`, not `probe_*`).
    The shape of a writer result over 3,000-row batches: thousands of tuples, most different."""
    got = [(i, f"dev-{i}", "temperature", 21.5) for i in range(0, 9000, 3)]
    expected = [(i, f"dev-{i}", "temperature", 21.5) for i in range(0, 9000, 2)]
    assert got == expected


def test_a_failing_assertion_on_large_values_is_short_and_quick_under_ci() -> None:
    env = {**os.environ, "CI": "true", "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-o", "python_functions=probe_*", f"{Path(__file__).relative_to(ROOT)}"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0

    assert run.returncode == 1, run.stdout[-3000:]  # 1: the probe ran and failed
    assert "1 failed" in run.stdout
    assert "AssertionError" in run.stdout and "Full output truncated" in run.stdout
    # Unbounded, this message is ~0.9 MB (3,000 rows each side); it took 17 minutes on larger ones.
    assert len(run.stdout) < 20_000, f"{len(run.stdout)} characters of output"
    assert elapsed < 60
