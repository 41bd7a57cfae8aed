"""The watchdog ends a call stuck past its deadline, and only then (manual clock, no sleeping)."""

from __future__ import annotations

from sink.watchdog import Watchdog


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_call_stuck_past_the_deadline_is_reported_with_its_name() -> None:
    clock, fired = Clock(), []
    wd = Watchdog(90, on_expire=lambda what, s, _stack: fired.append((what, s)), clock=clock, interval=3600)
    with wd.guard("kafka_commit"):
        clock.now = 89.0
        wd.check()
        assert fired == []
        clock.now = 91.0
        wd.check()
    assert fired == [("kafka_commit", 91.0)]


def test_nothing_fires_once_the_call_returned() -> None:
    clock, fired = Clock(), []
    wd = Watchdog(1, on_expire=lambda what, s, _stack: fired.append(what), clock=clock, interval=3600)
    with wd.guard("kafka_commit"):
        clock.now = 0.5
    clock.now = 100.0
    wd.check()
    assert fired == []


def test_the_report_shows_where_the_stuck_thread_is() -> None:
    clock, stacks = Clock(), []
    wd = Watchdog(1, on_expire=lambda what, s, stack: stacks.append(stack), clock=clock, interval=3600)

    def stuck_in_a_librdkafka_call() -> None:
        clock.now = 2.0
        wd.check()  # the watchdog thread's look, made here; the stack is of the guarded thread

    with wd.guard("kafka_commit"):
        stuck_in_a_librdkafka_call()
    assert len(stacks) == 1 and "stuck_in_a_librdkafka_call" in stacks[0], stacks
