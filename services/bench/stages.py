"""Per-stage latency from the services' /metrics endpoints, over the measured phase.

The bench sees only send→accepted and accepted→result; the services time each batch
stage. Scraping their histograms before and after the measured phase and taking the
difference shows where a request's time went in this run, without a profiler.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# (histogram family, label to split by or "", name in the report, or the prefix of the
# label's value when split), in a request's order.
STAGES: list[tuple[str, str, str]] = [
    ("fairlane_stage_seconds", "stage", ""),  # intake, relay, results
    ("fairlane_queue_wait_seconds", "", "accepted to first attempt"),
    ("fairlane_handler_duration_seconds", "", "handler"),
    # Not a stage: how long a collection stood the process still, by generation.
    ("fairlane_gc_pause_seconds", "generation", "gc pause, generation "),
    # Not a stage either: how late each process's event loop ran a timer (4 samples/s).
    ("fairlane_event_loop_lag_seconds", "", "event loop lag"),
]
ORDER = ["intake", "relay", "accepted to first attempt", "handler", "results"]


@dataclass
class Histogram:
    buckets: dict[float, float] = field(default_factory=lambda: defaultdict(float))
    count: float = 0.0
    total: float = 0.0

    def minus(self, other: Histogram) -> Histogram:
        out = Histogram()
        for le, n in self.buckets.items():
            out.buckets[le] = n - other.buckets.get(le, 0.0)
        out.count = self.count - other.count
        out.total = self.total - other.total
        return out

    def quantile(self, q: float) -> float | None:
        """Linear interpolation inside the bucket holding the q-quantile (as PromQL does)."""
        if self.count <= 0:
            return None
        rank = q * self.count
        previous_le, previous_n = 0.0, 0.0
        for le in sorted(self.buckets):
            n = self.buckets[le]
            if n >= rank:
                if le == float("inf"):
                    return previous_le
                span = n - previous_n
                return previous_le + (le - previous_le) * (
                    (rank - previous_n) / span if span else 1
                )
            previous_le, previous_n = le, n
        return previous_le


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return str(reply.read().decode())


def parse(texts: list[str]) -> dict[str, Histogram]:
    """Stage histograms summed over every endpoint (and every handler)."""
    found: dict[str, Histogram] = defaultdict(Histogram)
    wanted = {family: (label, name) for family, label, name in STAGES}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in wanted:
                continue
            label, fixed = wanted[family.name]
            for sample in family.samples:
                stage = fixed + sample.labels.get(label, "") if label else fixed
                h = found[stage]
                if sample.name.endswith("_bucket"):
                    h.buckets[float(sample.labels["le"])] += sample.value
                elif sample.name.endswith("_count"):
                    h.count += sample.value
                elif sample.name.endswith("_sum"):
                    h.total += sample.value
    return found


class StageWatch:
    """Snapshots at the start and the end of the measured phase."""

    def __init__(self, urls: list[str]) -> None:
        self._urls = urls
        self._before: dict[str, Histogram] | None = None
        self._after: dict[str, Histogram] | None = None
        self.error = ""

    async def _snapshot(self) -> dict[str, Histogram] | None:
        try:
            texts = await asyncio.gather(*(asyncio.to_thread(_scrape, u) for u in self._urls))
        except OSError as exc:
            self.error = f"cannot scrape metrics: {exc}"
            return None
        return parse(list(texts))

    async def start(self) -> None:
        if self._urls:
            self._before = await self._snapshot()

    async def stop(self) -> None:
        if self._urls and self._before is not None:
            self._after = await self._snapshot()

    def report(self) -> dict[str, Any]:
        if not self._urls:
            return {}
        if self._before is None or self._after is None:
            return {"stages": {"error": self.error or "no snapshot"}}
        rows: dict[str, Any] = {}
        names = sorted(self._after, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
        for name in names:
            h = self._after[name].minus(self._before.get(name, Histogram()))
            if h.count <= 0:
                continue
            p50, p99 = h.quantile(0.5), h.quantile(0.99)
            rows[name] = {
                "count": int(h.count),
                "mean_ms": round(h.total / h.count * 1000, 2),
                "p50_ms": None if p50 is None else round(p50 * 1000, 2),
                "p99_ms": None if p99 is None else round(p99 * 1000, 2),
            }
        return {"stages": rows}
