"""/tenants/me and /healthz."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from api.auth import current_tenant, get_provisioner
from api.schemas import ErrorOut, Health, TenantOut
from provisioner.service import Provisioner
from provisioner.tenants import Tenant

router = APIRouter()


@router.get("/tenants/me", response_model=TenantOut, tags=["tenants"],
            responses={401: {"model": ErrorOut}})
async def me(
    tenant: Annotated[Tenant, Depends(current_tenant)],
    service: Annotated[Provisioner, Depends(get_provisioner)],
) -> TenantOut:
    return TenantOut(**service.describe_tenant(tenant, await service.usage(tenant)))


@router.get("/healthz", response_model=Health, tags=["service"])
async def healthz(service: Annotated[Provisioner, Depends(get_provisioner)]) -> Health:
    return Health(status="ok", backend=service.backend.name,
                  clusters=len(service.records.live()))
