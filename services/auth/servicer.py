"""gRPC surface of AuthService: maps domain errors to status codes."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import NoReturn

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from fairlane_server.auth.domain import Auth, BadCredentials, InvalidInput
from fairlane_server.auth.hashing import HashingBusy
from fairlane_server.auth.store import UsernameTaken
from fairlane_server.auth.throttle import Throttled
from fairlane_server.core import authz
from fairlane_server.core.grpc_host import ServicerContext, abort
from fairlane_server.core.peer import Network, client_address
from fairlane_server.core.rich_status import abort_retry
from fairlane_server.core.tokens import ROLE_ADMIN, ROLE_SERVICE

# IssueServiceToken's roles. The proto makes UNSPECIFIED the default (a service); any other
# number is one this server does not know, and is refused rather than read as a service.
_SERVICE_TOKEN_ROLES = {
    auth_pb2.SERVICE_TOKEN_ROLE_UNSPECIFIED: ROLE_SERVICE,
    auth_pb2.SERVICE_TOKEN_ROLE_SERVICE: ROLE_SERVICE,
    auth_pb2.SERVICE_TOKEN_ROLE_ADMIN: ROLE_ADMIN,
}

# What a caller refused for a full password-check queue is told to wait.
BUSY_RETRY_MS = 1000


async def _refuse(context: ServicerContext, exc: Throttled | HashingBusy) -> NoReturn:
    if isinstance(exc, Throttled):
        delay_ms = max(1, math.ceil(exc.retry_after * 1000))
        await abort_retry(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), delay_ms)
    await abort_retry(
        context,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "too many password checks in progress; retry shortly",
        BUSY_RETRY_MS,
    )


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, auth: Auth, trusted_proxies: Sequence[Network] = ()) -> None:
        self._auth = auth
        self._proxies = list(trusted_proxies)

    def _peer(self, context: ServicerContext) -> str:
        return client_address(context, self._proxies)

    async def Register(
        self, request: auth_pb2.RegisterRequest, context: ServicerContext
    ) -> auth_pb2.RegisterResponse:
        try:
            user_id = await self._auth.register(
                request.username, request.password, self._peer(context)
            )
        except InvalidInput as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except UsernameTaken:
            await abort(context, grpc.StatusCode.ALREADY_EXISTS, "username is taken")
        except (Throttled, HashingBusy) as exc:
            await _refuse(context, exc)
        return auth_pb2.RegisterResponse(user_id=str(user_id))

    async def Login(
        self, request: auth_pb2.LoginRequest, context: ServicerContext
    ) -> auth_pb2.LoginResponse:
        try:
            pair = await self._auth.login(request.username, request.password, self._peer(context))
        except BadCredentials as exc:
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except (Throttled, HashingBusy) as exc:
            await _refuse(context, exc)
        return auth_pb2.LoginResponse(
            access_token=pair.access_token,
            refresh_token=pair.refresh_token,
            expires_in=pair.expires_in,
        )

    async def Refresh(
        self, request: auth_pb2.RefreshRequest, context: ServicerContext
    ) -> auth_pb2.RefreshResponse:
        if not request.refresh_token:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "refresh_token is required")
        try:
            pair = await self._auth.refresh(request.refresh_token, self._peer(context))
        except BadCredentials as exc:
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, str(exc))
        return auth_pb2.RefreshResponse(
            access_token=pair.access_token,
            refresh_token=pair.refresh_token,
            expires_in=pair.expires_in,
        )

    async def Revoke(
        self, request: auth_pb2.RevokeRequest, context: ServicerContext
    ) -> auth_pb2.RevokeResponse:
        if not request.refresh_token:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "refresh_token is required")
        try:
            await self._auth.revoke(request.refresh_token, self._peer(context))
        except BadCredentials as exc:
            await abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
        return auth_pb2.RevokeResponse()

    async def WhoAmI(
        self, request: auth_pb2.WhoAmIRequest, context: ServicerContext
    ) -> auth_pb2.WhoAmIResponse:
        principal = authz.principal()
        return auth_pb2.WhoAmIResponse(user_id=principal.user_id, username=principal.username)

    async def GetJwks(
        self, request: auth_pb2.GetJwksRequest, context: ServicerContext
    ) -> auth_pb2.GetJwksResponse:
        return auth_pb2.GetJwksResponse(keys_json=json.dumps(self._auth.jwks()))

    async def GetRevokedFamilies(
        self, request: auth_pb2.GetRevokedFamiliesRequest, context: ServicerContext
    ) -> auth_pb2.GetRevokedFamiliesResponse:
        try:
            page = await self._auth.revoked_families(request.page_token, request.page_size)
        except InvalidInput as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return auth_pb2.GetRevokedFamiliesResponse(
            family_ids=[family for family, _ in page.families],
            # Whole seconds, rounded up (never earlier than the truth): no nanos to send.
            expire_times=[Timestamp(seconds=math.ceil(at)) for _, at in page.families],
            next_page_token=page.next_page_token,
            more_pages=page.more_pages,
        )

    async def IssueServiceToken(
        self, request: auth_pb2.IssueServiceTokenRequest, context: ServicerContext
    ) -> auth_pb2.IssueServiceTokenResponse:
        role = _SERVICE_TOKEN_ROLES.get(request.role)
        if role is None:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown role {request.role}: use SERVICE_TOKEN_ROLE_SERVICE (1) or "
                "SERVICE_TOKEN_ROLE_ADMIN (2), or leave it unset for a service token",
            )
        try:
            token, ttl = await self._auth.service_token(
                request.service, request.secret, self._peer(context), role
            )
        except InvalidInput as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except BadCredentials as exc:
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except Throttled as exc:
            await _refuse(context, exc)
        return auth_pb2.IssueServiceTokenResponse(access_token=token, expires_in=ttl)
