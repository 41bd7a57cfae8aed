"""A CPU quota for the sink process (a cgroup v1 `cpu` group, as Kubernetes sets for a CPU limit)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CPU_ROOT = Path("/sys/fs/cgroup/cpu")
# Kubernetes' CFS period: a limit of 300m is 30 ms of CPU per 100 ms.
PERIOD_US = 100_000


class QuotaUnavailable(RuntimeError):
    """No cgroup v1 cpu controller here, or no permission to make a group in it."""


@dataclass
class CpuQuota:
    """A cgroup holding the processes started through `wrap`, limited to `cores` CPUs.

    Use as a context manager: the group is made on entry and removed on exit (after its
    processes have ended)."""

    cores: float
    name: str = f"kafka-timescale-sink-bench-{os.getpid()}"

    @property
    def path(self) -> Path:
        return CPU_ROOT / self.name

    def __enter__(self) -> CpuQuota:
        if not (CPU_ROOT / "cpu.cfs_quota_us").exists():
            raise QuotaUnavailable(f"no cgroup v1 cpu controller at {CPU_ROOT} (cgroup v2 hosts: use systemd-run "
                                   "--scope -p CPUQuota=30% instead)")
        try:
            self.path.mkdir(exist_ok=True)
            (self.path / "cpu.cfs_period_us").write_text(f"{PERIOD_US}\n")
            (self.path / "cpu.cfs_quota_us").write_text(f"{round(self.cores * PERIOD_US)}\n")
        except PermissionError as e:
            raise QuotaUnavailable(f"cannot make {self.path} (needs root): {e}") from e
        return self

    def __exit__(self, *exc: object) -> None:
        # Fails while a process is still in it (killed, not yet reaped): the next run reuses the name.
        with contextlib.suppress(OSError):
            self.path.rmdir()

    def wrap(self, command: Sequence[str]) -> list[str]:
        """`command`, run from a shell that first moves itself into the group (so the command, its
        threads and any children start inside it: nothing runs unthrottled)."""
        procs = self.path / "cgroup.procs"
        return ["/bin/sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *command]

    def throttling(self) -> dict[str, float]:
        """The group's cpu.stat: how often the quota ran out, and for how long in total."""
        stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        return {"periods": int(stat.get("nr_periods", 0)), "throttled_periods": int(stat.get("nr_throttled", 0)),
                "throttled_s": round(int(stat.get("throttled_time", 0)) / 1e9, 2)}
