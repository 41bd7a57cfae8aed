"""A deadline for calls that can hang inside librdkafka, where Python cannot interrupt them.

librdkafka 2.x can ignore the timeout of send_offsets_to_transaction() when the broker dies
around the call (confluentinc/librdkafka#5456, #5511): the loop would stop turning for ever.  The
watchdog ends the process instead (exit code 75, "try again"): nothing is lost, because the
batch's offsets were not committed and its rows are absorbed by the idempotent insert after the
supervisor's restart (compose: restart: unless-stopped).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sink.logs import get_logger

log = get_logger("sink.watchdog")

EXIT_STUCK = 75  # EX_TEMPFAIL


def _exit(what: str, elapsed: float, stack: str) -> None:
    log.critical("fatal_error", cause=what, latency_ms=round(elapsed * 1000), stack=stack,
                 reason=f"{what} did not return in {elapsed:.0f}s (a hung librdkafka call); exiting for a restart")
    os._exit(EXIT_STUCK)  # the stuck call holds the main thread: a normal exit cannot run


class Watchdog:
    def __init__(self, limit: float, on_expire: Callable[[str, float, str], None] = _exit,
                 clock: Callable[[], float] = time.monotonic, interval: float = 1.0) -> None:
        self.limit = limit
        self._on_expire = on_expire
        self._clock = clock
        self._interval = interval
        self._armed: tuple[str, float, int] | None = None  # what, since, the thread in it
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run the block under the deadline."""
        self._ensure_thread()
        with self._lock:
            self._armed = (what, self._clock(), threading.get_ident())
        try:
            yield
        finally:
            with self._lock:
                self._armed = None

    def check(self) -> None:
        """One look at the clock (the thread calls this every `interval`; tests call it directly)."""
        with self._lock:
            armed = self._armed
        if armed is not None:
            elapsed = self._clock() - armed[1]
            if elapsed > self.limit:
                self._on_expire(armed[0], elapsed, _stack_of(armed[2]))

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self._interval)
            self.check()


def _stack_of(thread_id: int, frames: int = 8) -> str:
    """The innermost frames of a thread: which call hung, for the bug report (which librdkafka
    call ignores its timeout is not otherwise visible: the log stops at the call)."""
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return "(thread gone)"
    return "".join(traceback.format_stack(frame, limit=frames)).rstrip()
