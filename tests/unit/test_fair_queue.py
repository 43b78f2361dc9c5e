"""The intake's fair queue: each key's items in order, keys taken in turn, batches bounded
in count and bytes, lingering only after a busy batch, nothing lost to a cancel."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from fairlane_server.core.tasks import cancel_and_wait
from fairlane_server.queue.fair_queue import FairQueue


def _queue(
    *,
    max_size: int = 100,
    max_cost: int = 1000,
    quantum: int = 100,
    linger: float = 0.0,
    busy_size: int = 16,
) -> FairQueue[str]:
    return FairQueue(
        max_size=max_size, max_cost=max_cost, quantum=quantum, linger=linger, busy_size=busy_size
    )


async def _turns(n: int = 10) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def _flat(batches: list[list[str]]) -> list[str]:
    return [item for batch in batches for item in batch]


def _of(batch: list[str], key: str) -> list[str]:
    return [i for i in batch if i.startswith(key)]


async def test_each_key_keeps_its_order_and_keys_take_turns() -> None:
    q = _queue(quantum=20)
    for i in range(6):
        q.put(f"a{i}", "a", 10)
    q.put("b0", "b", 10)
    q.put("c0", "c", 10)
    q.put("b1", "b", 10)
    batch = await q.next()
    assert sorted(batch) == sorted(["a0", "a1", "a2", "a3", "a4", "a5", "b0", "b1", "c0"])
    assert _of(batch, "a") == [f"a{i}" for i in range(6)]
    assert _of(batch, "b") == ["b0", "b1"]
    # One turn is worth two of a's items: b and c come before a's third.
    assert batch.index("b0") < batch.index("a2")
    assert batch.index("c0") < batch.index("a2")
    assert len(q) == 0


async def test_batches_are_bounded_in_count_and_in_bytes() -> None:
    q = _queue(max_size=4, max_cost=100, quantum=1000)
    for i in range(10):
        q.put(f"s{i}", "s", 1)
    assert await q.next() == ["s0", "s1", "s2", "s3"]
    q.drain()
    for i in range(7):
        q.put(f"l{i}", "l", 30)
    sizes = [len(await q.next()) for _ in range(3)]
    assert sizes == [3, 3, 1]  # 90 bytes, 90 bytes, the rest


async def test_an_item_over_the_byte_cap_goes_alone() -> None:
    q = _queue(max_cost=100, quantum=10)
    q.put("small0", "a", 10)
    q.put("huge", "a", 250)
    q.put("small1", "a", 10)
    q.put("other", "b", 10)
    batches = [await q.next() for _ in range(3)]
    assert ["huge"] in batches
    assert _flat(batches).count("huge") == 1
    assert _of(_flat(batches), "small") == ["small0", "small1"]
    assert len(q) == 0


async def test_a_newcomer_is_in_the_next_batch_whatever_waits_ahead() -> None:
    q = _queue(max_size=50, max_cost=1000, quantum=100)
    for i in range(500):
        q.put(f"a{i}", "a", 90)
    first = await q.next()
    assert first == [f"a{i}" for i in range(len(first))]
    q.put("b", "b", 5)
    assert "b" in await q.next()


async def test_keys_backlogged_together_get_about_the_same_bytes() -> None:
    q = _queue(max_size=1000, max_cost=1000, quantum=100)
    for i in range(100):
        q.put(f"big{i}", "big", 250)
    for i in range(1000):
        q.put(f"tiny{i}", "tiny", 5)
    taken: dict[str, int] = defaultdict(int)
    for _ in range(10):  # both stay backlogged all along
        for item in await q.next():
            taken["big" if item.startswith("big") else "tiny"] += 250 if "big" in item else 5
        # Deficit round robin: within one turn and one item of each other.
        assert abs(taken["big"] - taken["tiny"]) <= 100 + 250


async def test_a_lone_item_on_an_idle_stage_goes_at_once_and_a_busy_one_lingers() -> None:
    q = _queue(max_size=5, linger=3600.0, busy_size=3)
    q.put("x", "a", 1)
    assert await q.next() == ["x"]  # not busy: no linger
    for i in range(3):
        q.put(f"y{i}", "a", 1)
    assert await q.next() == ["y0", "y1", "y2"]  # busy from now on
    q.put("z0", "a", 1)
    task = asyncio.create_task(q.next())
    await _turns()
    assert not task.done()  # lingering for more
    for i in range(1, 5):
        q.put(f"z{i}", "b" if i % 2 else "a", 1)
    # A batch's worth waits: the linger ends.
    batch = await asyncio.wait_for(task, 10)
    assert sorted(batch) == ["z0", "z1", "z2", "z3", "z4"]


async def test_a_linger_ends_early_when_a_batch_worth_of_bytes_waits() -> None:
    q = _queue(max_size=100, max_cost=50, linger=3600.0, busy_size=2)
    q.put("a0", "a", 1)
    q.put("a1", "a", 1)
    assert len(await q.next()) == 2  # busy
    q.put("b0", "b", 10)
    task = asyncio.create_task(q.next())
    await _turns()
    assert not task.done()
    q.put("b1", "b", 45)
    assert await asyncio.wait_for(task, 10) == ["b0"]  # 55 bytes wait; b1 does not fit
    assert await q.next() == ["b1"]


async def test_a_stage_cancelled_while_it_lingers_leaves_every_item() -> None:
    q = _queue(max_size=10, linger=3600.0, busy_size=1)
    q.put("0", "a", 1)
    assert await q.next() == ["0"]
    q.put("1", "a", 1)
    task = asyncio.create_task(q.next())
    await _turns()
    q.put("2", "b", 1)
    q.put("3", "a", 1)
    task.cancel()
    async with asyncio.timeout(5):
        await cancel_and_wait(task)
    assert task.cancelled()
    left = q.drain()
    assert sorted(left) == ["1", "2", "3"]
    assert _of(left, "1") + _of(left, "3") == ["1", "3"]
    assert len(q) == 0


async def test_a_waiting_stage_wakes_for_the_first_item() -> None:
    q = _queue()
    task = asyncio.create_task(q.next())
    await _turns()
    assert not task.done()
    q.put("x", "k", 1)
    assert await asyncio.wait_for(task, 10) == ["x"]


async def test_keys_come_back_after_their_fifo_emptied() -> None:
    q = _queue(max_size=3)
    for round_ in range(3):
        for key in "abcd":
            q.put(f"{key}{round_}", key, 1)
        batches = [await q.next(), await q.next()]
        assert sorted(_flat(batches)) == sorted(f"{k}{round_}" for k in "abcd")
    assert len(q) == 0


def test_sizes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        _queue(quantum=0)


async def test_it_counts_what_each_key_has_waiting() -> None:
    # Admission reads these to share the intake's bound among the users waiting.
    q = _queue(max_size=3)
    for i in range(4):
        q.put(f"a{i}", "a", 10)
    q.put("b0", "b", 10)
    assert (q.keys, q.waiting("a"), q.waiting("b"), q.waiting("c")) == (2, 4, 1, 0)
    assert await q.next() == ["a0", "a1", "a2"]
    assert (q.keys, q.waiting("a"), q.waiting("b")) == (2, 1, 1)
    await q.next()
    assert (q.keys, q.waiting("a"), q.waiting("b"), len(q)) == (0, 0, 0, 0)
