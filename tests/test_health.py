"""HealthState: what /healthz and /readyz answer (pure; the endpoints are exercised against
the real sink in test_operability.py)."""

from __future__ import annotations

import pytest

from sink import health
from sink.health import HealthState


def ready_state() -> HealthState:
    state = HealthState(db_ok=True, broker_ok=True, assigned=3)
    state.turn()
    return state


def test_a_turning_loop_is_alive_and_ready() -> None:
    state = ready_state()
    assert state.alive()[0] and state.ready()[0]


def test_a_write_as_long_as_the_statement_timeout_is_not_a_stuck_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # The writer's statement_timeout is 120 s: a slow INSERT must not fail the liveness probe.
    state = ready_state()
    now = state.last_turn + 125
    monkeypatch.setattr(health.time, "monotonic", lambda: now)
    assert state.alive()[0]


def test_a_loop_that_has_not_turned_for_minutes_is_not_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    state = ready_state()
    now = state.last_turn + health.LOOP_STALL_SECONDS + 1
    monkeypatch.setattr(health.time, "monotonic", lambda: now)
    assert not state.alive()[0] and not state.ready()[0]


def test_a_long_migration_is_alive_but_not_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    state = ready_state()
    state.migrating = True
    now = state.last_turn + 3600  # e.g. rows moving into chunks
    monkeypatch.setattr(health.time, "monotonic", lambda: now)
    alive, info = state.alive()
    assert alive and info["migrating"] is True
    assert not state.ready()[0]


def test_a_fatal_error_is_neither_alive_nor_ready() -> None:
    state = ready_state()
    state.fatal = "DLQ breaker tripped"
    assert not state.alive()[0] and not state.ready()[0]
