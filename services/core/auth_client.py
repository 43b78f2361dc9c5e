"""Inter-service calls to AuthService: JWKS and revoked families for verification, service
tokens for workers."""

from __future__ import annotations

import asyncio
import math
import time

import grpc

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from fairlane_server.core.grpc_host import channel
from fairlane_server.core.logging import get_logger
from fairlane_server.core.revocation import RevokedFamilies, RevokedPage
from fairlane_server.core.settings import Settings
from fairlane_server.core.tokens import TokenVerifier
from fairlane_server.core.transport import Transport

log = get_logger(__name__)

WAIT_LOG_SECONDS = 10.0  # how often a start waiting for auth says so


class AuthClient:
    def __init__(
        self, target: str, *, transport: Transport | None = None, timeout: float = 5.0
    ) -> None:
        self.target = target
        self._channel = channel(target, transport)
        self._stub = auth_pb2_grpc.AuthServiceStub(self._channel)
        self._timeout = timeout
        self._service_token: tuple[str, float] | None = None
        self._lock = asyncio.Lock()

    async def jwks(self) -> str:
        response = await self._stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=self._timeout)
        keys: str = response.keys_json
        return keys

    async def revoked_families(self, page_token: str, page_size: int) -> RevokedPage:
        response = await self._stub.GetRevokedFamilies(
            auth_pb2.GetRevokedFamiliesRequest(page_token=page_token, page_size=page_size),
            timeout=self._timeout,
        )
        expiries = [t.seconds + t.nanos / 1e9 for t in response.expire_times]
        if len(expiries) != len(response.family_ids):
            # An auth of the release before paging: no expiries (nor a page token).
            expiries = [math.inf] * len(response.family_ids)
        return RevokedPage(
            list(zip(response.family_ids, expiries, strict=True)),
            response.next_page_token,
            response.more_pages,
        )

    def token_verifier(self, settings: Settings) -> TokenVerifier:
        """The verifier every service uses: keys and revoked families from this auth."""
        return TokenVerifier(
            self.jwks,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            refresh_seconds=settings.jwks_refresh_seconds,
            revoked=RevokedFamilies(
                self.revoked_families, max_age=settings.revocation_refresh_seconds
            ),
        )

    async def service_token(self, service: str, secret: str) -> str:
        """A cached service token, renewed a minute before it expires."""
        async with self._lock:
            if self._service_token and self._service_token[1] > time.monotonic():
                return self._service_token[0]
            response = await self._stub.IssueServiceToken(
                auth_pb2.IssueServiceTokenRequest(service=service, secret=secret),
                timeout=self._timeout,
            )
            renew_at = time.monotonic() + max(response.expires_in - 60, response.expires_in / 2)
            token: str = response.access_token
            self._service_token = (token, renew_at)
            return token

    async def wait_ready(self, timeout: float) -> None:
        """Waits until the auth service answers, so services can start in any order. The
        wait is said in the log, with why the last call failed (a TLS mismatch reads as
        the auth being down, and was a silent minute)."""
        deadline = time.monotonic() + timeout
        said = -math.inf
        while True:
            try:
                await self.jwks()
                return
            except grpc.aio.AioRpcError as exc:
                now = time.monotonic()
                if now > deadline:
                    raise
                if now - said >= WAIT_LOG_SECONDS:
                    said = now
                    log.warning(
                        "waiting_for_auth",
                        target=self.target,
                        code=exc.code().name,
                        error=(exc.details() or "")[:300],
                        gives_up_in=round(deadline - now, 1),
                    )
                await asyncio.sleep(0.2)

    async def close(self) -> None:
        await self._channel.close()
