"""The bench's per-stage figures, read from the services' histograms, and the GC pause
histogram that feeds them."""

from __future__ import annotations

import gc

from prometheus_client import REGISTRY

from fairlane_server.bench.stages import parse
from fairlane_server.core.metrics import time_gc

QUEUE = """\
# TYPE fairlane_stage_seconds histogram
fairlane_stage_seconds_bucket{stage="intake",le="0.001"} 3.0
fairlane_stage_seconds_bucket{stage="intake",le="0.01"} 4.0
fairlane_stage_seconds_bucket{stage="intake",le="+Inf"} 4.0
fairlane_stage_seconds_count{stage="intake"} 4.0
fairlane_stage_seconds_sum{stage="intake"} 0.008
# TYPE fairlane_gc_pause_seconds histogram
fairlane_gc_pause_seconds_bucket{generation="2",le="0.05"} 1.0
fairlane_gc_pause_seconds_bucket{generation="2",le="+Inf"} 1.0
fairlane_gc_pause_seconds_count{generation="2"} 1.0
fairlane_gc_pause_seconds_sum{generation="2"} 0.04
"""
WORKER = """\
# TYPE fairlane_gc_pause_seconds histogram
fairlane_gc_pause_seconds_bucket{generation="2",le="0.05"} 1.0
fairlane_gc_pause_seconds_bucket{generation="2",le="+Inf"} 2.0
fairlane_gc_pause_seconds_count{generation="2"} 2.0
fairlane_gc_pause_seconds_sum{generation="2"} 0.2
# TYPE fairlane_event_loop_lag_seconds histogram
fairlane_event_loop_lag_seconds_bucket{le="0.01"} 7.0
fairlane_event_loop_lag_seconds_bucket{le="+Inf"} 8.0
fairlane_event_loop_lag_seconds_count 8.0
fairlane_event_loop_lag_seconds_sum 0.3
"""


def test_stages_keep_their_label_and_gc_pauses_are_named_by_generation() -> None:
    found = parse([QUEUE, WORKER])
    assert sorted(found) == ["event loop lag", "gc pause, generation 2", "intake"]
    assert (found["event loop lag"].count, found["event loop lag"].buckets[0.01]) == (8, 7)
    assert found["intake"].count == 4
    gc2 = found["gc pause, generation 2"]
    assert (gc2.count, round(gc2.total, 3)) == (3, 0.24)
    assert gc2.buckets[0.05] == 2
    assert gc2.buckets[float("inf")] == 3


def _count(generation: int) -> float:
    value = REGISTRY.get_sample_value(
        "fairlane_gc_pause_seconds_count", {"generation": str(generation)}
    )
    return value or 0.0


def test_every_collection_is_timed_once_by_its_generation() -> None:
    time_gc()
    time_gc()  # a second call must not time each collection twice
    before = [_count(g) for g in range(3)]
    gc.collect(2)
    gc.collect(0)
    after = [_count(g) for g in range(3)]
    assert after[2] - before[2] == 1
    # gen 0 also collects whenever allocations pass its threshold meanwhile
    assert after[0] - before[0] >= 1
