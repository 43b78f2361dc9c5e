"""Every refusal of an enqueue before anything is stored, each with its own message, and
what an accepted one becomes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from google.protobuf import timestamp_pb2

from fairlane.queue.v1 import queue_pb2
from fairlane_server.queue.accept_store import NewRequest
from fairlane_server.queue.catalog import HandlerCatalog
from fairlane_server.queue.store import HandlerSpec, RequestStore
from fairlane_server.queue.validation import (
    ECHO_LENGTH,
    MAX_ATTEMPTS_LIMIT,
    MAX_HANDLER_LENGTH,
    MAX_KEY_LENGTH,
    InvalidEnqueue,
    Limits,
    build_request,
)

LIMITS = Limits(max_payload_bytes=16, default_max_attempts=3, max_deadline_seconds=366 * 86400)
USER = uuid.uuid4()


class Handlers:
    """The handler list as workers registered it."""

    def __init__(self, **specs: int) -> None:
        self.specs = {name: HandlerSpec(name, attempts) for name, attempts in specs.items()}

    async def handler_specs(self) -> dict[str, HandlerSpec]:
        return self.specs


async def build(*, limits: Limits = LIMITS, **fields: Any) -> NewRequest:
    fields.setdefault("handler", "echo")
    catalog = HandlerCatalog(
        cast(RequestStore, Handlers(echo=5, plain=0, negative=-3, many=1000)), max_age_seconds=60
    )
    return await build_request(
        queue_pb2.EnqueueRequest(**fields),
        user_id=USER,
        catalog=catalog,
        limits=limits,
        request_id=uuid.uuid4(),
    )


async def refusal(*, limits: Limits = LIMITS, **fields: Any) -> str:
    with pytest.raises(InvalidEnqueue) as refused:
        await build(limits=limits, **fields)
    return str(refused.value)


def at(moment: datetime, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=int(moment.timestamp()), nanos=nanos)


# -- the handler -----------------------------------------------------------------------------


async def test_a_handler_is_required() -> None:
    assert await refusal(handler="") == "handler is required"


async def test_an_unknown_handler_is_named_in_the_refusal() -> None:
    assert await refusal(handler="nope") == "unknown handler 'nope'"


async def test_an_overlong_handler_is_unknown_and_echoed_cut_short() -> None:
    name = "h" * (MAX_HANDLER_LENGTH + 1)
    assert await refusal(handler=name) == f"unknown handler {'h' * ECHO_LENGTH + '...'!r}"


async def test_a_handler_with_a_nul_is_unknown() -> None:
    assert await refusal(handler="echo\x00") == "unknown handler 'echo\\x00'"


# -- keys and references -----------------------------------------------------------------------


@pytest.mark.parametrize("field", ["idempotency_key", "client_ref"])
async def test_keys_up_to_the_limit_pass_and_longer_ones_are_refused(field: str) -> None:
    longest: dict[str, Any] = {field: "k" * MAX_KEY_LENGTH}
    await build(**longest)
    too_long: dict[str, Any] = {field: "k" * (MAX_KEY_LENGTH + 1)}
    message = await refusal(**too_long)
    assert message == f"{field} is longer than {MAX_KEY_LENGTH} characters"


@pytest.mark.parametrize("field", ["idempotency_key", "client_ref"])
async def test_keys_with_a_nul_are_refused(field: str) -> None:
    with_nul: dict[str, Any] = {field: "a\x00b"}
    assert await refusal(**with_nul) == f"{field} must not contain NUL characters"


# -- payload and attempts ----------------------------------------------------------------------


async def test_a_payload_up_to_the_limit_passes_and_a_larger_one_is_refused() -> None:
    await build(payload=b"x" * 16)
    assert await refusal(payload=b"x" * 17) == "payload is 17 bytes; the limit is 16"


async def test_max_attempts_up_to_the_limit_pass_and_more_are_refused() -> None:
    assert (await build(max_attempts=MAX_ATTEMPTS_LIMIT)).max_attempts == MAX_ATTEMPTS_LIMIT
    message = await refusal(max_attempts=MAX_ATTEMPTS_LIMIT + 1)
    assert message == f"max_attempts must be at most {MAX_ATTEMPTS_LIMIT}"


async def test_attempts_come_from_the_request_then_the_handler_then_the_default() -> None:
    assert (await build(max_attempts=7)).max_attempts == 7
    assert (await build()).max_attempts == 5  # echo's own
    assert (await build(handler="plain")).max_attempts == LIMITS.default_max_attempts
    # Registered by a worker that did not check its handlers: not passed on to requests
    # (a negative one stopped their lanes: a lane message cannot carry it).
    assert (await build(handler="negative")).max_attempts == LIMITS.default_max_attempts
    assert (await build(handler="many")).max_attempts == LIMITS.default_max_attempts


# -- deadlines ---------------------------------------------------------------------------------


async def test_a_deadline_ahead_within_the_limit_is_kept() -> None:
    soon = datetime.now(UTC) + timedelta(hours=1)
    request = await build(deadline=at(soon, nanos=500_000_000))
    assert request.deadline == soon.replace(microsecond=500_000)


async def test_a_deadline_that_has_passed_is_refused() -> None:
    past = datetime.now(UTC) - timedelta(seconds=1)
    assert await refusal(deadline=at(past)) == "deadline has already passed"


async def test_a_deadline_beyond_the_limit_is_refused_with_the_limit() -> None:
    far = datetime.now(UTC) + timedelta(days=367)
    assert await refusal(deadline=at(far)) == "deadline is more than 366 days ahead"
    hour = Limits(max_payload_bytes=16, default_max_attempts=3, max_deadline_seconds=3600)
    later = datetime.now(UTC) + timedelta(hours=2)
    assert (
        await refusal(limits=hour, deadline=at(later)) == "deadline is more than 3600 seconds ahead"
    )


@pytest.mark.parametrize("nanos", [-1, 1_000_000_000])
async def test_deadline_nanos_out_of_range_are_refused(nanos: int) -> None:
    soon = datetime.now(UTC) + timedelta(hours=1)
    message = await refusal(deadline=at(soon, nanos=nanos))
    assert message == "deadline.nanos must be in [0, 999999999]"


@pytest.mark.parametrize("seconds", [253_402_300_800, -62_135_596_801, 2**62])
async def test_a_timestamp_outside_what_a_timestamp_can_be_is_refused(seconds: int) -> None:
    # After 9999-12-31, before 0001-01-01, or far beyond either.
    deadline = timestamp_pb2.Timestamp(seconds=seconds)
    assert await refusal(deadline=deadline) == "deadline is not a valid timestamp"


# -- what an accepted enqueue becomes ----------------------------------------------------------


async def test_an_accepted_enqueue_carries_its_fields_and_an_empty_key_is_none() -> None:
    request = await build(handler="echo", payload=b"hi", client_ref="r1")
    assert (request.user_id, request.handler, request.payload) == (USER, "echo", b"hi")
    assert (request.client_ref, request.idempotency_key, request.deadline) == ("r1", None, None)
    keyed = await build(idempotency_key="k1")
    assert keyed.idempotency_key == "k1"
