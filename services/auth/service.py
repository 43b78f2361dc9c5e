"""Wires the auth service together: database, keys, throttles, hashing, domain, gRPC host."""

from __future__ import annotations

import asyncio
import contextlib
import json

from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from fairlane_server.auth import keys
from fairlane_server.auth.domain import Auth, Policy
from fairlane_server.auth.hashing import PasswordHashing
from fairlane_server.auth.servicer import AuthServicer
from fairlane_server.auth.store import AuthStore
from fairlane_server.auth.throttle import Rule, Throttle
from fairlane_server.auth.throttle_store import ThrottleStore
from fairlane_server.core.db import engine_for
from fairlane_server.core.grpc_host import GrpcHost
from fairlane_server.core.health import DependencyMonitor
from fairlane_server.core.logging import get_logger
from fairlane_server.core.peer import parse_networks
from fairlane_server.core.revocation import RevokedFamilies
from fairlane_server.core.settings import Settings
from fairlane_server.core.tokens import TokenVerifier
from fairlane_server.core.transport import Transport

SERVICE_NAME = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
PRUNE_EVERY_SECONDS = 300.0

log = get_logger(__name__)


def policy(s: Settings) -> Policy:
    return Policy(
        issuer=s.jwt_issuer,
        audience=s.jwt_audience,
        access_ttl=s.access_token_ttl_seconds,
        refresh_ttl=s.refresh_token_ttl_seconds,
        refresh_reuse_interval=s.refresh_reuse_interval_seconds,
        password_min_length=s.password_min_length,
        service_secret=s.service_secret,
        login_user=Rule("login-user", s.login_user_free_failures),
        login_peer=Rule("login-peer", s.login_peer_free_failures),
        register_peer=Rule("register-peer", s.register_peer_free),
        service_peer=Rule("service-peer", s.service_token_peer_free_failures),
    )


class AuthService:
    name = "auth"

    def __init__(
        self, settings: Settings, engine: AsyncEngine | None = None, *, dev: bool = False
    ) -> None:
        self._settings = settings
        self._dev = dev
        self._own_engine = engine is None
        self.engine = engine or engine_for(settings)
        self.host = GrpcHost(
            settings.auth_listen,
            [SERVICE_NAME],
            transport=Transport.from_settings(settings),
            reflection_enabled=settings.reflection,
            retry_after_ms=settings.retry_after_ms,
        )
        self.hashing = PasswordHashing(
            memory_kib=settings.argon2_memory_kib,
            time_cost=settings.argon2_time_cost,
            parallelism=settings.argon2_parallelism,
            concurrency=settings.hash_concurrency,
            max_waiting=settings.hash_queue_limit,
        )
        self.throttle = Throttle(
            ThrottleStore(self.engine),
            window=settings.throttle_window_seconds,
            base_delay=settings.throttle_base_delay_seconds,
            max_delay=settings.throttle_max_delay_seconds,
        )
        # Readiness follows PostgreSQL, as on the queue and the worker: every Register,
        # Login, Refresh and service token needs it, so a replica that cannot reach it is
        # taken out of rotation (liveness stays SERVING: an outage restarts nothing).
        self._monitor = DependencyMonitor(self.host, engine=self.engine)
        self._pruner: asyncio.Task[None] | None = None
        self._ring: keys.KeyRing | None = None

    @property
    def address(self) -> str:
        return self.host.address

    async def start(self) -> None:
        s = self._settings
        encryption = keys.KeyEncryption.from_settings(s)
        if encryption.current is None and not self._dev:
            log.warning(
                "signing_keys_unencrypted",
                hint="set FAIRLANE_SIGNING_KEY_ENCRYPTION_KEY(_FILE) to encrypt them at rest",
            )
        # Keys are reloaded as often as services refetch the revocation list: a rotation
        # or a retirement reaches this replica within that bound (keys.py says why a new
        # key signs only later).
        ring = keys.KeyRing(self.engine, encryption, reload_seconds=s.revocation_refresh_seconds)
        await ring.load_first()
        # Auth keeps the ring's signer and published list, which each reload updates.
        auth = Auth(
            store=AuthStore(self.engine),
            throttle=self.throttle,
            hashing=self.hashing,
            key=ring.signer,
            public_jwks=ring.published,
            policy=policy(s),
        )

        async def local_jwks() -> str:
            return json.dumps(auth.jwks())

        verifier = TokenVerifier(
            local_jwks,
            issuer=s.jwt_issuer,
            audience=s.jwt_audience,
            revoked=RevokedFamilies(auth.revoked_families, max_age=s.revocation_refresh_seconds),
        )
        await verifier.refresh()
        # This replica's own verifier (WhoAmI, every call with a token) follows each change at
        # once: a retired key is refused here from the reload that drops it.
        ring.on_change = verifier.refresh
        self._ring = ring
        ring.start()
        self.host.authz.use(verifier)
        auth_pb2_grpc.add_AuthServiceServicer_to_server(
            AuthServicer(auth, parse_networks(s.trusted_proxies)), self.host.server
        )
        await self.host.start()
        await self._monitor.check()
        self._monitor.start()
        self._pruner = asyncio.create_task(self._prune(auth))

    async def _prune(self, auth: Auth) -> None:
        """Keeps the auth tables bounded: throttle counts that ran out, refresh tokens past
        their expiry, revoked families whose every token has expired. Every replica runs
        it; the deletes are idempotent and batched, so overlapping passes cost little."""
        while True:
            await asyncio.sleep(PRUNE_EVERY_SECONDS)
            try:
                await self.throttle.prune()
                tokens, families = await auth.prune()
                if tokens or families:
                    log.info("auth_pruned", refresh_tokens=tokens, revoked_families=families)
            except Exception as exc:  # the next round tries again
                log.warning("auth_prune_failed", error=type(exc).__name__)

    async def stop(self, grace: float) -> None:
        await self._monitor.stop()
        if self._ring is not None:
            await self._ring.stop()
        if self._pruner is not None:
            self._pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruner
        await self.host.stop(grace)
        self.hashing.close()
        if self._own_engine:
            await self.engine.dispose()
