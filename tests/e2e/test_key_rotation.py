"""Signing-key rotation with the services running: two auth replicas and a queue (which
fetches its keys from both), `fairlane keys rotate` and `retire` from the command line.

While the key changes (and one auth replica restarts, as in a rolling restart), tokens
from both replicas are checked without pause on both replicas' WhoAmI and on the queue:
none may be refused. Then the old key is retired: every replica stops publishing it and
signing with it, and tokens it signed are refused everywhere within the bound."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import jwt
import pytest

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from fairlane_server.auth import keys
from tests.conftest import DATABASE_URL, broker_url
from tests.e2e.suite import ROOT, Suite, wait_until
from tests.e2e.users import PASSWORD, bearer
from tests.ports import free_port

pytestmark = pytest.mark.e2e

RELOAD = 1.0  # FAIRLANE_REVOCATION_REFRESH_SECONDS: how often auth replicas reload keys
JWKS_REFRESH = 2.0  # FAIRLANE_JWKS_REFRESH_SECONDS: how often the queue refetches keys
SLACK = 3.0
AUTHS = ("auth", "auth2")


@pytest.fixture
async def suite(pg_schema: str, vhost: str, tmp_path: Path) -> AsyncIterator[Suite]:
    s = Suite(DATABASE_URL, pg_schema, broker_url(vhost), tmp_path)
    s.ports["auth2"] = free_port()
    s.extra_env.update(
        FAIRLANE_REVOCATION_REFRESH_SECONDS=str(RELOAD),
        FAIRLANE_JWKS_REFRESH_SECONDS=str(JWKS_REFRESH),
        FAIRLANE_AUTH_TARGET=f"{s.target('auth')},{s.target('auth2')}",
    )
    try:
        start_auth(s, "auth")
        await s.wait_serving("auth")  # the first key is created once, by this one
        start_auth(s, "auth2")
        s.start("queue")
        await s.wait_serving("auth2")
        await s.wait_serving("queue")
        yield s
    finally:
        codes = s.stop_all()
    assert set(codes.values()) == {0}, {n: (c, s.log(n)) for n, c in codes.items()}


def start_auth(suite: Suite, name: str) -> None:
    suite.start(name, "auth", FAIRLANE_AUTH_LISTEN=suite.target(name))


async def cli(suite: Suite, *args: str, code: int = 0) -> str:
    """`fairlane keys ...` with the services' settings; its output (stdout, and stderr
    when it is to fail with `code`)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fairlane.cli.main",
        "keys",
        *args,
        env=suite.env(),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == code, (args, out.decode(), err.decode())
    return out.decode() if code == 0 else err.decode()


