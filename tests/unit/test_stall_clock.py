"""A stage's stall counts from when it got work, not from its last batch: the first
request after a long idle stretch is not a stall (it read as one of 412 s, and the queue's
health flapped), while work left unfinished still is."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from unittest.mock import MagicMock

import pytest

from fairlane_server.core.memory_broker import MemoryBroker
from fairlane_server.queue.intake import Admitted, Intake, Rejection
from fairlane_server.worker.store import Outcome
from fairlane_server.worker.writer import ResultWriter
from tests.unit.test_intake import Relay, ScriptedStore, _intake, _sub
from tests.unit.test_relay import FakeOutbox, relay_for

IDLE = 600.0  # seconds the stage has made no progress, having had nothing to do


async def test_the_intake_counts_a_stall_from_its_first_request_after_idling() -> None:
    intake = _intake(ScriptedStore(), Relay())  # not started: nothing is written
    intake._last_progress -= IDLE
    assert intake.stalled_for() == 0.0
    intake.submit(_sub())
    assert intake.stalled_for() < 5.0
    intake._last_progress -= IDLE  # the request is still waiting much later
    assert intake.stalled_for() >= IDLE


async def test_the_relay_counts_a_stall_from_its_first_handover_after_idling() -> None:
    outbox = FakeOutbox()
    relay = relay_for(outbox, MemoryBroker(lane_max_length=10))  # not started
    relay._last_progress -= IDLE
    assert relay.stalled_for() == 0.0
    user = uuid.uuid4()
    relay.hand(outbox.commit(user, 2))
    assert relay.stalled_for() < 5.0
    relay._last_progress -= IDLE
    assert relay.stalled_for() >= IDLE
    # More work while it is stalled does not hide the stall.
    relay.hand(outbox.commit(user, 1))
    assert relay.stalled_for() >= IDLE


async def test_the_result_writer_counts_a_stall_from_its_first_outcome_after_idling() -> None:
    writer = ResultWriter(MagicMock(), MemoryBroker(lane_max_length=10), batch_size=10, linger_ms=1)
    writer._last_progress -= IDLE
    assert writer.stalled_for() == 0.0
    writer.running(uuid.uuid4(), 1, datetime.now(UTC))
    assert writer.stalled_for() < 5.0
    writer._last_progress -= IDLE
    writer.finish(
        Outcome(uuid.uuid4(), uuid.uuid4(), "SUCCEEDED"), route="r", client_ref="", handler="h"
    )
    assert writer.stalled_for() >= IDLE


async def test_batches_the_log_refuses_for_its_own_reasons_are_no_progress() -> None:
    # A read-only database or a lock held: every batch is answered "unavailable", and the
    # stage looked healthy all along (it counted each refused batch as progress).
    refusing = True
    store = ScriptedStore(fail=lambda _: OSError("read-only") if refusing else None)
    intake = Intake(
        store,  # type: ignore[arg-type]
        Relay(),  # type: ignore[arg-type]
        batch_size=100,
        linger_ms=0,
        lane_limit=1000,
        transient_patience=0.0,
    )
    intake.start()
    try:
        refused = intake.submit(_sub())
        with pytest.raises(Rejection):
            await refused
        intake._last_progress -= IDLE  # long ago, and nothing written since
        waiting = intake.submit(_sub())  # the next request does not restart the clock
        assert intake.stalled_for() >= IDLE
        refusing = False
        assert isinstance(await intake.submit(_sub()), Admitted)
        await asyncio.gather(waiting, return_exceptions=True)
        assert intake.stalled_for() < 5.0
    finally:
        await intake.stop()
