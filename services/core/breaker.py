"""A circuit breaker per dependency, with its state in metrics.

Hand-written rather than taken from a library because it must be asyncio-native, report
how long until it half-opens (that becomes the RetryInfo delay clients get) and export its
state as a Prometheus gauge; the logic is the usual three states in a few lines.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import Gauge

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
        self._set(CLOSED)

    def _set(self, state: int) -> None:
        self.state = state
        BREAKER_STATE.labels(self.dependency).set(state)

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
