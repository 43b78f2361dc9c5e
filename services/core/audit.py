"""Audit events: who did what, to what, with which outcome, as structured log lines.

Every audit line carries `audit: true`, the event name, the principal (subject and role)
and the peer address; docs/security.md lists the events.
"""

from __future__ import annotations

from typing import Any

from services.core.logging import get_logger
from services.core.tokens import Principal

log = get_logger("fairlane.audit")


def audit(event: str, principal: Principal | None, *, peer: str | None, **fields: Any) -> None:
    log.info(
        event,
        audit=True,
        principal=principal.user_id if principal else None,
        role=principal.role if principal else None,
        peer=peer,
        **fields,
    )
