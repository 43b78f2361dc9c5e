"""The circuit breaker: open after consecutive failures, one trial call once the reset time
has passed, closed by a success; its state is exported per dependency."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from fairlane_server.core.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, CircuitOpen


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _breaker(clock: Clock, dependency: str = "db") -> CircuitBreaker:
    return CircuitBreaker(dependency, threshold=3, reset_seconds=2.0, clock=clock)


def _exported(dependency: str) -> float | None:
    return REGISTRY.get_sample_value("fairlane_breaker_state", {"dependency": dependency})


def test_it_opens_after_threshold_consecutive_failures() -> None:
    breaker = _breaker(Clock())
    for _ in range(2):
        breaker.before_call()
        breaker.failure()
    assert breaker.state == CLOSED
    breaker.before_call()
    breaker.failure()
    assert breaker.state == OPEN
    assert breaker.is_open


def test_a_success_starts_the_count_again() -> None:
    breaker = _breaker(Clock())
    for _ in range(10):
        breaker.failure()
        breaker.failure()
        breaker.success()
    assert breaker.state == CLOSED
    breaker.before_call()


def test_while_open_calls_are_refused_with_the_time_until_the_trial() -> None:
    clock = Clock()
    breaker = _breaker(clock)
    for _ in range(3):
        breaker.failure()
    clock.now += 0.5
    with pytest.raises(CircuitOpen) as refused:
        breaker.before_call()
    assert refused.value.retry_after == pytest.approx(1.5)
    assert "db is unavailable" in str(refused.value)


def test_after_the_reset_time_one_trial_goes_through_and_its_success_closes() -> None:
    clock = Clock()
    breaker = _breaker(clock)
    for _ in range(3):
        breaker.failure()
    clock.now += 2.0
    assert not breaker.is_open
    breaker.before_call()  # the trial
    assert breaker.state == HALF_OPEN
    with pytest.raises(CircuitOpen) as refused:
        breaker.before_call()  # a second caller while the trial runs
    assert refused.value.retry_after > 0  # never "retry in 0 s"
    breaker.success()
    assert breaker.state == CLOSED
    breaker.before_call()
    breaker.before_call()


def test_a_failed_trial_opens_it_again_for_a_full_reset_time() -> None:
    clock = Clock()
    breaker = _breaker(clock)
    for _ in range(3):
        breaker.failure()
    clock.now += 2.0
    breaker.before_call()
    breaker.failure()  # one failure is enough in half-open
    assert breaker.state == OPEN
    clock.now += 1.0
    with pytest.raises(CircuitOpen) as refused:
        breaker.before_call()
    assert refused.value.retry_after == pytest.approx(1.0)


def test_its_state_is_exported_per_dependency() -> None:
    clock = Clock()
    breaker = _breaker(clock, dependency="test-breaker-export")
    other = _breaker(clock, dependency="test-breaker-other")
    assert _exported("test-breaker-export") == CLOSED
    for _ in range(3):
        breaker.failure()
    assert _exported("test-breaker-export") == OPEN
    clock.now += 2.0
    breaker.before_call()
    assert _exported("test-breaker-export") == HALF_OPEN
    breaker.success()
    assert _exported("test-breaker-export") == CLOSED
    assert other.state == CLOSED
    assert _exported("test-breaker-other") == CLOSED


def test_an_outage_is_audited_as_two_lines_however_many_trials_fail() -> None:
    clock = Clock()
    breaker = _breaker(clock, "audited-db")
    with capture_logs() as logs:
        for _ in range(3):
            breaker.before_call()
            breaker.failure()
        # Calls that were in flight fail after it opened: no new line.
        breaker.failure()
        for _ in range(4):
            clock.now += 2.0
            breaker.before_call()  # the trial
            breaker.failure()
        clock.now += 2.0
        breaker.before_call()
        breaker.success()
    audited = [(e["event"], e) for e in logs if e.get("audit")]
    assert [name for name, _ in audited] == ["breaker.opened", "breaker.closed"]
    opened, closed = audited[0][1], audited[1][1]
    assert opened["dependency"] == closed["dependency"] == "audited-db"
    assert opened["failures"] == 3
    assert opened["principal"] is None
    assert closed["failed_trials"] == 4
    assert closed["open_for_s"] == 10.0
