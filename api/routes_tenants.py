"""/tenants/me, /tenants/me/usage, /environments, /livez, /healthz and /metrics."""

from __future__ import annotations

import hmac
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.auth import current_tenant, get_provisioner
from api.schemas import (
    EnvironmentList,
    EnvironmentOut,
    ErrorOut,
    Health,
    ProjectUsage,
    TenantOut,
    UsageOut,
)
from provisioner.service import ClusterService, InvalidRequest
from provisioner.sizes import parse_instant
from provisioner.tenants import Tenant

router = APIRouter()


@router.get("/tenants/me", response_model=TenantOut, tags=["tenants"],
            responses={401: {"model": ErrorOut}})
async def me(
    tenant: Annotated[Tenant, Depends(current_tenant)],
    service: Annotated[ClusterService, Depends(get_provisioner)],
) -> TenantOut:
    return TenantOut(**service.describe_tenant(tenant, await service.usage(tenant)))


@router.get("/environments", response_model=EnvironmentList, tags=["tenants"],
            responses={401: {"model": ErrorOut}})
async def environments(
    tenant: Annotated[Tenant, Depends(current_tenant)],
    service: Annotated[ClusterService, Depends(get_provisioner)],
) -> EnvironmentList:
    """The Python environments this tenant's clusters may run (``environment`` in a create),
    with their versions, so a client can see what differs from its own."""
    directory = service.tenants
    return EnvironmentList(
        default=directory.versions.get("", {}),
        environments=[EnvironmentOut(name=e.name, image=e.image,
                                     versions=directory.versions.get(e.name, {}))
                      for e in directory.environments_of(tenant.name)])


SINCE_HELP = ("epoch seconds, ISO 8601 time (UTC unless it says) or a duration ago (7d, 24h); "
              "default 30 days ago")


def _instant(value: str | None, default: float, now: float) -> float:
    if value is None:
        return default
    try:
        return parse_instant(value, now)
    except ValueError as exc:
        raise InvalidRequest("since", str(exc)) from None


@router.get("/tenants/me/usage", response_model=UsageOut, tags=["tenants"],
            responses={401: {"model": ErrorOut}, 422: {"model": ErrorOut}})
async def my_usage(
    tenant: Annotated[Tenant, Depends(current_tenant)],
    service: Annotated[ClusterService, Depends(get_provisioner)],
    since: Annotated[str | None, Query(max_length=40, description=SINCE_HELP)] = None,
) -> UsageOut:
    now = time.time()
    start = _instant(since, now - 30 * 86400, now)
    if not 0 <= start <= now:
        raise InvalidRequest("since", "must be between the epoch and now")
    books = await service.store.accounting(tenant.name, start, now)
    return UsageOut(
        tenant=tenant.name, since=books.since, until=books.until,
        core_seconds=books.core_seconds, memory_gib_seconds=books.memory_gib_seconds,
        projects=[ProjectUsage(project=p, core_seconds=c, memory_gib_seconds=m)
                  for p, (c, m) in sorted(books.projects.items())],
    )


@router.get("/livez", response_model=Health, tags=["service"])
async def livez(service: Annotated[ClusterService, Depends(get_provisioner)]) -> Health:
    """The process answers: for a liveness probe (a standby answers this too, while its
    ``/healthz`` says 503 until it takes over)."""
    return Health(status="ok", backend=service.backend.name)


@router.get("/healthz", response_model=Health, tags=["service"])
async def healthz(service: Annotated[ClusterService, Depends(get_provisioner)]) -> Health:
    """Liveness, for anyone: nothing about tenants or clusters."""
    return Health(status="ok", backend=service.backend.name)


@router.get("/metrics", tags=["service"], response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, 401: {"model": ErrorOut}})
async def metrics(
    service: Annotated[ClusterService, Depends(get_provisioner)],
    authorization: Annotated[str | None, Header()] = None,
) -> Response:
    """Prometheus metrics (every tenant's name, quota and usage): always behind the metrics
    token (PROVISIONER_METRICS_TOKEN, or the one the service keeps in its data folder)."""
    expected = service.settings.metrics_token
    if not expected or not hmac.compare_digest((authorization or "").encode(),
                                               f"Bearer {expected}".encode()):
        raise HTTPException(401, "metrics need the metrics token (PROVISIONER_METRICS_TOKEN, "
                                 "or the data folder's metrics-token file) as a bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
