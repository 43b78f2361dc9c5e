"""`fairlane keys list|rotate|retire`: signing-key rotation, straight on the database like
`fairlane migrate` (the auth replicas pick the change up at their next reload; keys.py).

The delay before a new key signs is derived from FAIRLANE_REVOCATION_REFRESH_SECONDS, as
in the replicas: run these with the services' settings."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import NoReturn, TypeVar

from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane_server.auth import keys
from fairlane_server.core.db import create_engine
from fairlane_server.core.settings import Settings

T = TypeVar("T")


def _fail(command: str, message: str, code: int = 1) -> NoReturn:
    print(f"fairlane keys {command}: {message}", file=sys.stderr)
    raise SystemExit(code)


def _run(command: str, settings: Settings, body: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    async def main() -> T:
        engine = create_engine(settings.database_url, schema=settings.database_schema, pool_size=1)
        try:
            return await body(engine)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(main())
    except OSError as exc:
        _fail(command, f"cannot reach the database: {exc}")
    except (ArgumentError, NoSuchModuleError) as exc:
        _fail(command, f"FAIRLANE_DATABASE_URL is not a database URL: {exc}")
    except DBAPIError as exc:
        # No signing_keys table (a wrong schema, or `fairlane migrate` not run), no rights.
        reason = str(exc.orig).splitlines()[0] if exc.orig is not None else type(exc).__name__
        _fail(command, f"the database refused: {reason} (the services' settings, migrated?)")


def _at(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _in(now: datetime, then: datetime) -> str:
    seconds = max(0.0, (then - now).total_seconds())
    return f"in {seconds:.0f} s" if seconds < 120 else f"in {seconds / 60:.0f} min"


def _states(rows: list[keys.KeyRow], now: datetime, delay: float) -> dict[str, str]:
    choice = keys.choose(rows, now, delay)
    states: dict[str, str] = {}
    for row in rows:
        if row.retired_at is not None:
            states[row.kid] = f"retired {_at(row.retired_at)}"
    if choice is None:
        return states
    pending = {r.kid: at for r, at in choice.pending}
    for row in choice.published:
        if row.kid == choice.signing.kid:
            states[row.kid] = "signing" + (" (before it is ready)" if choice.early else "")
        elif row.kid in pending:
            states[row.kid] = f"published, signs from {_at(pending[row.kid])}"
        else:
            states[row.kid] = "published (verifies its tokens, no longer signs)"
    return states


def list_keys() -> None:
    settings = Settings()
    delay = keys.sign_delay(settings.revocation_refresh_seconds)
    rows, now = _run("list", settings, keys.read)
    if not rows:
        print("no signing keys yet (auth creates the first when it starts)")
        return
    states = _states(rows, now, delay)
    print(f"{'KID':32}  {'CREATED':23}  STATE")
    for row in sorted(rows, key=lambda r: r.created_at):
        print(f"{row.kid:32}  {_at(row.created_at):23}  {states[row.kid]}")


def rotate_key() -> None:
    settings = Settings()
    reload = settings.revocation_refresh_seconds
    try:
        encryption = keys.KeyEncryption.from_settings(settings)
    except keys.SigningKeyError as exc:
        _fail("rotate", str(exc))

    async def body(engine: AsyncEngine) -> tuple[keys.Rotated, str | None]:
        try:
            await keys.check_encryption(engine, encryption)
        except keys.SigningKeyError as exc:
            _fail("rotate", str(exc))
        rows, now = await keys.read(engine)
        before = keys.choose(rows, now, keys.sign_delay(reload))
        rotated = await keys.rotate(engine, encryption, reload_seconds=reload)
        return rotated, before.signing.kid if before is not None else None

    rotated, previous = _run("rotate", settings, body)
    print(f"new signing key {rotated.kid}")
    print(
        f"auth replicas publish it within {reload:g} s and sign with it from "
        f"{_at(rotated.signs_from)} ({_in(rotated.created_at, rotated.signs_from)})"
    )
    if previous is not None:
        expired = rotated.signs_from + timedelta(seconds=settings.access_token_ttl_seconds)
        print(
            f"until then they sign with {previous}; tokens it signed expire by "
            f"{_at(expired)}: retire it after that with\n  fairlane keys retire {previous}"
        )


def retire_key(kid: str, *, force: bool) -> None:
    settings = Settings()
    reload = settings.revocation_refresh_seconds
    delay = keys.sign_delay(reload)

    async def body(engine: AsyncEngine) -> tuple[str, datetime, datetime | None]:
        rows, now = await keys.read(engine)
        row = next((r for r in rows if r.kid == kid), None)
        if row is None:
            _fail("retire", f"no signing key {kid} (`fairlane keys list` shows them)")
        if row.retired_at is not None:
            return "already", row.retired_at, None
        choice = keys.choose(rows, now, delay)
        assert choice is not None  # `row` is live
        if len(choice.published) == 1:
            _fail("retire", f"{kid} is the only key: run `fairlane keys rotate` first")
        if choice.signing.kid == kid and not force:
            newer = [at for r, at in choice.pending]
            hint = (
                f"the new key signs from {_at(min(newer))} ({_in(now, min(newer))}); "
                "retire this one after that"
                if newer
                else "run `fairlane keys rotate` first and retire it once the new key signs"
            )
            _fail(
                "retire",
                f"auth replicas sign with {kid} now: {hint}. --force retires it at once "
                "(tokens the new key signs may then be refused for one reload interval)",
            )
        # When it stopped signing: when the next newer key became ready.
        newer_ready = [
            r.created_at + timedelta(seconds=delay)
            for r in choice.published
            if r.created_at > row.created_at
        ]
        stopped = min(newer_ready) if newer_ready else now
        await keys.retire(engine, kid)
        return "retired", now, stopped

    outcome, at, stopped = _run("retire", settings, body)
    if outcome == "already":
        print(f"{kid} was retired already, at {_at(at)}")
        return
    print(
        f"retired {kid}: auth replicas stop publishing it within {reload:g} s; tokens it "
        f"signed are refused by auth from then, by the queue and the workers within "
        f"FAIRLANE_JWKS_REFRESH_SECONDS ({settings.jwks_refresh_seconds:g} s) after"
    )
    assert stopped is not None
    valid_until = min(stopped, at) + timedelta(seconds=settings.access_token_ttl_seconds)
    if valid_until > at:
        print(
            f"note: tokens it signed could be used until {_at(valid_until)}; their holders "
            "must refresh (Refresh tokens do not depend on the signing key)"
        )
