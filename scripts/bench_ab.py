"""A/B two settings (or two source trees) of the services on one bench suite, on a host
whose speed moves.

This machine's speed can halve within the hour (the gRPC floor fell from 32,169 to
19,326 messages/s in fifteen minutes), so a figure is only comparable with figures taken
minutes around it. Each round runs A and B back to back, in ABBA order (A B, then B A),
restarting the queue and the worker with each side's environment, and measures the
floor (scripts/grpc_floor.py) right after every run: a side is judged by its results/s
as a ratio to that floor and by its CPU per result, pooled over the rounds.

    scripts/bench_suite.sh up
    .venv/bin/python scripts/bench_ab.py --rounds 2 \\
        --a "FAIRLANE_WRITE_LINGER_MS=2" --b "FAIRLANE_WRITE_LINGER_MS=0" \\
        -- --lanes 50 --window 32 --duration 15 --handler noop

A side's environment may set FAIRLANE_SRC to a source tree (a `git worktree` of another
commit): scripts/bench_suite.sh then runs the services from there.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "scripts" / "bench_suite.sh"
FLOOR = ROOT / "scripts" / "grpc_floor.py"


@dataclass(frozen=True, slots=True)
class Run:
    side: str
    round: int
    valid: bool
    results_per_s: float
    floor_per_s: float
    p50_ms: float
    p99_ms: float
    busy_percent: float
    cpu_us: dict[str, float]  # CPU per result, by process label

    @property
    def ratio(self) -> float:
        return self.results_per_s / self.floor_per_s if self.floor_per_s else 0.0


def parse_env(text: str) -> dict[str, str]:
    """'A=1 B="x y"' -> {"A": "1", "B": "x y"}; anything else is refused."""
    env: dict[str, str] = {}
    for word in shlex.split(text):
        name, sep, value = word.partition("=")
        if not sep or not name:
            raise ValueError(f"not NAME=VALUE: {word!r}")
        env[name] = value
    return env


def order(rounds: int) -> list[tuple[int, str]]:
    """ABBA: A first in odd rounds, B first in even ones, so a drift in the host's speed
    weighs on both sides alike."""
    out: list[tuple[int, str]] = []
    for n in range(1, rounds + 1):
        out.extend((n, side) for side in (("A", "B") if n % 2 else ("B", "A")))
    return out


def run_of(side: str, n: int, report: dict[str, Any], floor: dict[str, Any]) -> Run:
    results = float(report["throughput"]["results_per_s"])
    measured = float(report["seconds"]["measured"])
    done = results * measured
    cpu = {
        p["label"]: (float(p["cpu_seconds"]) / done * 1e6 if done else 0.0)
        for p in report["processes"]
    }
    latency = report["latency_ms"]["send_to_result"]
    return Run(
        side=side,
        round=n,
        valid=bool(report["valid"]),
        results_per_s=results,
        floor_per_s=float(floor["messages_per_s"]),
        p50_ms=float(latency.get("p50") or 0.0),
        p99_ms=float(latency.get("p99") or 0.0),
        busy_percent=float(report["machine"]["cpu_busy_percent"]),
        cpu_us=cpu,
    )


def summary(runs: list[Run]) -> dict[str, dict[str, float]]:
    """Per side: medians of the ratio, results/s, p99 and CPU per result; and how many
    runs were valid."""
    out: dict[str, dict[str, float]] = {}
    for side in sorted({r.side for r in runs}):
        mine = [r for r in runs if r.side == side]
        row = {
            "runs": float(len(mine)),
            "valid": float(sum(r.valid for r in mine)),
            "ratio": statistics.median(r.ratio for r in mine),
            "results_per_s": statistics.median(r.results_per_s for r in mine),
            "p99_ms": statistics.median(r.p99_ms for r in mine),
        }
        for label in sorted({k for r in mine for k in r.cpu_us}):
            row[f"{label}_us"] = statistics.median(r.cpu_us.get(label, 0.0) for r in mine)
        out[side] = row
    return out


def _suite(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(
        [str(SUITE), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"bench_suite.sh {args[0]} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def _floor(seconds: float, bench_args: list[str]) -> dict[str, Any]:
    shape: list[str] = []
    for flag, own in (("--lanes", "--streams"), ("--window", "--window")):
        if flag in bench_args:
            shape += [own, bench_args[bench_args.index(flag) + 1]]
    out = subprocess.run(
        [sys.executable, str(FLOOR), "--duration", str(seconds), "--json", *shape],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds (2: A B B A)")
    parser.add_argument("--a", default="", help='side A\'s environment, "NAME=VALUE ..."')
    parser.add_argument("--b", default="", help="side B's environment")
    parser.add_argument("--floor-seconds", type=float, default=5.0)
    parser.add_argument("--services", default="queue worker", help="what to restart")
    parser.add_argument("bench", nargs=argparse.REMAINDER, help="-- then fairlane bench args")
    args = parser.parse_args()
    bench = [a for a in args.bench if a != "--"]
    if "--json" in bench:
        bench.remove("--json")
    sides = {"A": parse_env(args.a), "B": parse_env(args.b)}
    runs: list[Run] = []
    for n, side in order(args.rounds):
        _suite(["restart", *args.services.split()], sides[side])
        report = json.loads(_suite(["bench", *bench, "--json", "--no-progress"], sides[side]))
        run = run_of(side, n, report, _floor(args.floor_seconds, bench))
        runs.append(run)
        cpu = " ".join(f"{k} {v:.0f}" for k, v in run.cpu_us.items() if v >= 0.5)
        print(
            f"round {n} {side}: {run.results_per_s:,.1f} results/s, floor "
            f"{run.floor_per_s:,.0f} ({run.ratio:.3f}), p50/p99 {run.p50_ms:.1f}/"
            f"{run.p99_ms:.1f} ms, busy {run.busy_percent:.0f} %, CPU µs/result: {cpu}, "
            f"{'valid' if run.valid else 'INVALID'}",
            flush=True,
        )
    _suite(["restart", *args.services.split()], {})  # back to the suite's own settings
    for side, row in summary(runs).items():
        cpu = " ".join(
            f"{k.removesuffix('_us')} {v:.0f}"
            for k, v in row.items()
            if k.endswith("_us") and v >= 0.5
        )
        print(
            f"{side} [{getattr(args, side.lower())}]: medians of {row['runs']:.0f} runs "
            f"({row['valid']:.0f} valid): {row['ratio']:.3f} of the floor, "
            f"{row['results_per_s']:,.1f} results/s, p99 {row['p99_ms']:.1f} ms, "
            f"CPU µs/result: {cpu}"
        )
    return 0 if all(r.valid for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