def kid(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


@dataclass
class Login:
    """One user's login on one auth replica; `fresh()` refreshes it into a new token
    signed with whatever key that replica signs with now."""

    replica: str
    refresh_token: str
    token: str


@dataclass
class Checks:
    suite: Suite
    logins: list[Login]
    refused: list[str] = field(default_factory=list)
    checked: int = 0
    kids_seen: dict[str, set[str]] = field(default_factory=dict)

    async def fresh(self, login: Login) -> str | None:
        """A new token from the login's replica, None while that replica is down."""
        async with grpc.aio.insecure_channel(self.suite.target(login.replica)) as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            try:
                reply = await stub.Refresh(
                    auth_pb2.RefreshRequest(refresh_token=login.refresh_token), timeout=5
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    return None
                raise
        login.refresh_token, login.token = reply.refresh_token, reply.access_token
        self.kids_seen.setdefault(login.replica, set()).add(kid(reply.access_token))
        return str(reply.access_token)

    async def accepted_everywhere(self, token: str, what: str) -> None:
        """WhoAmI on each auth replica that is up, and a call on the queue."""
        for name in AUTHS:
            async with grpc.aio.insecure_channel(self.suite.target(name)) as channel:
                try:
                    await auth_pb2_grpc.AuthServiceStub(channel).WhoAmI(
                        auth_pb2.WhoAmIRequest(), metadata=bearer(token), timeout=5
                    )
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:  # restarting: not a verdict
                        self.refused.append(f"{what} on {name}: {exc.code()} {exc.details()}")
        async with grpc.aio.insecure_channel(self.suite.target("queue")) as channel:
            try:
                await queue_pb2_grpc.QueueServiceStub(channel).ListRequests(
                    queue_pb2.ListRequestsRequest(), metadata=bearer(token), timeout=5
                )
            except grpc.aio.AioRpcError as exc:
                self.refused.append(f"{what} on queue: {exc.code()} {exc.details()}")
        self.checked += 1

    async def run(self, old_tokens: list[str]) -> None:
        """Until cancelled: each login's newest token, and the tokens from before."""
        while True:
            for login in self.logins:
                token = await self.fresh(login)
                if token is not None:
                    await self.accepted_everywhere(token, f"{kid(token)} from {login.replica}")
            for token in old_tokens:
                await self.accepted_everywhere(token, f"old {kid(token)}")


async def login(suite: Suite, replica: str, name: str) -> Login:
    async with grpc.aio.insecure_channel(suite.target(replica)) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        reply = await stub.Login(auth_pb2.LoginRequest(username=name, password=PASSWORD))
    return Login(replica, reply.refresh_token, reply.access_token)


async def published(suite: Suite, replica: str) -> set[str]:
    async with grpc.aio.insecure_channel(suite.target(replica)) as channel:
        reply = await auth_pb2_grpc.AuthServiceStub(channel).GetJwks(auth_pb2.GetJwksRequest())
    return {k["kid"] for k in json.loads(reply.keys_json)["keys"]}


async def refused_on(suite: Suite, target: str, token: str, queue: bool) -> bool:
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            if queue:
                await queue_pb2_grpc.QueueServiceStub(channel).ListRequests(
                    queue_pb2.ListRequestsRequest(), metadata=bearer(token), timeout=5
                )
            else:
                await auth_pb2_grpc.AuthServiceStub(channel).WhoAmI(
                    auth_pb2.WhoAmIRequest(), metadata=bearer(token), timeout=5
                )
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
            assert "unknown key" in (exc.details() or ""), exc
            return True
        return False


async def test_rotation_and_retirement_while_running(suite: Suite) -> None:
    name = "rotating-user"
    async with grpc.aio.insecure_channel(suite.target("auth")) as channel:
        await auth_pb2_grpc.AuthServiceStub(channel).Register(
            auth_pb2.RegisterRequest(username=name, password=PASSWORD)
        )
    logins = [await login(suite, replica, name) for replica in AUTHS]
    old_kid = kid(logins[0].token)
    assert kid(logins[1].token) == old_kid
    old_tokens = [lg.token for lg in logins]
    checks = Checks(suite, logins)
    prober = asyncio.create_task(checks.run(old_tokens))
    try:
        await asyncio.sleep(0.5)
        out = await cli(suite, "rotate")
        rotated_at = time.monotonic()
        new_kid = out.split("new signing key ", 1)[1].split()[0]
        assert f"fairlane keys retire {old_kid}" in out, out

        # Published by both replicas within one reload (plus the reload itself).
        async def both_publish() -> bool:
            return [await published(suite, r) for r in AUTHS] == [{old_kid, new_kid}] * 2

        await wait_until(both_publish, RELOAD + SLACK)
        # The key the replicas still sign with is not retired without --force.
        refusal = await cli(suite, "retire", old_kid, code=1)
        assert f"auth replicas sign with {old_kid} now" in refusal, refusal
        listed = await cli(suite, "list")
        assert "signs from" in listed.split(new_kid, 1)[1].splitlines()[0], listed

        # A rolling restart of one replica meanwhile: started after the rotation, it
        # must not sign with the new key before the other replica publishes it.
        suite.stop("auth2")
        start_auth(suite, "auth2")
        await suite.wait_serving("auth2")

        # Both replicas sign with the new key once it is ready, not before.
        async def both_sign_new() -> bool:
            return all(kid(lg.token) == new_kid for lg in logins)

        await wait_until(both_sign_new, keys.sign_delay(RELOAD) + RELOAD + SLACK)
        switched_after = time.monotonic() - rotated_at
        assert switched_after >= keys.sign_delay(RELOAD) - 0.5, switched_after
        checked_before = checks.checked
        await wait_until(lambda: _more(checks, checked_before + 4), 30)
    finally:
        prober.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await prober
    assert not checks.refused, checks.refused[:10]
    assert checks.kids_seen == {r: {old_kid, new_kid} for r in AUTHS}, checks.kids_seen

    out = await cli(suite, "retire", old_kid)
    retired_at = time.monotonic()
    assert f"retired {old_kid}" in out, out
    old_token = old_tokens[0]
    # Auth replicas drop it at their next reload: no longer published, refused by WhoAmI.
    for replica in AUTHS:

        async def dropped(replica: str = replica) -> bool:
            return await published(suite, replica) == {new_kid} and await refused_on(
                suite, suite.target(replica), old_token, queue=False
            )

        await wait_until(dropped, RELOAD + SLACK)
    auth_after = time.monotonic() - retired_at

    # The queue refuses it once it refetches the keys: within FAIRLANE_JWKS_REFRESH_SECONDS.
    async def queue_refuses() -> bool:
        return await refused_on(suite, suite.target("queue"), old_token, queue=True)

    await wait_until(queue_refuses, RELOAD + JWKS_REFRESH + SLACK)
    queue_after = time.monotonic() - retired_at

    # Nobody signs with it, and what they sign is accepted everywhere.
    for lg in logins:
        token = await checks.fresh(lg)
        assert token is not None
        assert kid(token) == new_kid
        await checks.accepted_everywhere(token, f"after retirement from {lg.replica}")
    assert not checks.refused, checks.refused
    assert "retired" in (await cli(suite, "list")).split(old_kid, 1)[1].splitlines()[0]
    print(
        f"signing switched {switched_after:.1f} s after rotate (delay "
        f"{keys.sign_delay(RELOAD):g} s), {checks.checked} tokens checked on 3 services, "
        f"none refused; retired key refused by both auths {auth_after:.1f} s and by the "
        f"queue {queue_after:.1f} s after retire"
    )


async def _more(checks: Checks, n: int) -> bool:
    return checks.checked >= n
