"""Lane rebalancing: each worker replica converges to its fair share of the busy lanes.

With single active consumer, every worker consumes every lane but only the first one
registered receives its messages, and keeps the lane until it lets go: workers started
later get nothing. So each replica, every `interval` seconds:

1. counts the lanes it is the active consumer of: those delivered to it within
   `busy_window` seconds (an idle lane does not matter, whoever holds it);
2. records that count with a heartbeat in the workers table and reads every live
   replica's (presence.py): the fair share is ceil(busy lanes in all / live replicas);
3. if it holds more than its share, it releases the excess, one lane at a time: it lets
   the lane finish the message in progress and stop at that boundary, waits until every
   finished message's results are written, published and acked, then Runner.remove_lane
   hands it back (the unacked rest returns to the lane in order) and the broker activates
   the lane's next waiting consumer, another replica.
   So the old holder has published every result it produced before the new holder
   produces one: the lane's results reach its sessions in order. Runner.add_lane then
   registers this replica again, at the back of the lane's waiting consumers.

A replica never takes lanes: it only lets go of its excess, and the others' waiting
consumers take them. Counts lag a release by up to `busy_window` (the receiver's count
grows as its deliveries arrive), so after a release a replica waits `settle` seconds
before it releases again: no overshoot from a stale total. Lanes that are between
messages are released first.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.exc import SQLAlchemyError

from fairlane_server.core import metrics
from fairlane_server.core.broker import BrokerError
from fairlane_server.core.describe import describe_error
from fairlane_server.core.logging import get_logger
from fairlane_server.core.tasks import cancel_and_wait
from fairlane_server.worker.presence import PresenceStore
from fairlane_server.worker.runner import Runner, RunnerState

log = get_logger(__name__)


def fair_share(busy_lanes: int, workers: int) -> int:
    """The most busy lanes one of `workers` replicas should hold."""
    return math.ceil(busy_lanes / max(workers, 1))


@dataclass(frozen=True, slots=True)
class Round:
    """What one round saw and did."""

    busy: int
    workers: int
    total: int
    share: int
    released: int


class Rebalancer:
    def __init__(
        self,
        runner: Runner,
        presence: PresenceStore,
        *,
        worker_id: str,
        interval: float = 2.0,
        busy_window: float = 5.0,
        settle: float | None = None,
        handover_timeout: float = 10.0,
    ) -> None:
        self._runner = runner
        self._presence = presence
        self._worker_id = worker_id
        self._interval = interval
        self._busy_window = busy_window
        self._settle = settle if settle is not None else busy_window + 2 * interval
        self._handover_timeout = handover_timeout
        self._started_at = datetime.now(UTC)
        self._released_at = -math.inf
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lane-rebalancer")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        with contextlib.suppress(SQLAlchemyError, OSError):
            await self._presence.leave(self._worker_id)

    async def _run(self) -> None:
        while True:
            # Jitter keeps replicas from deciding in lockstep on the same counts.
            await asyncio.sleep(self._interval * random.uniform(0.8, 1.2))
            try:
                await self.round()
            except (SQLAlchemyError, OSError) as exc:
                log.warning("rebalance_failed", error=describe_error(exc)[:200])
            except Exception:
                # A loop that runs for the process's life: one bad round must not end it.
                log.exception("rebalance_failed_unexpectedly")

    def busy_lanes(self) -> list[str]:
        """Lanes this replica is the active consumer of (a delivery within busy_window)."""
        since = time.monotonic() - self._busy_window
        return [
            user_id
            for user_id, lane in list(self._runner.lanes.items())
            if lane.consumer is not None
            and lane.consumer.alive
            and lane.consumer.last_delivery > since
        ]

    async def round(self) -> Round:
        busy = self.busy_lanes()
        metrics.BUSY_LANES.set(len(busy))
        peers = await self._presence.beat(
            self._worker_id,
            len(busy),
            started_at=self._started_at,
            alive_for=3 * self._interval + 1,
        )
        total = sum(p.busy_lanes for p in peers)
        share = fair_share(total, len(peers))
        excess = len(busy) - share
        released = 0
        if (
            excess > 0
            and len(peers) > 1
            and self._runner.state == RunnerState.RUNNING
            and time.monotonic() - self._released_at >= self._settle
        ):
            released = await self._release(self._pick(busy, excess))
            self._released_at = time.monotonic()
            log.info(
                "lanes_rebalanced",
                released=released,
                busy=len(busy),
                share=share,
                workers=len(peers),
                busy_in_all=total,
            )
        return Round(len(busy), len(peers), total, share, released)

    def _pick(self, busy: list[str], count: int) -> list[str]:
        """`count` lanes to let go of: those between messages first, at random."""
        lanes = self._runner.lanes
        quiet = [u for u in busy if u in lanes and lanes[u].quiet.is_set()]
        working = [u for u in busy if u not in set(quiet)]
        random.shuffle(quiet)
        random.shuffle(working)
        return (quiet + working)[:count]

    async def _release(self, lanes: list[str]) -> int:
        released = 0
        for user_id in lanes:
            if await self._hand_over(user_id):
                released += 1
                metrics.LANES_RELEASED.inc()
        return released

    async def _hand_over(self, user_id: str) -> bool:
        lane = self._runner.lanes.get(user_id)
        if lane is None or not lane.resumed.is_set():
            return False  # gone meanwhile, or paused by an operator: left alone
        # Between messages only: the message in progress is finished, its outcomes written
        # and acked, so the next holder starts exactly where this one stopped.
        if not await lane.finish_message(self._handover_timeout):
            return False  # a long request: it finishes here; the lane may move later
        await lane.settled_acks()
        await self._runner.remove_lane(user_id, finish_current=0)
        try:
            # At the back of the lane's waiting consumers: the lane comes back here only
            # if the others let go of it, or die.
            await self._runner.add_lane(user_id)
        except BrokerError as exc:
            # Deleted meanwhile, or the broker is away: discovery brings it back.
            log.warning("lane_rejoin_failed", lane=user_id, error=describe_error(exc)[:200])
        return True
