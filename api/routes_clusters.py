"""/clusters: create, list, show, scale, adapt, stop."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from api.auth import current_tenant, get_provisioner
from api.schemas import (
    PROJECT_PATTERN,
    AdaptRequest,
    ClusterCreate,
    ClusterList,
    ClusterOut,
    Credentials,
    ErrorOut,
    EventList,
    EventOut,
    ScaleRequest,
)
from api.urls import public_base
from provisioner.models import CLUSTER_ID_PATTERN, ClusterRecord, Status
from provisioner.service import ClusterRequest, ClusterService, Conflict
from provisioner.tenants import Tenant
from provisioner.tls import client_credentials

router = APIRouter(
    prefix="/clusters",
    tags=["clusters"],
    responses={401: {"model": ErrorOut}, 422: {"model": ErrorOut}},
)

TenantDep = Annotated[Tenant, Depends(current_tenant)]
ServiceDep = Annotated[ClusterService, Depends(get_provisioner)]
#: The service's public base URL: cluster JSON links the dashboard through the service.
BaseDep = Annotated[str, Depends(public_base)]
def _out(service: ClusterService, record: ClusterRecord, base: str) -> ClusterOut:
    position, reason = service.queue.where(record)
    return ClusterOut.of(record, base, waiting=service.waiting(record), queue_position=position,
                         waiting_for=reason)


Wait = Annotated[float, Query(ge=0, le=600, description="seconds to wait until running")]


@router.post("", status_code=201, response_model=ClusterOut,
             responses={403: {"model": ErrorOut}})
async def create_cluster(
    tenant: TenantDep, service: ServiceDep, base: BaseDep, body: ClusterCreate | None = None,
    wait: Wait = 0,
) -> ClusterOut:
    body = body or ClusterCreate()
    request = ClusterRequest(
        project=body.project,
        workers=body.workers,
        worker_cores=body.worker_cores,
        worker_memory=body.worker_memory,
        adaptive_minimum=body.adaptive.minimum if body.adaptive else None,
        adaptive_maximum=body.adaptive.maximum if body.adaptive else None,
        idle_timeout=body.idle_timeout,
        no_client_timeout=body.no_client_timeout,
        queue=body.queue,
        env=body.env,
        image=body.image,
        environment=body.environment,
    )
    record = await service.create(tenant, request)
    if wait:
        record = await service.wait(tenant, record.id, wait)
    return _out(service, record, base)


@router.get("", response_model=ClusterList)
async def list_clusters(
    tenant: TenantDep,
    service: ServiceDep,
    base: BaseDep,
    status: Status | None = None,
    live: Annotated[bool, Query(description="only clusters that have not ended")] = False,
    project: Annotated[str | None, Query(pattern=PROJECT_PATTERN)] = None,
    limit: Annotated[int | None, Query(ge=1, le=1000, description="page size")] = None,
    after: Annotated[str | None, Query(pattern=CLUSTER_ID_PATTERN,
                                       description="`next` of the last page")] = None,
) -> ClusterList:
    records, next_id = await service.page(tenant, status, project, limit, after, live=live)
    return ClusterList(clusters=[_out(service, r, base) for r in records], next=next_id)


@router.get("/{cluster_id}", response_model=ClusterOut, responses={404: {"model": ErrorOut}})
async def get_cluster(
    cluster_id: str, tenant: TenantDep, service: ServiceDep, base: BaseDep, wait: Wait = 0
) -> ClusterOut:
    if wait:
        return _out(service, await service.wait(tenant, cluster_id, wait), base)
    return _out(service, await service.get(tenant, cluster_id), base)


@router.get("/{cluster_id}/events", response_model=EventList,
            responses={404: {"model": ErrorOut}})
async def cluster_events(cluster_id: str, tenant: TenantDep, service: ServiceDep) -> EventList:
    """What happened to the cluster and why, oldest first (its last 500 events)."""
    return EventList(events=[EventOut(at=e.at, kind=e.kind, detail=e.detail)
                             for e in await service.events(tenant, cluster_id)])


@router.post("/{cluster_id}/scale", response_model=ClusterOut,
             responses={403: {"model": ErrorOut}, 404: {"model": ErrorOut},
                        409: {"model": ErrorOut}})
async def scale_cluster(
    cluster_id: str, body: ScaleRequest, tenant: TenantDep, service: ServiceDep, base: BaseDep
) -> ClusterOut:
    return _out(service, await service.scale(tenant, cluster_id, body.workers), base)


@router.post("/{cluster_id}/adapt", response_model=ClusterOut,
             responses={403: {"model": ErrorOut}, 404: {"model": ErrorOut},
                        409: {"model": ErrorOut}})
async def adapt_cluster(
    cluster_id: str, body: AdaptRequest, tenant: TenantDep, service: ServiceDep, base: BaseDep
) -> ClusterOut:
    return _out(service, await service.adapt(tenant, cluster_id, body.minimum, body.maximum), base)


@router.delete("/{cluster_id}", response_model=ClusterOut, responses={404: {"model": ErrorOut}})
async def delete_cluster(
    cluster_id: str, tenant: TenantDep, service: ServiceDep, base: BaseDep
) -> ClusterOut:
    return _out(service, await service.delete(tenant, cluster_id), base)


@router.get("/{cluster_id}/credentials", response_model=Credentials,
            responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut}})
async def cluster_credentials(cluster_id: str, tenant: TenantDep, service: ServiceDep) -> Credentials:
    """The cluster's CA and a client certificate: what ``Client(address, security=...)`` needs."""
    record = await service.get(tenant, cluster_id)
    creds = client_credentials(record.credentials)
    if not creds:
        raise Conflict("tls", f"cluster {cluster_id} does not use TLS")
    return Credentials(scheduler_address=record.scheduler_address, tls_ca=creds["ca"],
                       tls_cert=creds["cert"], tls_key=creds["key"])
