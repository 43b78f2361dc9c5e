"""Wires the auth service together: database, keys, domain, gRPC host, metrics."""

from __future__ import annotations

import json

from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from services.auth import keys
from services.auth.domain import Auth
from services.auth.servicer import AuthServicer
from services.auth.store import AuthStore
from services.core.db import engine_for
from services.core.grpc_host import GrpcHost
from services.core.settings import Settings
from services.core.tokens import TokenVerifier

SERVICE_NAME = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name


class AuthService:
    name = "auth"

    def __init__(self, settings: Settings, engine: AsyncEngine | None = None) -> None:
        self._settings = settings
        self._own_engine = engine is None
        self.engine = engine or engine_for(settings)
        self.host = GrpcHost(settings.auth_listen, [SERVICE_NAME])

    @property
    def address(self) -> str:
        return self.host.address

    async def start(self) -> None:
        s = self._settings
        key, public = await keys.load_or_create(self.engine)
        auth = Auth(
            AuthStore(self.engine),
            key,
            public,
            issuer=s.jwt_issuer,
            audience=s.jwt_audience,
            access_ttl=s.access_token_ttl_seconds,
            refresh_ttl=s.refresh_token_ttl_seconds,
            password_min_length=s.password_min_length,
            service_secret=s.service_secret,
        )

        async def local_jwks() -> str:
            return json.dumps(auth.jwks())

        verifier = TokenVerifier(local_jwks, issuer=s.jwt_issuer, audience=s.jwt_audience)
        await verifier.refresh()
        self.host.authz.use(verifier)
        auth_pb2_grpc.add_AuthServiceServicer_to_server(AuthServicer(auth), self.host.server)
        await self.host.start()
        await self.host.set_serving(True)

    async def stop(self, grace: float) -> None:
        await self.host.stop(grace)
        if self._own_engine:
            await self.engine.dispose()
