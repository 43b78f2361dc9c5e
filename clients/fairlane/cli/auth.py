"""AuthService commands: register, login, logout, whoami, admin-token."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer

from fairlane.cli import config
from fairlane.cli.connection import Connection, connected
from fairlane.cli.rendering import JsonOutput, jsonable, out, print_json
from fairlane.client import FairlaneError

Username = Annotated[
    str | None,
    typer.Argument(help="User name (asked for when left out).", show_default=False),
]
Password = Annotated[
    str | None,
    typer.Option(
        "--password",
        envvar="FAIRLANE_PASSWORD",
        help="Password (asked for when left out; prefer the prompt or --password-stdin).",
        show_default=False,
    ),
]
PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from the first stdin line.")
]


def _ask(what: str, instead: str, **prompt: Any) -> str:
    """Asks for `what` on the terminal; with nothing to read it from (no terminal, stdin
    at its end), says what gives it instead."""
    try:
        return str(typer.prompt(what.capitalize(), **prompt))
    except typer.Abort:
        if sys.stdin.isatty():
            raise KeyboardInterrupt from None  # Ctrl-C (or Ctrl-D) at the prompt
        raise FairlaneError(f"no {what} given and no terminal to ask on: {instead}") from None


def _username(username: str | None) -> str:
    if username is None:
        return _ask("username", "give it as the USERNAME argument")
    if not username.strip():
        raise FairlaneError("the username is empty")
    return username


def _password(password: str | None, password_stdin: bool, *, confirm: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if password is not None:
        return password
    return _ask(
        "password",
        "use --password-stdin or FAIRLANE_PASSWORD",
        hide_input=True,
        confirmation_prompt=confirm,
    )


@connected
async def register(
    conn: Connection,
    *,
    username: Username = None,
    password: Password = None,
    password_stdin: PasswordStdin = False,
    login: Annotated[
        bool, typer.Option("--login/--no-login", help="Log in as the new user.")
    ] = True,
) -> None:
    """Create a user (and log in as it)."""
    name = _username(username)
    secret = _password(password, password_stdin, confirm=True)
    async with conn.client(use_login=False) as client:
        user_id = await client.register(name, secret)
        if login:
            tokens = await client.login(name, secret)
            config.save(conn.credentials_for(tokens))
    out.print(f"registered [bold]{name}[/] (user id {user_id})" + ("; logged in" if login else ""))


@connected
async def login(
    conn: Connection,
    *,
    username: Username = None,
    password: Password = None,
    password_stdin: PasswordStdin = False,
) -> None:
    """Log in; the tokens and targets are cached for the next commands."""
    name = _username(username)
    secret = _password(password, password_stdin, confirm=False)
    async with conn.client(use_login=False) as client:
        tokens = await client.login(name, secret)
    path = config.save(conn.credentials_for(tokens))
    out.print(f"logged in as [bold]{name}[/] at {conn.auth_target} (credentials in {path})")


@connected
async def logout(conn: Connection) -> None:
    """Revoke the cached refresh token and forget the credentials."""
    if conn.credentials is None:
        out.print("not logged in")
        return
    try:
        async with conn.client() as client:
            await client.logout()
    finally:
        config.clear()
    out.print(f"logged out {conn.credentials.username}")


@connected
async def whoami(conn: Connection, *, json_output: JsonOutput = False) -> None:
    """Show who the cached credentials belong to (asks the server)."""
    async with conn.client() as client:
        me = await client.whoami()
    if json_output:
        print_json({**jsonable(me), "auth_target": conn.auth_target})
    else:
        out.print(f"[bold]{me.username}[/] (user id {me.user_id}) at {conn.auth_target}")


@connected
async def admin_token(
    conn: Connection,
    *,
    name: Annotated[
        str, typer.Option("--name", help="The operator's name, as audit events show it.")
    ] = "operator",
    secret_stdin: Annotated[
        bool,
        typer.Option("--secret-stdin", help="Read the service secret from the first stdin line."),
    ] = False,
) -> None:
    """Print an operator (admin) access token, for the service secret in
    FAIRLANE_SERVICE_SECRET (or stdin): `export FAIRLANE_TOKEN=$(fairlane admin-token)`."""
    secret = (
        sys.stdin.readline().rstrip("\r\n")
        if secret_stdin
        else os.environ.get("FAIRLANE_SERVICE_SECRET", "")
    )
    if not secret:
        raise FairlaneError("no service secret: set FAIRLANE_SERVICE_SECRET or --secret-stdin")
    async with conn.client(use_login=False) as client:
        tokens = await client.admin_token(name, secret)
    print(tokens.access_token)


def register_commands(app: typer.Typer) -> None:
    app.command("admin-token")(admin_token)
    app.command("register")(register)
    app.command("login")(login)
    app.command("logout")(logout)
    app.command("whoami")(whoami)
