"""The bench finds the processes under test: a client that connects late is still watched."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from fairlane_server.bench.procs import ProcessWatch

# Connects to the port given, says so, and holds the connection until stdin closes.
CLIENT = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print("connected", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield sock
    finally:
        sock.close()


def test_a_client_that_connects_after_discovery_is_watched_from_the_measured_phase(
    listener: socket.socket,
) -> None:
    port = listener.getsockname()[1]
    watch = ProcessWatch()
    watch.discover({}, [], follow_clients_of=[f"127.0.0.1:{port}"])
    assert watch.watched == []

    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "connected"
        watch.start()
        assert [w.pids for w in watch.watched] == [{client.pid}]
        # Its CPU is measured from the start of the phase, not over its whole life.
        assert set(watch.watched[0].cpu_start) == {client.pid}
        watch.stop()
        assert [row["pids"] for row in watch.report()["processes"]] == [[client.pid]]
    finally:
        assert client.stdin is not None
        client.stdin.close()
        client.wait(timeout=10)


def test_remote_targets_are_not_followed() -> None:
    watch = ProcessWatch()
    watch.discover({}, [], follow_clients_of=["queue.example:50052"])
    watch.start()
    assert watch.watched == []
