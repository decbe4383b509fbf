"""Bearer-token authentication: the token is hashed and compared in constant time."""

from __future__ import annotations

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from provisioner.service import Provisioner
from provisioner.tenants import Tenant

_bearer = HTTPBearer(auto_error=False, description="A tenant's token")


def get_provisioner(request: Request) -> Provisioner:
    return request.app.state.provisioner


def current_tenant(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> Tenant:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(401, "missing bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    tenant = get_provisioner(request).tenants.authenticate(credentials.credentials)
    if tenant is None:
        raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
    return tenant
