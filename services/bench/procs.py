"""CPU and memory of the local processes under test (the services, optionally the backends)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]", "0.0.0.0", "::"}
BACKEND_NAMES = {"beam.smp": "rabbitmq", "postgres": "postgresql"}
# rabbitmqctl runs in a beam.smp of its own: not the broker.
NOT_BACKEND = ("escript", "rabbitmqctl", "rabbitmq-cli")


def _backends(name: str) -> dict[int, psutil.Process]:
    found = {}
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] != name:
            continue
        cmd = " ".join(proc.info["cmdline"] or ())
        if not any(word in cmd for word in NOT_BACKEND):
            found[proc.pid] = proc
    return found


def addresses(target: str) -> list[str]:
    """The host:port addresses a target names: one, a comma-separated list (or an
    ipv4:/ipv6: URI of one); none for a name to resolve (dns:///...)."""
    if target.startswith(("ipv4:", "ipv6:")):
        target = target.split(":", 1)[1]
    elif "://" in target or target.startswith("dns:"):
        return []
    return [a.strip() for a in target.split(",") if a.strip()]


def split_target(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_local(target: str) -> bool:
    host, _ = split_target(target)
    return host in LOCAL_HOSTS or host.startswith("127.")


def _label(proc: psutil.Process) -> str:
    """'queue' for `... serve queue`, else the process name."""
    try:
        cmd = proc.cmdline()
        name = proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?"
    if "serve" in cmd:
        at = cmd.index("serve")
        if at + 1 < len(cmd):
            return cmd[at + 1]
    return name


def listening_pids(ports: set[int]) -> dict[int, int]:
    """port -> pid of the process listening on it, for the ports found."""
    found: dict[int, int] = {}
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return found
    for conn in conns:
        if (
            conn.status == psutil.CONN_LISTEN
            and conn.laddr
            and conn.laddr.port in ports
            and conn.pid is not None
        ):
            found[conn.laddr.port] = conn.pid
    return found


def client_pids(port: int, exclude: set[int]) -> set[int]:
    """Processes with an established connection to a local port (e.g. workers of a queue)."""
    pids: set[int] = set()
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return pids
    for conn in conns:
        if (
            conn.status == psutil.CONN_ESTABLISHED
            and conn.raddr
            and conn.raddr.port == port
            and conn.pid is not None
            and conn.pid not in exclude
        ):
            pids.add(conn.pid)
    return pids


@dataclass
class Watched:
    label: str
    pids: set[int]
    # A family of backend processes summed under one label (e.g. every postgres process),
    # matched by process name so that connections opened during the run are counted too.
    match_name: str = ""
    procs: dict[int, psutil.Process] = field(default_factory=dict)
    cpu_start: dict[int, float] = field(default_factory=dict)
    cpu_end: dict[int, float] = field(default_factory=dict)
    rss_peak: int = 0
    rss_last: int = 0

    def refresh(self) -> None:
        if not self.match_name:
            return
        for pid, proc in _backends(self.match_name).items():
            if pid not in self.procs:
                self.procs[pid] = proc
                self.cpu_start.setdefault(pid, 0.0)


def _cpu(proc: psutil.Process) -> float | None:
    try:
        t = proc.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return float(t.user + t.system)


def _rss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


class ProcessWatch:
    """Samples CPU time over the measured phase and RSS all along, per watched process."""

    def __init__(self) -> None:
        self.watched: list[Watched] = []
        self.me = psutil.Process(os.getpid())
        self._t0 = 0.0
        self._t1 = 0.0
        self._sys0: Any = None
        self._sys1: Any = None
        self._me0 = 0.0
        self._me1 = 0.0
        self._follow: list[int] = []

    def add(self, label: str, pid: int) -> None:
        if any(pid in w.pids for w in self.watched):
            return
        try:
            proc = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return
        self.watched.append(Watched(label=label, pids={pid}, procs={pid: proc}))

    def add_backends(self) -> None:
        for name, label in BACKEND_NAMES.items():
            procs = _backends(name)
            if procs:
                self.watched.append(
                    Watched(label=label, pids=set(procs), match_name=name, procs=procs)
                )

    def discover(
        self, targets: dict[str, str], pids: list[int], *, follow_clients_of: list[str]
    ) -> None:
        """Finds processes by --pids, by listening port of local targets, and the clients
        (typically workers) connected to the queue's port."""
        for pid in pids:
            try:
                self.add(_label(psutil.Process(pid)), pid)
            except psutil.NoSuchProcess:
                continue
        local = {name: split_target(t)[1] for name, t in targets.items() if t and is_local(t)}
        by_port = listening_pids(set(local.values()))
        for name, port in local.items():
            if port in by_port:
                self.add(name, by_port[port])
        self._follow = [split_target(t)[1] for t in follow_clients_of if is_local(t)]
        self.follow_clients()

    def follow_clients(self) -> None:
        """Adds the processes now connected to the followed ports. Called again when the
        measured phase starts (not at its end: a process found then has no CPU baseline),
        because a worker that started beside its queue may still be
        in gRPC's reconnect backoff when the bench starts, and connect only later."""
        for port in self._follow:
            known = {pid for w in self.watched for pid in w.pids} | {os.getpid()}
            for pid in sorted(client_pids(port, known)):
                try:
                    self.add(_label(psutil.Process(pid)), pid)
                except psutil.NoSuchProcess:
                    continue

    def sample_rss(self) -> None:
        for w in self.watched:
            total = sum(_rss(p) for p in w.procs.values())
            w.rss_last = total
            w.rss_peak = max(w.rss_peak, total)

    def start(self) -> None:
        self.follow_clients()
        self._t0 = time.monotonic()
        self._sys0 = psutil.cpu_times()
        self._me0 = _cpu(self.me) or 0.0
        for w in self.watched:
            w.refresh()
            for pid, proc in w.procs.items():
                w.cpu_start[pid] = _cpu(proc) or 0.0
        self.sample_rss()

    def stop(self) -> None:
        self._t1 = time.monotonic()
        self._sys1 = psutil.cpu_times()
        self._me1 = _cpu(self.me) or 0.0
        for w in self.watched:
            w.refresh()
            for pid, proc in w.procs.items():
                now = _cpu(proc)
                if now is not None:
                    w.cpu_end[pid] = now
        self.sample_rss()

    def report(self) -> dict[str, Any]:
        wall = max(self._t1 - self._t0, 1e-9)
        rows = []
        for w in self.watched:
            cpu = sum(w.cpu_end[pid] - w.cpu_start.get(pid, 0.0) for pid in w.cpu_end)
            rows.append(
                {
                    "label": w.label,
                    "pids": [] if w.match_name else sorted(w.pids),
                    "processes": len(w.procs),
                    "cpu_seconds": round(cpu, 2),
                    "cpu_percent": round(100 * cpu / wall, 1),
                    "rss_mb": round(w.rss_last / 2**20, 1),
                    "rss_peak_mb": round(w.rss_peak / 2**20, 1),
                }
            )
        busy = None
        if self._sys0 is not None and self._sys1 is not None:
            total = sum(self._sys1) - sum(self._sys0)
            idle = (self._sys1.idle + getattr(self._sys1, "iowait", 0.0)) - (
                self._sys0.idle + getattr(self._sys0, "iowait", 0.0)
            )
            busy = round(100 * (total - idle) / total, 1) if total > 0 else None
        me_rss = _rss(self.me)
        return {
            "processes": rows,
            "bench_client": {
                "cpu_percent": round(100 * (self._me1 - self._me0) / wall, 1),
                "rss_mb": round(me_rss / 2**20, 1),
            },
            "machine": {"cpu_count": psutil.cpu_count(), "cpu_busy_percent": busy},
        }
