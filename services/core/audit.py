"""Audit events: who did what, to what, with which outcome, as structured log lines.

Every audit line carries `audit: true`, the event name, the principal (subject and role)
and the peer address; docs/security.md lists the events.
"""

from __future__ import annotations

from typing import Any

from fairlane_server.core.logging import get_logger
from fairlane_server.core.tokens import Principal

log = get_logger("fairlane.audit")


MAX_FIELD = 128


def _clip(value: Any) -> Any:
    """Caller-chosen strings (a lane id) are cut: an audit line has a bounded size."""
    if isinstance(value, str) and len(value) > MAX_FIELD:
        return f"{value[:MAX_FIELD]}...({len(value)} chars)"
    return value


def audit(event: str, principal: Principal | None, *, peer: str | None, **fields: Any) -> None:
    fields = {k: _clip(v) for k, v in fields.items()}
    log.info(
        event,
        audit=True,
        principal=principal.user_id if principal else None,
        role=principal.role if principal else None,
        peer=peer,
        **fields,
    )
