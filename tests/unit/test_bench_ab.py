"""scripts/bench_ab.py: the order of the runs, and what it reads from the bench's report."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_ab.py"


@pytest.fixture(scope="module")
def ab() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_ab", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is built.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def report(results_per_s: float, *, queue_cpu: float, valid: bool = True) -> dict[str, Any]:
    return {
        "valid": valid,
        "throughput": {"results_per_s": results_per_s},
        "seconds": {"measured": 10.0},
        "latency_ms": {"send_to_result": {"p50": 20.0, "p99": 50.0}},
        "machine": {"cpu_busy_percent": 80.0},
        "processes": [
            {"label": "queue", "cpu_seconds": queue_cpu},
            {"label": "auth", "cpu_seconds": 0.0},
        ],
    }


def test_rounds_alternate_abba_so_a_drift_weighs_on_both_sides(ab: ModuleType) -> None:
    assert ab.order(3) == [(1, "A"), (1, "B"), (2, "B"), (2, "A"), (3, "A"), (3, "B")]


def test_environments_are_name_value_pairs(ab: ModuleType) -> None:
    assert ab.parse_env('X=1 FAIRLANE_SRC="/a b"') == {"X": "1", "FAIRLANE_SRC": "/a b"}
    assert ab.parse_env("") == {}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        ab.parse_env("X=1 oops")


def test_a_run_is_judged_against_its_own_floor_and_per_result(ab: ModuleType) -> None:
    run = ab.run_of("A", 1, report(1_000.0, queue_cpu=2.0), {"messages_per_s": 20_000.0})
    assert run.ratio == pytest.approx(0.05)
    assert run.cpu_us["queue"] == pytest.approx(200.0)  # 2 s of CPU over 10,000 results
    assert (run.p50_ms, run.p99_ms, run.valid) == (20.0, 50.0, True)


def test_the_summary_takes_medians_per_side_and_counts_invalid_runs(ab: ModuleType) -> None:
    floor = {"messages_per_s": 10_000.0}
    runs = [
        ab.run_of("A", 1, report(1_000.0, queue_cpu=1.0), floor),
        ab.run_of("A", 2, report(3_000.0, queue_cpu=3.0, valid=False), floor),
        ab.run_of("A", 3, report(2_000.0, queue_cpu=4.0), floor),
        ab.run_of("B", 1, report(5_000.0, queue_cpu=5.0), floor),
    ]
    rows = ab.summary(runs)
    assert rows["A"]["ratio"] == pytest.approx(0.2)
    assert rows["A"]["results_per_s"] == pytest.approx(2_000.0)
    assert rows["A"]["queue_us"] == pytest.approx(100.0)  # median of 100, 100, 200
    assert (rows["A"]["runs"], rows["A"]["valid"]) == (3, 2)
    assert rows["B"]["ratio"] == pytest.approx(0.5)
