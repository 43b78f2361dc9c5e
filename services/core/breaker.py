"""A circuit breaker per dependency, with its state in metrics.

Hand-written rather than taken from a library because it must be asyncio-native, report
how long until it half-opens (that becomes the RetryInfo delay clients get) and export its
state as a Prometheus gauge; the logic is the usual three states in a few lines.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import Gauge

from fairlane_server.core.audit import audit

BREAKER_STATE = Gauge(
    "fairlane_breaker_state",
    "Circuit breaker state per dependency: 0 closed, 1 half-open, 2 open.",
    ["dependency"],
)
CLOSED, HALF_OPEN, OPEN = 0, 1, 2


class CircuitOpen(Exception):
    def __init__(self, dependency: str, retry_after: float) -> None:
        super().__init__(f"{dependency} is unavailable (circuit open)")
        self.retry_after = retry_after


class CircuitBreaker:
    """Opens after `threshold` consecutive failures; after `reset_seconds` lets one trial
    call through (half-open); a success closes it, a failure opens it again."""

    def __init__(
        self,
        dependency: str,
        *,
        threshold: int = 5,
        reset_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dependency = dependency
        self._clock = clock
        self._threshold = threshold
        self._reset = reset_seconds
        self._failures = 0
        self._opened_at = 0.0
        self._trial_running = False
        # When it left CLOSED and how many trials failed since: for the `breaker.closed`
        # line, so that an outage is two lines however long it lasts.
        self._outage_started = 0.0
        self._failed_trials = 0
        self.state = CLOSED
        BREAKER_STATE.labels(self.dependency).set(CLOSED)

    def _set(self, state: int) -> None:
        before, self.state = self.state, state
        BREAKER_STATE.labels(self.dependency).set(state)
        if before == CLOSED and state == OPEN:
            self._outage_started = self._clock()
            self._failed_trials = 0
            audit(
                "breaker.opened",
                None,
                peer=None,
                dependency=self.dependency,
                failures=self._failures,
                retry_after_s=self._reset,
            )
        elif before == HALF_OPEN and state == OPEN:
            # The trial failed: the outage goes on. Not a line each (one per reset period).
            self._failed_trials += 1
        elif before != CLOSED and state == CLOSED:
            audit(
                "breaker.closed",
                None,
                peer=None,
                dependency=self.dependency,
                open_for_s=round(self._clock() - self._outage_started, 3),
                failed_trials=self._failed_trials,
            )

    def before_call(self) -> None:
        """Raises CircuitOpen when calls must not go through now."""
        if self.state == CLOSED:
            return
        remaining = self._opened_at + self._reset - self._clock()
        if self.state == OPEN and remaining <= 0:
            self._set(HALF_OPEN)
            self._trial_running = False
        if self.state == HALF_OPEN and not self._trial_running:
            self._trial_running = True
            return
        raise CircuitOpen(self.dependency, max(remaining, 0.1))

    def success(self) -> None:
        self._failures = 0
        if self.state != CLOSED:
            self._set(CLOSED)

    def failure(self) -> None:
        self._failures += 1
        if self.state == HALF_OPEN or self._failures >= self._threshold:
            self._opened_at = self._clock()
            self._set(OPEN)

    @property
    def is_open(self) -> bool:
        return self.state == OPEN and self._clock() < self._opened_at + self._reset
