"""sink.metrics: the process and container series the alerts rely on, and sink_ready."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sink import metrics as sink_metrics
from sink.health import HealthState, serve
from sink.metrics import Metrics, memory_limit_bytes


def test_cgroup_v2_limit_is_read(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("536870912\n")
    assert memory_limit_bytes((tmp_path / "memory.max",)) == 512 * 1024 * 1024


def test_unlimited_cgroups_have_no_limit(tmp_path: Path) -> None:
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    v2.write_text("max\n")
    v1.write_text("9223372036854771712\n")  # cgroup v1's "no limit"
    assert memory_limit_bytes((v2,)) is None
    assert memory_limit_bytes((tmp_path / "missing", v1)) is None
    assert memory_limit_bytes((tmp_path / "missing",)) is None


def test_memory_limit_is_exported_only_under_a_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sink_metrics, "memory_limit_bytes", lambda: 1 << 30)
    limited = {s.name: s.value for f in Metrics().registry.collect() for s in f.samples}
    monkeypatch.setattr(sink_metrics, "memory_limit_bytes", lambda: None)
    unlimited = {s.name for f in Metrics().registry.collect() for s in f.samples}

    assert limited["sink_memory_limit_bytes"] == 1 << 30
    assert "sink_memory_limit_bytes" not in unlimited
    assert limited["process_resident_memory_bytes"] > 0 and limited["process_start_time_seconds"] > 0


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_sink_ready_follows_the_readiness_probe() -> None:
    state = HealthState(db_ok=True, broker_ok=True, assigned=1)
    state.turn()
    server = serve("127.0.0.1", 0, state, Metrics())
    try:
        port = server.server_address[1]
        assert scrape(port)["sink_ready"] == 1
        state.db_ok = False
        assert scrape(port)["sink_ready"] == 0
    finally:
        server.shutdown()
