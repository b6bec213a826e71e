"""Console password hashing, and the console's settings (defined with the others in pipeline/settings.py:
`[console]` in the TOML file or `TRAINWATCH_CONSOLE__*` in the environment)."""

from __future__ import annotations

import functools
import secrets
from typing import Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from pipeline.settings import ConsoleSettings, ConsoleUser

__all__ = ["ROLES", "ConsoleSettings", "ConsoleUser", "Role", "hash_password", "verify_password"]

Role = Literal["analyst", "compliance"]
ROLES: tuple[Role, ...] = ("analyst", "compliance")

# argon2id with the library's defaults (RFC 9106 low-memory profile): the hash string carries its parameters.
_HASHER = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the user does not exist, so an unknown name costs the same time as a wrong password
    (made on first use: hashing costs as much as a login)."""
    return _HASHER.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """True when `password` matches; a missing user or a malformed hash is a mismatch, after the same work."""
    try:
        return _HASHER.verify(stored_hash or _dummy_hash(), password) and stored_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
