"""Request ids carry their acceptance time (UUIDv7), even when minted fast."""

from __future__ import annotations

import itertools
import time

from uuid_utils.compat import uuid7


def test_ids_keep_the_clock_and_their_order_under_load() -> None:
    before = time.time_ns() // 1_000_000
    ids = [uuid7() for _ in range(50_000)]  # far more than one per millisecond
    after = time.time_ns() // 1_000_000
    stamps = [i.int >> 80 for i in ids]
    assert all(before <= s <= after for s in stamps)
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert {i.version for i in ids[:10]} == {7}
