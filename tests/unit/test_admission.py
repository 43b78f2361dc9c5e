"""Admission before anything is stored: a token bucket per user, and the bound on requests
waiting for their durable write on this replica, shared among the users waiting."""

from __future__ import annotations

import time

import pytest

from fairlane_server.queue.admission import Admission, TokenBuckets
from fairlane_server.queue.intake import Load, Rejection


def test_a_full_bucket_grants_its_burst_then_says_how_long_to_wait() -> None:
    buckets = TokenBuckets(rate=2.0, burst=3)
    assert [buckets.take("alice", now=100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    # Empty: one token comes back after 1 / rate seconds.
    assert buckets.take("alice", now=100.0) == pytest.approx(0.5)
    assert buckets.take("alice", now=100.25) == pytest.approx(0.25)


def test_tokens_come_back_at_the_rate_and_never_beyond_the_burst() -> None:
    buckets = TokenBuckets(rate=2.0, burst=3)
    for _ in range(3):
        buckets.take("alice", now=0.0)
    assert buckets.take("alice", now=0.5) == 0.0  # one token back after half a second
    assert buckets.take("alice", now=0.5) > 0
    # A long idle spell refills to the burst, no further.
    assert [buckets.take("alice", now=3600.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("alice", now=3600.0) > 0


def test_a_refused_take_costs_nothing() -> None:
    buckets = TokenBuckets(rate=1.0, burst=1)
    assert buckets.take("alice", now=0.0) == 0.0
    for _ in range(5):  # refused takes must not push the next token further away
        assert buckets.take("alice", now=0.5) == pytest.approx(0.5)
    assert buckets.take("alice", now=1.0) == 0.0


def test_each_user_has_a_bucket_of_their_own() -> None:
    buckets = TokenBuckets(rate=1.0, burst=1)
    assert buckets.take("alice", now=0.0) == 0.0
    assert buckets.take("alice", now=0.0) > 0
    assert buckets.take("bob", now=0.0) == 0.0


def test_idle_users_are_forgotten_so_memory_follows_the_active_ones() -> None:
    buckets = TokenBuckets(rate=10.0, burst=10, forget_after=60.0)
    start = time.monotonic()
    for i in range(1000):
        buckets.take(f"user-{i}", now=start)
    assert len(buckets._buckets) == 1000  # the buckets' memory: no public view of it
    # Long after they were full again, one take by someone else sweeps them away.
    buckets.take("active", now=start + 61.0)
    assert list(buckets._buckets) == ["active"]


def _admission(*, rate: float = 1000.0, burst: int = 1000, max_pending: int = 10) -> Admission:
    return Admission(rate=rate, burst=burst, max_pending=max_pending, overload_retry_after_ms=500)


def _load(waiting: int = 0, *, behind: int = 0, own: int = 0, users: int = 0) -> Load:
    return Load(waiting=waiting, behind=behind, own=own, users=users)


IDLE = _load()


def test_under_the_bound_everybody_is_admitted() -> None:
    admission = _admission(max_pending=10)
    admission.check("alice", _load(9, own=9, users=1))
    admission.check("bob", _load(5, behind=4, own=0, users=1))


def test_a_replica_behind_on_its_writes_refuses_everybody_as_overloaded() -> None:
    # Ten requests in a batch or waiting for their publish: the log or the broker is slow,
    # and nobody's share would help.
    admission = _admission(max_pending=10)
    for user, load in [
        ("alice", _load(0, behind=10)),
        ("bob", _load(3, behind=10, own=3, users=1)),
    ]:
        with pytest.raises(Rejection) as refused:
            admission.check(user, load)
        assert (refused.value.reason, refused.value.retry_after_ms) == ("overloaded", 500)
        assert "overloaded" in str(refused.value)


def test_the_user_who_filled_the_bound_waits_and_the_others_are_still_admitted() -> None:
    admission = _admission(max_pending=10)
    full = _load(10, own=10, users=1)
    with pytest.raises(Rejection) as refused:
        admission.check("alice", full)
    assert (refused.value.reason, refused.value.retry_after_ms) == ("over_share", 500)
    assert "you have 10 requests waiting" in str(refused.value)
    # Bob has nothing waiting: his share is 10 / 2 users, and he is let in up to it.
    for own in range(5):
        admission.check("bob", _load(10 + own, own=own, users=2 if own else 1))
    with pytest.raises(Rejection, match="more than your share"):
        admission.check("bob", _load(15, own=5, users=2))


def test_past_twice_the_bound_everybody_is_refused_so_memory_stays_bounded() -> None:
    # Many users share the overflow: each holds less than a share, but the sum is bounded.
    admission = _admission(max_pending=10)
    admission.check("newcomer", _load(19, own=0, users=50))
    with pytest.raises(Rejection) as refused:
        admission.check("newcomer", _load(20, own=0, users=50))
    assert refused.value.reason == "overloaded"


def test_an_overloaded_refusal_takes_no_token_from_the_user() -> None:
    admission = _admission(rate=0.001, burst=1, max_pending=1)
    with pytest.raises(Rejection, match="overloaded"):
        admission.check("alice", _load(0, behind=1))
    with pytest.raises(Rejection, match="more than your share"):
        admission.check("alice", _load(1, own=1, users=1))
    admission.check("alice", IDLE)  # the one token is still there


def test_a_user_over_their_rate_is_told_when_a_token_comes_back() -> None:
    admission = _admission(rate=0.001, burst=2)  # one token every 1000 s
    admission.check("alice", IDLE)
    admission.check("alice", IDLE)
    with pytest.raises(Rejection) as refused:
        admission.check("alice", IDLE)
    assert refused.value.reason == "rate_limited"
    # About 1000 s, in milliseconds (less the moment since the last take).
    assert 999_000 < refused.value.retry_after_ms <= 1_000_000
    admission.check("bob", IDLE)  # someone else is not held back
