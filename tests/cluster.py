"""A throw-away RabbitMQ cluster beside the system broker, for drills with quorum lanes.

Each node is the package's own `lib/rabbitmq/bin/rabbitmq-server` (the `sbin` wrappers
switch user and drop the environment) with its own node name, AMQP and distribution
ports, and data and log directories under a temp dir. The system's env file would rename
the node, so RABBITMQ_CONF_ENV_FILE is an empty file; the nodes talk through a private
epmd (ERL_EPMD_PORT) and share one .erlang.cookie (mode 0400) under a private HOME, which
rabbitmqctl uses too. Nodes 2.. join node 1 with stop_app, join_cluster, start_app.

A node is killed with SIGKILL to its process group (the script and the Erlang VM) and
started again on the same data directory, so it comes back as a member of the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.ports import free_port

RABBITMQ_HOME = Path(os.environ.get("FAIRLANE_RABBITMQ_HOME", "/usr/lib/rabbitmq"))
SERVER = RABBITMQ_HOME / "bin" / "rabbitmq-server"
CTL = RABBITMQ_HOME / "bin" / "rabbitmqctl"
EPMD = shutil.which("epmd") or "/usr/bin/epmd"


def available() -> bool:
    return SERVER.exists() and CTL.exists() and Path(EPMD).exists()


@dataclass
class Node:
    index: int
    name: str
    amqp_port: int
    dist_port: int
    base: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.amqp_port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class RabbitCluster:
    root: Path
    size: int = 3
    nodes: list[Node] = field(default_factory=list)
    epmd_port: int = 0
    _epmd: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.epmd_port = free_port()
        self.home = self.root / "home"
        tag = secrets.token_hex(3)
        for i in range(1, self.size + 1):
            self.nodes.append(
                Node(i, f"fl{tag}n{i}@localhost", free_port(), free_port(), self.root / f"n{i}")
            )

    # -- environment ------------------------------------------------------------------

    def _env(self, node: Node | None = None) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "empty.env"),
        }
        if node is not None:
            env.update(
                RABBITMQ_NODENAME=node.name,
                RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
                RABBITMQ_NODE_PORT=str(node.amqp_port),
                RABBITMQ_DIST_PORT=str(node.dist_port),
                RABBITMQ_MNESIA_BASE=str(node.base / "mnesia"),
                RABBITMQ_LOG_BASE=str(node.base / "log"),
                RABBITMQ_ENABLED_PLUGINS_FILE=str(self.root / "enabled_plugins"),
                RABBITMQ_CONFIG_FILE=str(self.root / "rabbitmq.conf"),
                RABBITMQ_ADVANCED_CONFIG_FILE=str(self.root / "advanced.config"),
                RABBITMQ_PID_FILE=str(node.base / "pid"),
            )
        return env

    def _prepare(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        (self.root / "empty.env").write_text("")
        (self.root / "enabled_plugins").write_text("[].\n")
        # The system's config would bind node 1 to the system broker's port.
        (self.root / "rabbitmq.conf").write_text(
            "loopback_users = none\nlog.console = false\nlog.file.level = warning\n"
        )
        for node in self.nodes:
            node.base.mkdir(parents=True, exist_ok=True)

    # -- nodes ------------------------------------------------------------------------

    def _launch(self, node: Node) -> None:
        log = (node.base / "stdout.log").open("ab")
        node.proc = subprocess.Popen(
            [str(SERVER)],
            env=self._env(node),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=node.base,
            start_new_session=True,  # its own process group: kill -9 takes the VM with it
        )

    def ctl(self, *args: str, node: Node | None = None, timeout: float = 60) -> str:
        target = node or next((n for n in self.nodes if n.alive), self.nodes[0])
        done = subprocess.run(
            [str(CTL), "-n", target.name, "-q", *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {target.name}: {done.stderr}")
        return done.stdout

    async def actl(self, *args: str, node: Node | None = None, timeout: float = 60) -> str:
        return await asyncio.to_thread(self.ctl, *args, node=node, timeout=timeout)

    async def _await_node(self, node: Node, timeout: float = 240) -> None:
        # A node killed with -9 replays its quorum logs and syncs its tables with the others
        # before it is up: seconds here, but past 90 s once on a CI host that ran three times
        # slower. rabbitmqctl waits itself (--timeout) so that one call covers a slow boot.
        deadline = time.monotonic() + timeout
        while True:
            if node.proc is not None and node.proc.poll() is not None:
                raise RuntimeError(f"{node.name} exited:\n{self.node_log(node)}")
            left = deadline - time.monotonic()
            try:
                await self.actl(
                    "await_startup",
                    "--timeout",
                    str(max(int(left), 1)),
                    node=node,
                    timeout=left + 15,
                )
                return
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                # Before the VM listens, rabbitmqctl fails at once: try again until the deadline.
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{node.name} not started after {timeout:.0f} s ({e}):\n"
                        f"{self.node_log(node)}"
                    ) from e
                await asyncio.sleep(0.5)

    async def start(self) -> None:
        """Starts every node and joins them into one cluster (about 20-40 s)."""
        self._prepare()
        # Popen returns at once (the process runs on): nothing here blocks the loop.
        self._epmd = subprocess.Popen(  # noqa: ASYNC220
            [EPMD, "-port", str(self.epmd_port)],
            env=self._env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for node in self.nodes:
            self._launch(node)
        await asyncio.gather(*(self._await_node(node) for node in self.nodes))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            await self.actl("stop_app", node=node)
            await self.actl("join_cluster", first.name, node=node)
            await self.actl("start_app", node=node)
        await self.wait_members(self.size)

    async def running_members(self, node: Node | None = None) -> set[str]:
        out = await self.actl("cluster_status", "--formatter", "json", node=node)
        running = out.split('"running_nodes"', 1)[-1].split("]", 1)[0]
        return set(re.findall(r'"(fl\w+@localhost)"', running))

    async def wait_members(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            alive = next(n for n in self.nodes if n.alive)
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                if len(await self.running_members(alive)) >= count:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster has not {count} running nodes")
            await asyncio.sleep(0.5)

    def kill(self, node: Node) -> None:
        """kill -9 of the node (its script and Erlang VM)."""
        if node.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.proc.pid, signal.SIGKILL)
        node.proc.wait(30)

    async def restart(self, node: Node) -> None:
        """Starts a killed node again; it rejoins the cluster from its data directory."""
        self._launch(node)
        await self._await_node(node)
        await self.wait_members(self.size)

    async def heal(self) -> None:
        """Every node running and clustered again (after a drill killed some)."""
        for node in self.nodes:
            if not node.alive:
                await self.restart(node)
        await self.wait_members(self.size)

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, signal.SIGTERM)
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(30)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(node.proc.pid, signal.SIGKILL)
                    node.proc.wait(10)
        if self._epmd is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._epmd.pid, signal.SIGKILL)
            self._epmd.wait(10)

    # -- what the drills need ------------------------------------------------------------

    def url(self, vhost: str = "") -> str:
        """Every node, RabbitMQ-style: amqp://guest:guest@h1:p1,h2:p2,h3:p3/vhost."""
        hosts = ",".join(n.address for n in self.nodes)
        return f"amqp://guest:guest@{hosts}/{vhost}"

    def node_at(self, address: str) -> Node:
        return next(n for n in self.nodes if n.address == address)

    async def leaders(self) -> dict[str, str]:
        """Quorum queue -> node name of its leader."""
        out = await self.actl("list_queues", "name", "type", "leader", "--formatter", "json")
        found: dict[str, str] = {}
        for name, kind, leader in re.findall(
            r'"name":"([^"]+)","type":"([^"]+)","leader":"?([^",}]*)"?', out
        ):
            if kind == "quorum" and leader:
                found[name] = leader
        return found

    def node_log(self, node: Node) -> str:
        text = []
        for path in sorted(node.base.glob("**/*.log")):
            with contextlib.suppress(OSError):
                text.append(path.read_text(errors="replace")[-2000:])
        return "\n".join(text)
