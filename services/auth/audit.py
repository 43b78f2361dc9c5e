"""Audit events of the auth service, written through fairlane_server.core.audit.

docs/security.md ("Auth service") lists every event and its fields. No event carries a
password, a token or a secret. The calls they record carry no token, so their principal
is null; the user they concern is in `user_id` / `username`.
"""

from __future__ import annotations

import re
from typing import Any

from fairlane_server.core.audit import audit

_PRINTABLE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")

LOGIN_SUCCEEDED = "auth.login.succeeded"
LOGIN_FAILED = "auth.login.failed"
REGISTERED = "auth.register.succeeded"
THROTTLE_TRIPPED = "auth.throttle.tripped"
TOKEN_REVOKED = "auth.token.revoked"
FAMILY_REVOKED_ON_REUSE = "auth.family.revoked_on_reuse"
REUSE_TOLERATED = "auth.refresh.reuse_tolerated"
SERVICE_TOKEN_ISSUED = "auth.service_token.issued"
SERVICE_TOKEN_REFUSED = "auth.service_token.refused"


def username_field(name: str) -> str:
    """The username as typed, unless it cannot be one (people type passwords there too)."""
    return name if _PRINTABLE_NAME.fullmatch(name) else "<not a valid username>"


def event(name: str, *, peer: str, **fields: Any) -> None:
    audit(name, None, peer=peer, **fields)
