"""Who is asking: a signed session (form login), HTTP Basic (API clients), or a trusted reverse proxy's headers
(SSO). Plus the CSRF token every form carries and the failed-login throttle.

Passwords are only ever compared through argon2 (config.verify_password); a Basic client sends its password on
every request, so a verified (user, password) pair is remembered for a minute as a keyed hash, never as text.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable

from pipeline.web.config import ConsoleSettings, verify_password
from pipeline.web.views import Viewer

log = logging.getLogger("trainwatch.console")

_BASIC_CACHE_S = 60.0


class LoginThrottle:
    """Failed logins per (user name, client address) in a sliding window; over the limit, logins are refused
    without checking the password (so guessing stops costing us argon2 work too)."""

    def __init__(self, max_failures: int, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_failures = max_failures
        self.window_s = window_s
        self.clock = clock
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str]) -> deque[float]:
        q = self._failures.setdefault(key, deque())
        cutoff = self.clock() - self.window_s
        while q and q[0] < cutoff:
            q.popleft()
        return q

    def blocked(self, user: str, client: str) -> bool:
        with self._lock:
            return len(self._recent((user.lower(), client))) >= self.max_failures

    def failed(self, user: str, client: str) -> int:
        with self._lock:
            q = self._recent((user.lower(), client))
            q.append(self.clock())
            if len(self._failures) > 100_000:  # bound memory under a spray of names: drop the stalest keys
                for k in [k for k, v in self._failures.items() if not v][:50_000]:
                    del self._failures[k]
            return len(q)

    def succeeded(self, user: str, client: str) -> None:
        with self._lock:
            self._failures.pop((user.lower(), client), None)


class Authenticator:
    def __init__(self, settings: ConsoleSettings):
        self.settings = settings
        self.throttle = LoginThrottle(settings.login_max_failures, settings.login_window_s)
        self._key = secrets.token_bytes(32)
        self._verified: dict[str, float] = {}

    def check_password(self, user: str, password: str, client: str) -> Viewer | bool | None:
        """The viewer, None on a wrong name or password, or False when throttled (the caller answers 429)."""
        if self.throttle.blocked(user, client):
            log.warning("console login refused (throttled): user=%r client=%s", user, client)
            return False
        account = self.settings.users.get(user)
        if verify_password(account.password_hash if account else None, password) and account is not None:
            self.throttle.succeeded(user, client)
            return Viewer(user, account.role)
        n = self.throttle.failed(user, client)
        # Never the password: the name, where from, and how many failures in the window.
        log.warning("console login failed: user=%r client=%s failures_in_window=%d", user, client, n)
        return None

    def basic(self, header: str | None, client: str) -> Viewer | bool | None:
        """Viewer from an `Authorization: Basic` header (None: absent or wrong; False: throttled)."""
        if not header or not header.lower().startswith("basic "):
            return None
        try:
            user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        account = self.settings.users.get(user)
        tag = hmac.new(self._key, f"{user}\0{password}".encode(), hashlib.sha256).hexdigest()
        if self.throttle.blocked(user, client):  # before the cache: a throttled name is refused outright
            return False
        if account is not None and self._verified.get(tag, 0.0) > time.monotonic():
            return Viewer(user, account.role)
        found = self.check_password(user, password, client)
        if isinstance(found, Viewer):
            if len(self._verified) > 10_000:
                self._verified.clear()
            self._verified[tag] = time.monotonic() + _BASIC_CACHE_S
        return found

    def proxied(self, headers: dict[str, str] | object, client: str) -> Viewer | None:
        """Viewer from a trusted reverse proxy's headers (SSO), only in proxy mode and only from its address."""
        s = self.settings
        if not s.proxy_auth or client not in s.proxy_trusted:
            return None
        user = headers.get(s.proxy_user_header)  # type: ignore[attr-defined]
        if not user:
            return None
        groups = {g.strip() for g in (headers.get(s.proxy_groups_header) or "").replace(";", ",").split(",")}  # type: ignore[attr-defined]
        return Viewer(user.strip(), "compliance" if s.proxy_compliance_group in groups else "analyst")

    def session_viewer(self, session: dict) -> Viewer | None:
        """The session's user, re-checked against the settings (a removed user or changed role ends it)."""
        user = session.get("user")
        account = self.settings.users.get(user) if isinstance(user, str) else None
        if account is None:
            return None
        return Viewer(user, account.role)


def csrf_token(session: dict) -> str:
    tok = session.get("csrf")
    if not isinstance(tok, str):
        tok = session["csrf"] = secrets.token_urlsafe(32)
    return tok


def csrf_ok(session: dict, sent: str | None) -> bool:
    tok = session.get("csrf")
    return isinstance(tok, str) and isinstance(sent, str) and hmac.compare_digest(tok, sent)
