"""Rich rendering of a bench report (the JSON form is the report dict itself)."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.table import Table


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}{unit}"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return f"{value}{unit}"


def render(report: dict[str, Any], console: Console) -> None:
    config = report["config"]
    counts = report["counts"]
    mode = (
        f"{config['requests']:,} requests"
        if config["requests"] is not None
        else f"{config['duration']:g} s"
    )
    title = (
        f"fairlane bench: {config['lanes']} lanes x window {config['window']}, "
        f"handler {config['handler']}, {mode} after {config['warmup']:g} s warm-up"
        + (f", rate cap {config['rate']:g}/s" if config["rate"] else "")
    )

    summary = Table(title="counts", show_header=False, title_justify="left")
    summary.add_column("what", style="bold")
    summary.add_column("value", justify="right")
    throughput = report["throughput"]
    summary.add_row("results/s", _fmt(throughput["results_per_s"]))
    summary.add_row("sent/s", _fmt(throughput["sent_per_s"]))
    summary.add_row("measured seconds", _fmt(report["seconds"]["measured"]))
    started = report["seconds"]["lanes_started"]
    summary.add_row(
        "every lane answering after s",
        "never" if started is None else _fmt(started),
    )
    if report["lanes_started_when_measuring"] < config["lanes"] and config["warmup"] > 0:
        # The warm-up waits for every lane up to the drain timeout, then measures anyway.
        summary.add_row(
            "lanes answering when measuring began",
            f"{report['lanes_started_when_measuring']:,} of {config['lanes']:,}",
        )
    for key in (
        "sent",
        "accepted",
        "rejected",
        "results",
        "results_in_window",
        "unanswered",
        "lost",
        "duplicates",
        "fifo_violations",
        "answer_order_violations",
        "results_before_accepted",
        "unknown",
        "output_mismatches",
        "stream_errors",
        "lane_seq_gaps",
        "resumed_streams",
        "accepted_by_log",
        "never_accepted",
    ):
        style = "red" if counts[key] and key not in _INFORMATIVE else ""
        summary.add_row(
            key.replace("_", " "), f"[{style}]{_fmt(counts[key])}" if style else _fmt(counts[key])
        )
    for code, n in sorted(report["rejections"].items()):
        summary.add_row(f"  rejected {code}", _fmt(n))
    for status_name, n in sorted(report["results_by_status"].items()):
        summary.add_row(f"  result {status_name}", _fmt(n))

    latency = Table(title="latency (ms), requests sent after the warm-up", title_justify="left")
    latency.add_column("from -> to")
    for col in ("count", "p50", "p95", "p99", "max", "mean"):
        latency.add_column(col, justify="right")
    for name, row in report["latency_ms"].items():
        latency.add_row(
            name.replace("_", " "),
            *(_fmt(row[c]) for c in ("count", "p50", "p95", "p99", "max", "mean")),
        )

    parts: list[Any] = [f"[bold]{title}[/] (run {report['run_tag']})", summary, latency]
    stages = report.get("stages")
    if isinstance(stages, dict) and "error" in stages:
        parts.append(f"stages: {stages['error']}")
    elif stages:
        table = Table(
            title="stages (ms per request, from the services' histograms; bucket estimates)",
            title_justify="left",
        )
        table.add_column("stage")
        for col in ("count", "mean", "p50", "p99"):
            table.add_column(col, justify="right")
        for name, row in stages.items():
            table.add_row(name, *(_fmt(row[c]) for c in ("count", "mean_ms", "p50_ms", "p99_ms")))
        parts.append(table)
    if report["processes"]:
        procs = Table(title="processes (CPU over the measured phase)", title_justify="left")
        for col in ("process", "pids", "CPU %", "RSS MB", "peak RSS MB"):
            procs.add_column(col, justify="left" if col in ("process", "pids") else "right")
        for row in report["processes"]:
            pids = ",".join(str(p) for p in row["pids"]) or f"{row['processes']} procs"
            procs.add_row(
                row["label"],
                pids,
                _fmt(row["cpu_percent"]),
                _fmt(row["rss_mb"]),
                _fmt(row["rss_peak_mb"]),
            )
        client = report["bench_client"]
        procs.add_row("bench (this)", "", _fmt(client["cpu_percent"]), _fmt(client["rss_mb"]), "")
        machine = report["machine"]
        procs.caption = (
            f"{machine['cpu_count']} CPUs, machine busy {_fmt(machine['cpu_busy_percent'])} % "
            "(100 % = all CPUs)"
        )
        parts.append(procs)

    bad = [
        lane
        for lane in report["lanes"]
        if lane["lost"]
        or lane["duplicates"]
        or lane["fifo_violations"]
        or lane["answer_order_violations"]
        or lane["unanswered"]
        or lane["stream_error"]
    ]
    if bad:
        lanes = Table(title="lanes with problems", title_justify="left")
        for col in ("lane", "user", "sent", "accepted", "results", "lost", "dup", "FIFO", "error"):
            lanes.add_column(col)
        for lane in bad[:20]:
            lanes.add_row(
                str(lane["lane"]),
                lane["user"],
                _fmt(lane["sent"]),
                _fmt(lane["accepted"]),
                _fmt(lane["results"]),
                _fmt(lane["lost"]),
                _fmt(lane["duplicates"]),
                _fmt(lane["fifo_violations"]),
                lane["stream_error"],
            )
        parts.append(lanes)

    database = report.get("database")
    if database:
        verdict = "[green]matches" if database["ok"] else "[red]does not match"
        rows = ", ".join(f"{k} {v:,}" for k, v in sorted(database["rows_by_status"].items()))
        parts.append(f"request log {verdict}[/] the results received ({rows or 'no rows'})")

    if report["valid"]:
        parts.append("[bold green]valid run[/]: nothing lost, duplicated or out of order")
    else:
        parts.append("[bold red]INVALID run[/]: " + "; ".join(report["invalid_reasons"]))
    console.print(Group(*parts))


_INFORMATIVE = {
    "sent",
    "accepted",
    "rejected",
    "results",
    "results_in_window",
    "lane_seq_gaps",
    "resumed_streams",
    "accepted_by_log",
    "never_accepted",
}
