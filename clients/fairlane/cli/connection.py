"""Where the client commands connect: the shared options, the cache, and `@connected`.

Every client command is an `async def` whose first parameter is a `Connection`;
`@connected` adds the connection options to its command line, resolves them (option or
environment, else what `login` cached, else the defaults), runs the coroutine and turns
failures into one `error: ...` line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Concatenate, overload

import typer

from fairlane.cli import config
from fairlane.cli.rendering import cli_errors
from fairlane.client import Client, FairlaneError, NotLoggedIn, Tokens

DEFAULT_AUTH_TARGET = "127.0.0.1:50051"
DEFAULT_QUEUE_TARGET = "127.0.0.1:50052"
DEFAULT_WORKER_TARGET = "127.0.0.1:50053"
# Lifetime assumed for a --token; its own `exp` claim is used when it has one.
TOKEN_LIFETIME = 900


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise FairlaneError(f"cannot read the {what} {path}: {exc.strerror}") from exc


def positive_seconds(value: float | None) -> float | None:
    """Option callback: a time limit must be more than 0 (0 or less would always expire);
    inf is no limit, and the client cuts one over a year (MAX_TIMEOUT) to a year."""
    if value is not None and not value > 0:  # also refuses nan
        raise typer.BadParameter(f"must be more than 0 seconds, not {value:g}")
    return value


def _option(kind: Any, flag: str, envvar: str, help: str) -> Any:
    """A connection option; unset (None) means: as cached by login, else the default."""
    return Annotated[kind | None, typer.Option(flag, envvar=envvar, help=help, show_default=False)]


def _target_option(service: str, default: str) -> Any:
    return _option(
        str,
        f"--{service}-target",
        f"FAIRLANE_{service.upper()}_TARGET",
        f"{service.title()}Service host:port (default: cached by login, else {default})",
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Connection:
    """Where to connect, from options/environment, else the cache, else defaults."""

    auth_target: str
    queue_target: str
    worker_target: str
    tls: bool
    ca_file: str
    timeout: float
    credentials: config.Credentials | None
    root_certificates: bytes | None = None
    client_cert: bytes | None = None
    client_key: bytes | None = None
    token: str = ""
    client_cert_file: str = ""
    client_key_file: str = ""

    @classmethod
    def resolve(
        cls,
        *,
        auth_target: str | None,
        queue_target: str | None,
        worker_target: str | None,
        tls: bool | None,
        ca_file: Path | None,
        timeout: float,
        client_cert: Path | None = None,
        client_key: Path | None = None,
        token: str | None = None,
    ) -> Connection:
        cached = config.load()
        ca = str(ca_file) if ca_file else (cached.ca_file if cached else "")
        root = _read(ca, "CA file") if ca else None
        if (client_cert is None) != (client_key is None):
            raise FairlaneError("--client-cert and --client-key go together")
        if token is not None and not token.strip():
            # Not "no token": falling back to the cached login would act as someone else.
            raise FairlaneError(
                "--token is empty: give an access token, or leave --token (and "
                "FAIRLANE_TOKEN) out to use the cached login"
            )
        if token is None and os.environ.get("FAIRLANE_TOKEN") is not None:
            # The command line reads an empty variable as unset; an empty one is most often
            # `export FAIRLANE_TOKEN=$(fairlane admin-token)` that failed, and the login is
            # someone else.
            raise FairlaneError(
                "FAIRLANE_TOKEN is set but empty: give it an access token, or unset it to "
                "use the cached login"
            )
        # The certificate given at login goes on being used, as the CA file does.
        cert_file = str(client_cert) if client_cert else (cached.client_cert_file if cached else "")
        key_file = str(client_key) if client_key else (cached.client_key_file if cached else "")
        cert = _read(cert_file, "client certificate") if cert_file else None
        key = _read(key_file, "client key") if key_file else None
        return cls(
            auth_target=auth_target or (cached.auth_target if cached else DEFAULT_AUTH_TARGET),
            queue_target=queue_target or (cached.queue_target if cached else DEFAULT_QUEUE_TARGET),
            worker_target=worker_target
            or (cached.worker_target if cached else DEFAULT_WORKER_TARGET),
            tls=bool(ca)
            or cert is not None
            or (tls if tls is not None else bool(cached and cached.tls)),
            ca_file=ca,
            timeout=timeout,
            credentials=cached,
            root_certificates=root,
            client_cert=cert,
            client_key=key,
            token=token or "",
            client_cert_file=cert_file,
            client_key_file=key_file,
        )

    def credentials_for(self, tokens: Tokens) -> config.Credentials:
        return config.Credentials(
            **config.token_fields(tokens),
            auth_target=self.auth_target,
            queue_target=self.queue_target,
            worker_target=self.worker_target,
            tls=self.tls,
            ca_file=self.ca_file,
            client_cert_file=self.client_cert_file,
            client_key_file=self.client_key_file,
        )

    @asynccontextmanager
    async def client(
        self, *, use_login: bool = True, require_login: bool = True
    ) -> AsyncIterator[Client]:
        """A Client using (and keeping up to date in the cache) the cached tokens, or the
        --token given instead."""
        if self.token and use_login:
            async with self._client(Tokens.issued(self.token, "", TOKEN_LIFETIME), None) as c:
                yield c
            return
        tokens = self.credentials.tokens if self.credentials and use_login else None
        if require_login and use_login and tokens is None:
            raise NotLoggedIn("not logged in: run `fairlane login` first")

        def persist(new: Tokens | None) -> None:
            if new is None:
                config.clear()
            elif self.credentials is not None:
                config.save(self.credentials.with_tokens(new))

        async with self._client(tokens, persist if tokens is not None else None) as client:
            yield client

    def _client(self, tokens: Tokens | None, on_tokens: Any) -> Client:
        return Client(
            self.auth_target,
            self.queue_target,
            self.worker_target,
            tls=self.tls,
            root_certificates=self.root_certificates,
            client_cert=self.client_cert,
            client_key=self.client_key,
            timeout=self.timeout,
            tokens=tokens,
            on_tokens=on_tokens,
        )


# -- the decorator ---------------------------------------------------------------------------

AsyncCommand = Callable[Concatenate[Connection, ...], Coroutine[Any, Any, None]]
Command = Callable[..., None]

# The options every client command takes, as parameters of the command's signature (typer
# builds the command line from the signature).
_OPTIONS = tuple(
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
    for name, annotation, default in (
        ("auth_target", _target_option("auth", DEFAULT_AUTH_TARGET), None),
        ("queue_target", _target_option("queue", DEFAULT_QUEUE_TARGET), None),
        ("worker_target", _target_option("worker", DEFAULT_WORKER_TARGET), None),
        (
            "tls",
            _option(
                bool, "--tls/--no-tls", "FAIRLANE_TLS", "Use TLS (default: as at login, else no)."
            ),
            None,
        ),
        (
            "ca_file",
            _option(
                Path,
                "--ca-file",
                "FAIRLANE_CA_FILE",
                "PEM root certificates for TLS (implies --tls; default: system roots).",
            ),
            None,
        ),
        (
            "client_cert",
            _option(
                Path,
                "--client-cert",
                "FAIRLANE_CLIENT_CERT_FILE",
                "PEM client certificate for servers that require one (mTLS; implies --tls).",
            ),
            None,
        ),
        (
            "client_key",
            _option(Path, "--client-key", "FAIRLANE_CLIENT_KEY_FILE", "PEM key of --client-cert."),
            None,
        ),
        (
            "token",
            _option(
                str,
                "--token",
                "FAIRLANE_TOKEN",
                "Access token to use instead of the login (e.g. from `fairlane admin-token`).",
            ),
            None,
        ),
        (
            "timeout",
            Annotated[
                float,
                typer.Option(
                    "--timeout",
                    envvar="FAIRLANE_TIMEOUT",
                    help="Deadline of each call, seconds (more than 0; inf: none).",
                    callback=positive_seconds,
                ),
            ],
            10.0,
        ),
    )
)


@overload
def connected(command: AsyncCommand, /) -> Command: ...


@overload
def connected(*, quiet_interrupt: bool = False) -> Callable[[AsyncCommand], Command]: ...


def connected(
    command: AsyncCommand | None = None, /, *, quiet_interrupt: bool = False
) -> Command | Callable[[AsyncCommand], Command]:
    """Makes `async def cmd(conn: Connection, *, ...)` a typer command with the shared
    connection options. Ctrl-C exits 130 with `error: interrupted`, or with
    `quiet_interrupt` 0 and nothing printed (for commands that run until stopped)."""

    def apply(command: AsyncCommand) -> Command:
        signature = inspect.signature(command, eval_str=True)
        own = list(signature.parameters.values())[1:]  # all but the Connection
        clash = {p.name for p in own} & {p.name for p in _OPTIONS}
        if clash:
            raise TypeError(f"{command.__name__} redefines connection options {clash}")

        @functools.wraps(command)
        def run(**kwargs: Any) -> None:
            options = {p.name: kwargs.pop(p.name) for p in _OPTIONS}
            conn = Connection.resolve(**options)
            try:
                asyncio.run(command(conn, **kwargs))
            except KeyboardInterrupt:
                if not quiet_interrupt:
                    raise

        params = [*own, *_OPTIONS]
        run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
        return cli_errors(run)

    return apply if command is None else apply(command)
