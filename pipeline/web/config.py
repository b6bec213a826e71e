"""Console settings: environment variables `TRAINWATCH_CONSOLE__*` (JSON for the user table), and password hashing.

Kept out of pipeline/settings.py for now so the console adds no key that `Settings(extra="forbid")` would reject
in other stages' config files; `serve` reads both objects at its entry point.
"""

from __future__ import annotations

import functools
import secrets
from typing import Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

Role = Literal["analyst", "compliance"]
ROLES: tuple[Role, ...] = ("analyst", "compliance")

# argon2id with the library's defaults (RFC 9106 low-memory profile): the hash string carries its parameters.
_HASHER = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the user does not exist, so an unknown name costs the same time as a wrong password
    (made on first use: hashing costs as much as a login)."""
    return _HASHER.hash(secrets.token_urlsafe(16))


class ConsoleUser(BaseModel):
    role: Role
    password_hash: str = Field(description="argon2 hash (`trainwatch serve hash-password`), never the password")


class ConsoleSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINWATCH_CONSOLE__", env_nested_delimiter="__", extra="forbid")

    host: str = Field(default="127.0.0.1", description="bind address; loopback unless deliberately opened")
    port: int = Field(default=8080, ge=0, le=65535)
    users: dict[str, ConsoleUser] = Field(default_factory=dict)
    #: Signs session cookies. None: a random key per process (sessions end when the server restarts).
    secret_key: SecretStr | None = None
    session_max_age_s: int = Field(default=8 * 3600, gt=0)
    #: Set on HTTPS deployments so the browser never sends the session over plain HTTP.
    secure_cookies: bool = False
    #: Reverse-proxy SSO: trust `proxy_user_header` / `proxy_groups_header` from these peer addresses only.
    proxy_auth: bool = False
    proxy_trusted: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"])
    proxy_user_header: str = "X-Forwarded-User"
    proxy_groups_header: str = "X-Forwarded-Groups"
    #: A proxied user in this group is `compliance`; any other authenticated user is `analyst`.
    proxy_compliance_group: str = "trainwatch-compliance"
    #: Failed logins allowed per (user name, client address) within the window before 429s.
    login_max_failures: int = Field(default=5, ge=1)
    login_window_s: float = Field(default=300.0, gt=0)


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """True when `password` matches; a missing user or a malformed hash is a mismatch, after the same work."""
    try:
        return _HASHER.verify(stored_hash or _dummy_hash(), password) and stored_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
