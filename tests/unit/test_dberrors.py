"""Which request-log errors a batch stage retries: the errors are built the way SQLAlchemy
raises them over asyncpg and SQLite, not hand-shaped stand-ins."""

from __future__ import annotations

import sqlite3
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql.asyncpg import (
    AsyncAdapt_asyncpg_connection,
    PGDialect_asyncpg,
)

from fairlane_server.core.breaker import CircuitOpen
from fairlane_server.core.dberrors import answer_lost, is_database_error, is_transient, sqlstate

_DBAPI: Any = PGDialect_asyncpg.import_dbapi()  # type: ignore[no-untyped-call]


def over_asyncpg(error: Exception, *, invalidated: bool = False) -> sa_exc.DBAPIError:
    """What an engine on asyncpg raises for `error`: the dialect's own translation into its
    DB-API error (SQLSTATE copied, the asyncpg error as its cause), wrapped by SQLAlchemy."""
    try:
        AsyncAdapt_asyncpg_connection._handle_exception_no_connection(_DBAPI, error)
    except Exception as translated:
        wrapped = sa_exc.DBAPIError.instance(
            "UPDATE requests ...",
            {},
            translated,
            _DBAPI.Error,
            connection_invalidated=invalidated,
        )
        assert isinstance(wrapped, sa_exc.DBAPIError)
        return wrapped
    raise AssertionError("the dialect did not translate the error")


def over_sqlite(error: sqlite3.Error) -> sa_exc.DBAPIError:
    wrapped = sa_exc.DBAPIError.instance("UPDATE requests ...", {}, error, sqlite3.Error)
    assert isinstance(wrapped, sa_exc.DBAPIError)
    return wrapped


TRANSIENT_POSTGRES = [
    asyncpg.exceptions.DeadlockDetectedError("deadlock detected"),
    asyncpg.exceptions.SerializationError("could not serialize access"),
    asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout"),
    asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
    asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"),
    asyncpg.exceptions.ConnectionFailureError("connection failure"),
    asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed mid-operation"),
    # Of other classes, but about the server or the operator, never a value:
    asyncpg.exceptions.ReadOnlySQLTransactionError(
        "cannot execute UPDATE in a read-only transaction"
    ),
    asyncpg.exceptions.LockNotAvailableError("canceling statement due to lock timeout"),
    asyncpg.exceptions.ObjectInUseError("database is being accessed by other users"),
    asyncpg.exceptions.IdleInTransactionSessionTimeoutError("idle-in-transaction timeout"),
    asyncpg.exceptions.TransactionTimeoutError("transaction timeout"),
    asyncpg.exceptions.InsufficientPrivilegeError("permission denied for table requests"),
    asyncpg.exceptions.InvalidSchemaNameError('schema "fairlane" does not exist'),
    asyncpg.exceptions.InvalidCatalogNameError('database "fairlane" does not exist'),
]

DETERMINISTIC_POSTGRES = [
    asyncpg.exceptions.UniqueViolationError("duplicate key value"),
    asyncpg.exceptions.NotNullViolationError("null value in column"),
    asyncpg.exceptions.CharacterNotInRepertoireError("invalid byte sequence for UTF8"),
    asyncpg.exceptions.NumericValueOutOfRangeError("value out of range"),
    asyncpg.exceptions.UndefinedTableError('relation "requests" does not exist'),
    # Class 08, but asyncpg reports it for a value PostgreSQL cannot take at all (a NUL).
    asyncpg.exceptions.ProtocolViolationError("invalid message format"),
]


@pytest.mark.parametrize("error", TRANSIENT_POSTGRES, ids=lambda e: type(e).__name__)
def test_server_and_session_errors_are_transient(error: Exception) -> None:
    wrapped = over_asyncpg(error)
    assert is_transient(wrapped)
    assert is_database_error(wrapped)
    assert sqlstate(wrapped) == error.sqlstate  # type: ignore[attr-defined]


