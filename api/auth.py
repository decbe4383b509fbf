"""Bearer-token authentication: the token is hashed and compared in constant time."""

from __future__ import annotations

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from provisioner.service import ClusterService
from provisioner.tenants import Tenant

_bearer = HTTPBearer(auto_error=False, description="A tenant's token")
CHALLENGE = {"WWW-Authenticate": "Bearer"}


def get_provisioner(conn: HTTPConnection) -> ClusterService:
    return conn.app.state.provisioner


def bearer_token(conn: HTTPConnection) -> str | None:
    """The token of an ``Authorization: Bearer`` header (any request, websockets too)."""
    scheme, _, token = conn.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def tenant_for(service: ClusterService, token: str) -> Tenant:
    """The tenant holding ``token``, or 401."""
    tenant = service.tenants.authenticate(token)
    if tenant is None:
        raise HTTPException(401, "invalid token", headers=CHALLENGE)
    return tenant


def current_tenant(
    conn: HTTPConnection,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> Tenant:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(401, "missing bearer token", headers=CHALLENGE)
    return tenant_for(get_provisioner(conn), credentials.credentials)
