"""Which request-log errors are worth retrying.

A batch stage retries (and a circuit breaker counts) only errors that say nothing about
the data: a lost connection, a timeout, a deadlock or serialization failure, a server
shutting down. Anything else is deterministic for the statement that raised it (a value
the database refuses, a constraint): retrying the same batch would fail the same way, so
the stage splits the batch and fails only the items that cause it.
"""

from __future__ import annotations

import asyncio
import sqlite3

from sqlalchemy import exc as sa_exc

from fairlane_server.core.breaker import CircuitOpen

# SQLSTATE classes that describe the server or the session, not the statement's data:
# 08 connection, 40 transaction rollback (serialization, deadlock), 53 insufficient
# resources, 57 operator intervention (statement timeout, shutdown), 58 system error.
_TRANSIENT_CLASSES = frozenset({"08", "40", "53", "57", "58"})
# ...and states of other classes that say the same of the server, the session or the
# operator, never of a value: a database in read-only mode (25006: a standby promoted the
# wrong way, default_transaction_read_only), a session or transaction timeout, a lock not
# had within lock_timeout (55P03) or an object in use, privileges revoked, the database or
# schema gone. Taken for the data's fault, they split every batch down to single items
# and failed each (an outside review: 10 s of read-only lost 24 finished results and
# refused 6,115 enqueues as INVALID_ARGUMENT). Retried, a stage waits, and a long wait
# shows as a stalled stage.
_TRANSIENT_STATES = frozenset(
    {"25006", "25P03", "25P04", "55P03", "55006", "42501", "3D000", "3F000"}
)
# ...except a protocol violation, which asyncpg reports for a value PostgreSQL cannot
# take at all (a NUL character in text): that is the data's fault, whatever its class.
_DETERMINISTIC_STATES = frozenset({"08P01"})


def sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE of a PostgreSQL error wrapped by SQLAlchemy, if there is one."""
    orig = getattr(error, "orig", None)
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return str(state) if state else None


def is_transient(error: BaseException) -> bool:
    """True for errors that may pass if the same work is tried again later."""
    if isinstance(error, CircuitOpen | OSError | TimeoutError | asyncio.TimeoutError):
        return True
    if isinstance(error, sa_exc.TimeoutError):  # no pooled connection in time
        return True
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return True
        state = sqlstate(error)
        if state is not None:
            if state in _TRANSIENT_STATES:
                return True
            return state not in _DETERMINISTIC_STATES and state[:2] in _TRANSIENT_CLASSES
        orig = getattr(error, "orig", None)
        if isinstance(orig, sqlite3.OperationalError):
            # SQLite: a busy or locked database is contention, and a read-only file the
            # operator's to fix; other operational errors (no such table, disk I/O) will
            # not pass by waiting a few milliseconds.
            text = str(orig).lower()
            return "locked" in text or "busy" in text or "readonly" in text
        cause = getattr(orig, "__cause__", None)
        # asyncpg connection errors carry no SQLSTATE: the connection itself is gone.
        return cause is not None and type(cause).__name__ in {
            "ConnectionDoesNotExistError",
            "InterfaceError",
            "ConnectionFailureError",
            "InternalClientError",
        }
    return isinstance(error, sa_exc.DisconnectionError)


def answer_lost(error: BaseException) -> bool:
    """True when a statement that was sent may have been carried out although it failed:
    the connection broke (class 08, which asyncpg also gives its own "connection was
    closed in the middle of operation") or the wait for the answer timed out. Any other
    error the server sent back means the statement did nothing; so does one raised
    before sending (a value the driver cannot encode, which is not transient)."""
    if not is_transient(error):
        return False
    cause = getattr(getattr(error, "orig", None), "__cause__", None)
    if type(cause).__name__ == "InterfaceError":
        # asyncpg refused before sending: a connection it already knew closed (a pooled
        # one the database dropped while idle), or one busy with another operation.
        return False
    state = sqlstate(error)
    return state is None or state[:2] == "08"


def is_database_error(error: BaseException) -> bool:
    """Errors a request-log call can raise, transient or not (anything else is a bug)."""
    return isinstance(error, sa_exc.SQLAlchemyError | OSError | TimeoutError | CircuitOpen)
