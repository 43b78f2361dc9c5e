"""The CLI's credentials cache: one JSON file, readable by its owner only (0600)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from fairlane.client import Tokens

FILE_NAME = "credentials.json"
FILE_MODE = 0o600
DIR_MODE = 0o700


class ConfigError(Exception):
    """The credentials file exists but cannot be used."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """What `fairlane login` leaves for the next commands."""

    username: str
    access_token: str
    refresh_token: str
    expires_at: float
    lifetime: float
    auth_target: str
    queue_target: str
    worker_target: str
    tls: bool = False
    ca_file: str = ""
    # Paths only: the key stays where the user keeps it.
    client_cert_file: str = ""
    client_key_file: str = ""

    @property
    def tokens(self) -> Tokens:
        return Tokens(
            access_token=self.access_token,
            refresh_token=self.refresh_token,
            expires_at=self.expires_at,
            lifetime=self.lifetime,
            username=self.username,
        )

    def with_tokens(self, tokens: Tokens) -> Credentials:
        """These credentials (same targets) with newer tokens."""
        return replace(self, **token_fields(tokens, self.username))


def token_fields(tokens: Tokens, username: str = "") -> dict[str, Any]:
    """The Credentials fields that come from `tokens` (`username` if they name nobody)."""
    values = {f.name: getattr(tokens, f.name) for f in fields(tokens)}
    values["username"] = tokens.username or username
    return values


def config_dir() -> Path:
    """FAIRLANE_CONFIG_DIR, else $XDG_CONFIG_HOME/fairlane, else ~/.config/fairlane."""
    explicit = os.environ.get("FAIRLANE_CONFIG_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".config"
    return base / "fairlane"


def credentials_path() -> Path:
    return config_dir() / FILE_NAME


def load() -> Credentials | None:
    """The cached credentials, or None when there are none."""
    path = credentials_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        # Someone widened it; the file holds secrets, so narrow it again.
        with contextlib.suppress(OSError):
            path.chmod(FILE_MODE)
    try:
        data = json.loads(text)
        known = {f.name for f in fields(Credentials)}
        return Credentials(**{k: v for k, v in data.items() if k in known})
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path} is damaged; run `fairlane login` again") from exc


def save(credentials: Credentials) -> Path:
    """Writes the file atomically with mode 0600 (the directory gets 0700 if new)."""
    path = credentials_path()
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    tmp = path.with_name(f".{FILE_NAME}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), FILE_MODE)  # exactly 0600 whatever the umask
            json.dump(asdict(credentials), out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def clear() -> bool:
    """Deletes the cached credentials; False if there were none."""
    try:
        credentials_path().unlink()
    except FileNotFoundError:
        return False
    return True
