"""Hardening of the operator's web page: ids, headers, authentication, where it may bind.

- Ids in URLs are ASCII digits that fit a 64-bit row id; anything else is a 404, never a
  500 (``/heatmap/²``, a 40-digit number).
- Every response carries a strict Content-Security-Policy (the page has no script and no
  external resource), ``nosniff``, ``X-Frame-Options: DENY`` and ``Referrer-Policy``.
- Optional authentication from settings: a bearer token (``web_auth_token``) and/or HTTP
  basic (``web_auth_user`` + ``web_auth_password``).  ``/healthz`` stays open for probes.
- Binding beyond localhost without authentication is refused at start.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import re

from db.settings import Settings

SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": ("default-src 'none'; style-src 'self'; img-src 'self'; "
                                "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
#: Paths answered without authentication (health probes of the orchestrator).
OPEN_PATHS = frozenset({"/healthz"})
_ID_RE = re.compile(r"[0-9]{1,19}")
_MAX_ID = 2**63 - 1


class WebBindError(ValueError):
    """The page would be reachable beyond this host without authentication (operator's
    fault)."""


def parse_id(text: str) -> int | None:
    """A row id from a URL, or None where it is not plain ASCII digits of a 64-bit id."""
    if not _ID_RE.fullmatch(text):
        return None
    value = int(text)
    return value if 0 < value <= _MAX_ID else None


def auth_configured(settings: Settings) -> bool:
    return bool(settings.web_auth_token or (settings.web_auth_user
                                             and settings.web_auth_password))


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                               expected.encode("utf-8", "surrogateescape"))


def authorised(authorization: str | None, settings: Settings, path: str) -> bool:
    """True where no authentication is configured, the path is open, or the request's
    ``Authorization`` header value carries the token or the basic credentials."""
    if not auth_configured(settings) or path in OPEN_PATHS:
        return True
    value = authorization or ""
    scheme, _, credentials = value.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and settings.web_auth_token:
        return _same(credentials.strip(), settings.web_auth_token)
    if scheme == "basic" and settings.web_auth_user and settings.web_auth_password:
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, sep, password = decoded.partition(":")
        return bool(sep) and _same(user, settings.web_auth_user) and \
            _same(password, settings.web_auth_password)
    return False


def challenge(settings: Settings) -> str:
    """The ``WWW-Authenticate`` value for a 401."""
    if settings.web_auth_user and settings.web_auth_password:
        return 'Basic realm="cxr-triage", charset="UTF-8"'
    return 'Bearer realm="cxr-triage"'


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, settings: Settings) -> None:
    """Refuse to serve beyond localhost without authentication."""
    if not is_loopback(host) and not auth_configured(settings):
        raise WebBindError(
            f"refusing to serve the web page on {host} without authentication: set "
            "CXR_WEB_AUTH_TOKEN, or CXR_WEB_AUTH_USER and CXR_WEB_AUTH_PASSWORD, or bind "
            "to 127.0.0.1")


__all__ = ["OPEN_PATHS", "SECURITY_HEADERS", "WebBindError", "auth_configured", "authorised",
           "challenge", "check_bind", "is_loopback", "parse_id"]
