"""Peak RSS and CPU seconds of a process, sampled from /proc in a background thread (Linux)."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of the process so far, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            # The command name may contain spaces: fields start after its closing parenthesis.
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


def socket_ports(pid: int, remote_port: int) -> list[int]:
    """Local TCP ports of the process's sockets connected to `remote_port` (e.g. PostgreSQL's)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    except OSError:
        return []
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and int(parts[9]) in inodes and int(parts[2].rsplit(":", 1)[1], 16) == remote_port:
                ports.append(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in KiB; empty once the process is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, value = line.split(":", 1)
                    out[name] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


@dataclass
class Sampler:
    """Samples (wall time, CPU seconds, RSS KiB) every `interval` seconds until stopped."""

    pid: int
    interval: float = 0.05
    samples: list[tuple[float, float, int]] = field(default_factory=list)
    peak_kib: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        cpu = cpu_seconds(self.pid)
        mem = memory_kib(self.pid)
        if cpu is None or not mem:
            return
        self.peak_kib = max(self.peak_kib, mem.get("VmHWM", 0), mem.get("VmRSS", 0))
        self.samples.append((time.time(), cpu, mem.get("VmRSS", 0)))

    def stop(self) -> None:
        """Stop sampling (call before the process exits: VmHWM is read from the live process)."""
        self.sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def cpu_between(self, start: float, end: float) -> float:
        """CPU seconds spent between two wall-clock times (nearest samples outside the window)."""
        before = [c for t, c, _ in self.samples if t <= start]
        after = [c for t, c, _ in self.samples if t >= end]
        first = before[-1] if before else (self.samples[0][1] if self.samples else 0.0)
        last = after[0] if after else (self.samples[-1][1] if self.samples else 0.0)
        return max(0.0, last - first)

    def peak_rss_between(self, start: float, end: float) -> int:
        """Highest sampled RSS (KiB) in a window: the steady state, without the startup peak."""
        inside = [r for t, _, r in self.samples if start <= t <= end]
        return max(inside, default=0)
