"""Who may see a cluster's dashboard through the service: signed links and browser sessions.

A browser cannot send a bearer header, and the tenant's token must never sit in a URL or a
cookie. So a tenant asks (with its token) for a short-lived *link* to one cluster's
dashboard; the link's token is an HMAC over (tenant, cluster, expiry) with a service key.
A request that carries a valid link is given a *session* cookie (the same signature, for
another purpose and a longer expiry) scoped to that cluster's dashboard path, so the page's
assets and its websocket authenticate by cookie. Nothing here is stored: a restart with a
new key (:func:`link_key`) ends every link and session.

Tokens read ``<tenant>.<expiry>.<mac>``: tenant names are ``[a-z0-9-]`` and the MAC is
base64url, so a token fits a path segment, a query value and a cookie unquoted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from dataclasses import dataclass

from fastapi import HTTPException
from starlette.requests import HTTPConnection

from api.auth import CHALLENGE, bearer_token, get_provisioner, tenant_for
from clusters.runner import dashboard_prefix
from provisioner.service import ClusterService
from provisioner.tenants import NAME_PATTERN, Tenant

#: The browser session's cookie; its path is the one cluster's dashboard.
COOKIE = "provisioner-dashboard"
LINK = "dashboard-link"
SESSION = "dashboard-session"
#: Longest lifetime a link may be asked for (the JupyterLab extension keeps its URL for a
#: working day); sessions have their own setting.
MAX_LINK_TTL = 86400
MAX_TOKEN = 200
#: At most this many of our cookies are looked at in one request (a page of the same origin
#: can add cookies of the same name for other paths; each is tried, a few at most).
MAX_COOKIES = 8
_TOKEN = re.compile(r"([a-z0-9-]{1,63})\.([0-9]{1,12})\.([A-Za-z0-9_-]{43})")
_NAME = re.compile(NAME_PATTERN)



def link_key(service: ClusterService) -> bytes:
    """The key that signs dashboard links and sessions: derived from the service's secret
    key, so links outlive a restart and hold across replicas sharing that key."""
    return service.store.keyring.derive("dashboard-links")


def _mac(key: bytes, purpose: str, tenant: str, cluster_id: str, expires_at: int) -> str:
    message = "\0".join((purpose, tenant, cluster_id, str(expires_at))).encode()
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def sign(key: bytes, purpose: str, tenant: str, cluster_id: str, expires_at: int) -> str:
    return f"{tenant}.{expires_at}.{_mac(key, purpose, tenant, cluster_id, expires_at)}"


def verify(key: bytes, purpose: str, token: str, cluster_id: str,
           now: float | None = None) -> str | None:
    """The tenant a token was signed for, if it is for ``purpose`` and this cluster and has
    not expired; None for anything else (malformed, tampered, expired, another cluster's)."""
    if len(token) > MAX_TOKEN:
        return None
    match = _TOKEN.fullmatch(token)
    if match is None or not _NAME.fullmatch(match[1]):
        return None
    tenant, expires_at, mac = match[1], int(match[2]), match[3]
    expected = _mac(key, purpose, tenant, cluster_id, expires_at)
    if not hmac.compare_digest(mac, expected):
        return None
    if expires_at <= (time.time() if now is None else now):
        return None
    return tenant


def new_link(service: ClusterService, tenant: Tenant, cluster_id: str,
             ttl: float) -> tuple[str, int]:
    """A link token for ``tenant``'s cluster and when it expires (epoch seconds)."""
    expires_at = int(time.time() + min(ttl, MAX_LINK_TTL))
    return sign(link_key(service), LINK, tenant.name, cluster_id, expires_at), expires_at


def cookie_path(cluster_id: str) -> str:
    """The session cookie's path: this cluster's dashboard and nothing else of the service."""
    return dashboard_prefix(cluster_id) + "/"


def session_cookie(service: ClusterService, tenant: Tenant, cluster_id: str,
                   secure: bool) -> str:
    """A ``Set-Cookie`` value for a browser session on one cluster's dashboard."""
    ttl = int(service.settings.dashboard_session_ttl)
    value = sign(link_key(service), SESSION, tenant.name, cluster_id, int(time.time()) + ttl)
    parts = [f"{COOKIE}={value}", f"Path={cookie_path(cluster_id)}", f"Max-Age={ttl}",
             "HttpOnly", "SameSite=Lax"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def _cookies(conn: HTTPConnection) -> list[str]:
    """Every value of our cookie in the request, in order, a few at most."""
    found = []
    for header in conn.headers.getlist("cookie"):
        for item in header.split(";"):
            name, _, value = item.strip().partition("=")
            if name == COOKIE and value:
                found.append(value.strip('"'))
                if len(found) >= MAX_COOKIES:
                    return found
    return found


@dataclass(frozen=True, slots=True)
class Access:
    """Who is asking, and whether a link got them in (then the browser gets a session)."""

    tenant: Tenant
    by_link: bool


def _known(service: ClusterService, name: str | None) -> Tenant | None:
    return service.tenants.get(name) if name is not None else None


def authenticate(conn: HTTPConnection, cluster_id: str, link: str | None) -> Access:
    """The caller of a dashboard request: a link token (path or query), the bearer token, or
    the session cookie, in that order; 401 when none of them holds. A link or session names
    only its tenant and cluster, so a bad one says nothing of whether the cluster exists."""
    service = get_provisioner(conn)
    key = link_key(service)
    if link is not None:
        tenant = _known(service, verify(key, LINK, link, cluster_id))
        if tenant is not None:
            return Access(tenant, by_link=True)
    token = bearer_token(conn)
    if token is not None:
        return Access(tenant_for(service, token), by_link=False)
    for value in _cookies(conn):
        tenant = _known(service, verify(key, SESSION, value, cluster_id))
        if tenant is not None:
            return Access(tenant, by_link=False)
    if link is not None:
        raise HTTPException(401, "dashboard link invalid or expired: ask for a new one "
                                 "(GET /clusters/{id}/dashboard-link)", headers=CHALLENGE)
    raise HTTPException(401, "missing credentials: a bearer token, a dashboard link or its "
                             "session cookie", headers=CHALLENGE)