@pytest.mark.parametrize("error", DETERMINISTIC_POSTGRES, ids=lambda e: type(e).__name__)
def test_errors_about_the_data_are_not_retried(error: Exception) -> None:
    wrapped = over_asyncpg(error)
    assert not is_transient(wrapped)
    assert is_database_error(wrapped)  # an answer from the database, not a bug


def test_a_unique_violation_comes_as_an_integrity_error_with_its_state() -> None:
    wrapped = over_asyncpg(asyncpg.exceptions.UniqueViolationError("duplicate key value"))
    assert isinstance(wrapped, sa_exc.IntegrityError)
    assert sqlstate(wrapped) == "23505"


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.InterfaceError("cannot perform operation: connection is closed"),
        asyncpg.exceptions.InternalClientError("unexpected connection state"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_client_side_connection_errors_without_a_state_are_transient(error: Exception) -> None:
    wrapped = over_asyncpg(error)
    assert sqlstate(wrapped) is None
    assert is_transient(wrapped)


def test_an_invalidated_connection_is_transient_whatever_the_error() -> None:
    wrapped = over_asyncpg(
        asyncpg.exceptions.UniqueViolationError("duplicate key value"), invalidated=True
    )
    assert is_transient(wrapped)


@pytest.mark.parametrize(
    "text",
    [
        "database is locked",
        "database table is locked: requests",
        "attempt to write a readonly database",
    ],
)
def test_sqlite_contention_is_transient(text: str) -> None:
    assert is_transient(over_sqlite(sqlite3.OperationalError(text)))


@pytest.mark.parametrize(
    "error",
    [
        sqlite3.OperationalError("no such table: requests"),
        sqlite3.OperationalError("disk I/O error"),
        sqlite3.IntegrityError("UNIQUE constraint failed: requests.user_id"),
    ],
    ids=str,
)
def test_other_sqlite_errors_are_not(error: sqlite3.Error) -> None:
    wrapped = over_sqlite(error)
    assert not is_transient(wrapped)
    assert sqlstate(wrapped) is None
    assert is_database_error(wrapped)


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "Connect call failed"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError(),
        sa_exc.TimeoutError("QueuePool limit reached, connection timed out"),
        sa_exc.DisconnectionError("connection lost"),
        CircuitOpen("database", 1.5),
    ],
    ids=lambda e: type(e).__name__,
)
def test_lost_connections_timeouts_and_an_open_breaker_are_transient(error: Exception) -> None:
    assert is_transient(error)
    assert is_database_error(error)


@pytest.mark.parametrize("error", [ValueError("bad"), KeyError("x"), RuntimeError("bug")])
def test_anything_else_is_a_bug_not_a_database_answer(error: Exception) -> None:
    assert not is_transient(error)
    assert not is_database_error(error)
    assert sqlstate(error) is None


# A statement whose answer never came may have run (the intake then reads the log);
# one the server answered with an error, or the driver refused to send, did nothing.
ANSWER_LOST = [
    over_asyncpg(asyncpg.exceptions.ConnectionDoesNotExistError("closed mid-operation")),
    over_asyncpg(asyncpg.exceptions.ConnectionFailureError("connection failure")),
    TimeoutError(),
    ConnectionResetError("connection reset by peer"),
]
ANSWERED = [
    *(over_asyncpg(e) for e in TRANSIENT_POSTGRES[:6]),  # deadlock ... too many clients
    *(over_asyncpg(e) for e in DETERMINISTIC_POSTGRES),
    over_asyncpg(
        asyncpg.exceptions.InterfaceError("cannot perform operation: connection is closed")
    ),
    over_asyncpg(asyncpg.exceptions.UniqueViolationError("duplicate key"), invalidated=True),
]


@pytest.mark.parametrize("error", ANSWER_LOST, ids=repr)
def test_a_broken_connection_or_a_timeout_mid_statement_leaves_its_outcome_unknown(
    error: Exception,
) -> None:
    assert answer_lost(error)


@pytest.mark.parametrize("error", ANSWERED, ids=repr)
def test_an_error_the_server_sent_or_a_refusal_to_send_means_nothing_ran(
    error: Exception,
) -> None:
    assert not answer_lost(error)
