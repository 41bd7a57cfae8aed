"""Profiling the sink while the benchmark drives it: py-spy attached to the running process.

py-spy samples from outside (no slowdown of the sink to speak of, unlike an in-process
profiler), counts only stacks that hold the GIL or run (not idle waits), and writes collapsed
stacks; summarize() turns them into self and inclusive shares per function.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path


class PySpy:
    """`py-spy record --pid` for the life of the process (pip install py-spy; not a dependency)."""

    def __init__(self, pid: int, out: Path, rate: int = 200) -> None:
        exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if exe is None:
            raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
        self.out = out
        out.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
                                      "--nonblocking", "--function", "--output", str(out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def finish(self, timeout: float = 60) -> None:
        """Wait until py-spy has written its file (it stops when the sink exits)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(10)


# Where the loop's time goes, by the first frame (innermost first) naming a stage.  Stacks
# outside the loop (imports, startup) are left out of the breakdown.
STAGES: tuple[tuple[str, str], ...] = (
    ("classify_duplicates", "write: match RETURNING keys to rows"),
    ("write_row", "write: COPY rows into the stage"),
    ("fetchall", "write: fetch RETURNING rows"),
    ("PgWriter.write", "write: other (psycopg, SQL)"),
    ("decode (", "decode + validate"),
    ("decode_many", "decode + validate"),
    ("KafkaSource.consume", "consume (librdkafka -> SourceRecord)"),
    ("Batcher.add", "batch assembly"),
    ("Batch.", "batch assembly"),
    ("Committer.complete", "Kafka commit (DLQ + offsets)"),
    ("DlqBreaker", "DLQ breaker + outcomes"),
    ("_outcomes", "DLQ breaker + outcomes"),
    ("structlog", "logging"),
    ("_log_", "logging"),
    ("_update_gauges", "gauges"),
)
LOOP_MARKERS = ("Pipeline.run", "_WorkItem.run")


def breakdown(collapsed: Path) -> list[tuple[str, float]]:
    """Share of the loop's samples per stage (see STAGES), largest first."""
    counts: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or not any(m in stack for m in LOOP_MARKERS):
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        stage = next((label for f in reversed(frames) for key, label in STAGES if key in f), "pipeline: other")
        counts[stage] += n
    return [(stage, n / total) for stage, n in counts.most_common()] if total else []


def summarize(collapsed: Path, top: int = 25) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";") if f]
        if frames:
            own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    if not total:
        return "no samples"
    lines = [f"{total} samples (stacks running or holding the GIL)", "", "the loop's samples by stage:"]
    lines += [f"{100 * share:8.1f}%  {stage}" for stage, share in breakdown(collapsed)]
    lines += ["", "inclusive  self  function"]
    for name, n in inclusive.most_common(top):
        lines.append(f"{100 * n / total:8.1f}% {100 * own[name] / total:5.1f}%  {name}")
    lines += ["", "self-time leaders:"]
    for name, n in own.most_common(top):
        lines.append(f"{100 * n / total:8.1f}%  {name}")
    return "\n".join(lines)


def _short(frame: str) -> str:
    # "function (path/to/file.py:12)" -> "function (file.py:12)"
    name, sep, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1]}" if sep else frame
