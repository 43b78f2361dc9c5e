"""Bookkeeping of one bench run: per-lane request state, order checks, latency summaries."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100); NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(values: list[float]) -> dict[str, Any]:
    """count, mean, p50, p95, p99 and max of latencies given in seconds, in milliseconds."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None, "max": None}

    def ms(x: float) -> float:
        return round(x * 1000, 3)

    return {
        "count": len(ordered),
        "mean": ms(sum(ordered) / len(ordered)),
        "p50": ms(percentile(ordered, 50)),
        "p95": ms(percentile(ordered, 95)),
        "p99": ms(percentile(ordered, 99)),
        "max": ms(ordered[-1]),
    }


@dataclass
class LaneRecord:
    """What one lane (one user, one Session) sent and got back.

    Requests are numbered 0, 1, 2... in the order they were written to the stream; the
    client_ref of request i is ``f"{prefix}{i}"``, which is how answers and results are
    matched back. The checks:

    * answers (accepted/rejected) must come in send order;
    * results must come in send order with strictly increasing lane_seq (FIFO);
    * each accepted request gets exactly one result (else lost / duplicate);
    * a result must not come before its accepted.

    When a Session breaks (its queue replica died) and is resumed, requests it sent but
    never answered are settled by the request log: in the log, they were accepted
    (`accepted_by_log`) and their results must arrive like the others; not in it, they
    were never accepted (`never_accepted`) and need no result.
    """

    index: int
    username: str
    user_id: str = ""
    prefix: str = ""
    sent_at: list[float] = field(default_factory=list)
    measured: list[bool] = field(default_factory=list)
    accepted_at: dict[int, float] = field(default_factory=dict)
    rejected: Counter[str] = field(default_factory=Counter)
    results_by_status: Counter[str] = field(default_factory=Counter)
    done: set[int] = field(default_factory=set)
    last_answer: int = -1
    last_result: int = -1
    last_lane_seq: int = 0
    results: int = 0
    results_succeeded: int = 0
    fifo_violations: int = 0
    answer_order_violations: int = 0
    early_results: int = 0
    duplicates: int = 0
    unknown: int = 0
    lane_seq_gaps: int = 0
    progress: int = 0
    stream_error: str = ""
    in_flight: int = 0
    resumes: int = 0
    accepted_by_log: int = 0
    never_accepted: set[int] = field(default_factory=set)

    def ref(self, i: int) -> str:
        return f"{self.prefix}{i}"

    def parse_ref(self, ref: str) -> int | None:
        if not ref.startswith(self.prefix):
            return None
        try:
            i = int(ref[len(self.prefix) :])
        except ValueError:
            return None
        return i if 0 <= i < len(self.sent_at) else None

    @property
    def accepted(self) -> int:
        return len(self.accepted_at)

    @property
    def lost(self) -> int:
        """Accepted requests that never got a result."""
        return sum(1 for i in self.accepted_at if i not in self.done)

    @property
    def unanswered(self) -> int:
        """Requests sent that got neither accepted nor rejected (nor were settled by the
        log after a broken Session)."""
        return (
            len(self.sent_at)
            - self.accepted
            - sum(self.rejected.values())
            - len(self.never_accepted)
        )

    @property
    def answered(self) -> bool:
        """Some request of this lane was answered (the queue was reachable at all)."""
        return self.last_answer >= 0

    def unanswered_refs(self) -> set[int]:
        return {
            i for i in range(len(self.sent_at)) if i not in self.accepted_at and i not in self.done
        }

    def waiting(self) -> bool:
        """An accepted request has no result yet."""
        return any(i not in self.done for i in self.accepted_at)

    def on_answer(self, i: int) -> None:
        if i <= self.last_answer:
            self.answer_order_violations += 1
        self.last_answer = max(self.last_answer, i)

    def on_result(self, i: int, lane_seq: int) -> bool:
        """Checks one result; returns False for a duplicate (to be left out of figures)."""
        if i in self.done:
            self.duplicates += 1
            return False
        self.done.add(i)
        self.results += 1
        if i not in self.accepted_at:
            self.early_results += 1
        if i < self.last_result or lane_seq <= self.last_lane_seq:
            self.fifo_violations += 1
        elif self.last_lane_seq and lane_seq > self.last_lane_seq + 1:
            # Another session of the same user, or requests left over from an earlier run,
            # finished in between: not an order violation, but worth knowing.
            self.lane_seq_gaps += 1
        self.last_result = max(self.last_result, i)
        self.last_lane_seq = max(self.last_lane_seq, lane_seq)
        return True
