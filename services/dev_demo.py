"""The round trip `fairlane dev --demo` shows: a user, a Session, results in order."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
from rich.console import Console

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from fairlane_server.core.settings import Settings

DEMO_USER = "demo"
DEMO_PASSWORD = "fairlane-demo"


async def demo_round_trip(settings: Settings, console: Console, count: int = 10) -> list[str]:
    """Sends `count` echo requests on one Session and prints the results as they arrive."""
    async with grpc.aio.insecure_channel(settings.auth_listen) as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        with contextlib.suppress(grpc.aio.AioRpcError):  # already registered on a rerun
            await auth.Register(
                auth_pb2.RegisterRequest(username=DEMO_USER, password=DEMO_PASSWORD)
            )
        login = await auth.Login(auth_pb2.LoginRequest(username=DEMO_USER, password=DEMO_PASSWORD))

    async def requests() -> AsyncIterator[queue_pb2.SessionRequest]:
        for i in range(count):
            yield queue_pb2.SessionRequest(
                enqueue=queue_pb2.EnqueueRequest(
                    handler="echo", payload=f"hello #{i + 1}".encode(), client_ref=str(i + 1)
                )
            )

    console.print(f"[bold]demo:[/] sending {count} echo requests on one Session")
    outputs: list[str] = []
    async with grpc.aio.insecure_channel(settings.queue_listen) as channel:
        queue = queue_pb2_grpc.QueueServiceStub(channel)
        metadata = (("authorization", f"Bearer {login.access_token}"),)
        async for response in queue.Session(requests(), metadata=metadata, timeout=60):
            if response.WhichOneof("kind") == "result":
                r = response.result
                outputs.append(r.output.decode())
                console.print(f"  result lane_seq={r.lane_seq} ref={r.client_ref} {r.output!r}")
            elif response.WhichOneof("kind") == "rejected":
                console.print(f"  [red]rejected[/] {response.rejected.message}")
    in_order = outputs == [f"hello #{i + 1}" for i in range(count)]
    console.print(
        f"[bold]demo:[/] {len(outputs)}/{count} results, "
        + ("[green]in the order sent[/]" if in_order else "[red]OUT OF ORDER[/]")
    )
    return outputs
