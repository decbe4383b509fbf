"""Request and response bodies of the REST contract (see DESIGN.md)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from api.urls import dashboard_url
from clusters.runtime_env import check_env
from provisioner.models import ClusterRecord
from provisioner.sizes import MAX_SECONDS, parse_bytes, parse_seconds
from provisioner.tenants import NAME_PATTERN

MAX_WORKERS = 10_000
MAX_CORES = 1024.0
MIN_CORES = 0.01
MAX_ENV = 64

Bytes = Annotated[int, BeforeValidator(parse_bytes), Field(ge=1, le=2**50)]
Seconds = Annotated[float, BeforeValidator(parse_seconds), Field(gt=0, le=MAX_SECONDS)]
WorkerCount = Annotated[int, Field(ge=0, le=MAX_WORKERS)]
PROJECT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdaptiveSpec(Strict):
    minimum: WorkerCount = 0
    maximum: WorkerCount


class ClusterCreate(Strict):
    """Every field is optional: the tenant's defaults fill the rest."""

    project: str = Field(default="default", pattern=PROJECT_PATTERN)
    workers: WorkerCount | None = None
    #: A worker gets this much CPU time (its cgroup's quota) on whole threads; the kernel
    #: gives no less than a hundredth of a core.
    worker_cores: float | None = Field(default=None, ge=MIN_CORES, le=MAX_CORES, allow_inf_nan=False)
    worker_memory: Bytes | None = None
    adaptive: AdaptiveSpec | None = None
    idle_timeout: Seconds | None = None
    no_client_timeout: Seconds | None = None
    env: dict[str, Annotated[str, Field(max_length=4096)]] = Field(default_factory=dict,
                                                                   max_length=MAX_ENV)
    image: str | None = Field(default=None, min_length=1, max_length=512,
                              pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")
    environment: str | None = Field(
        default=None, pattern=NAME_PATTERN,
        description="a Python environment the operator registered (GET /environments)")
    queue: bool | None = Field(
        default=None, description="when it does not fit now: wait in the queue (201, status "
        "queued) or be refused (403); default: the tenant's setting (queue)")

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        return check_env(env)


class ScaleRequest(Strict):
    workers: WorkerCount


class AdaptRequest(Strict):
    minimum: WorkerCount = 0
    maximum: WorkerCount | None = Field(
        None, description="most workers; default: as many as the tenant's quota allows")


class WorkerCounts(BaseModel):
    requested: int
    running: int


class AdaptiveOut(BaseModel):
    minimum: int
    maximum: int


class OutcomeOut(BaseModel):
    """How a cluster ended (or why it is being stopped): a reason from a fixed list
    (user, idle, no-client, service-shutdown, failed) and, for a failure, what happened."""

    reason: str
    detail: str | None


class ClusterOut(BaseModel):
    id: str
    tenant: str
    project: str
    status: str
    wanted: str = Field(description="what the cluster should be doing: running or stopped")
    scheduler_address: str | None
    dashboard_url: str | None
    workers: WorkerCounts
    worker_cores: float
    worker_memory: int
    adaptive: AdaptiveOut | None
    idle_timeout: float
    no_client_timeout: float
    image: str | None
    environment: str | None
    tls: bool
    created_at: float
    started_at: float | None
    stopped_at: float | None
    stop_reason: str | None = Field(
        description="the outcome in one line: 'idle', 'failed: scheduler exited with status 1'")
    outcome: OutcomeOut | None
    waiting: str | None = Field(
        None, description="why some of its processes wait to run: a batch queue's reason "
                          "(Slurm's pending reason), while they wait")
    queue_position: int | None = Field(None, description="while queued: 1 is admitted next")
    waiting_for: str | None = Field(
        None, description="while queued: what it waits for ('pool full: cores 1.5 requested, "
                          "0.5 of 3 free in the pool')")

    @classmethod
    def of(cls, r: ClusterRecord, base: str, waiting: str | None = None,
           queue_position: int | None = None, waiting_for: str | None = None) -> ClusterOut:
        """The cluster as a tenant sees it; ``base`` is the service's public URL. The record's
        own dashboard URL is the scheduler's (an upstream of the proxy), never shown."""
        dashboard = dashboard_url(base, r.id) if r.dashboard_url and not r.status.terminal else None
        return cls(
            id=r.id, tenant=r.tenant, project=r.project, status=r.status.value,
            wanted=r.wanted.value,
            scheduler_address=r.scheduler_address, dashboard_url=dashboard,
            workers=WorkerCounts(requested=r.workers_requested, running=r.workers_running),
            worker_cores=r.worker_cores, worker_memory=r.worker_memory,
            adaptive=AdaptiveOut(minimum=r.adaptive_minimum or 0, maximum=r.adaptive_maximum)
            if r.adaptive_maximum is not None else None,
            idle_timeout=r.idle_timeout, no_client_timeout=r.no_client_timeout,
            image=r.image, environment=r.environment, tls=bool(r.credentials),
            created_at=r.created_at, started_at=r.started_at, stopped_at=r.stopped_at,
            stop_reason=r.outcome.summary() if r.outcome else None,
            outcome=OutcomeOut(reason=r.outcome.reason.value, detail=r.outcome.detail)
            if r.outcome else None,
            waiting=waiting, queue_position=queue_position, waiting_for=waiting_for,
        )


class EventOut(BaseModel):
    at: float
    kind: str = Field(description="created, queued, admitted, running, scaled, worker-lost, "
                                  "stopping, stopped, failed")
    detail: str | None = Field(description="why, in the service's words")


class EventList(BaseModel):
    events: list[EventOut]


class EnvironmentOut(BaseModel):
    name: str
    image: str | None
    versions: dict[str, str] = Field(
        description="python and the packages that matter, as the environment has them "
                    "(empty when the service cannot read them: a path on Mesos agents only)")


class EnvironmentList(BaseModel):
    """What a tenant's clusters may run: the service's own environment (clusters that name
    none) and the named ones this tenant may use."""

    default: dict[str, str]
    environments: list[EnvironmentOut]


class ClusterList(BaseModel):
    clusters: list[ClusterOut]
    next: str | None = Field(
        None, description="pass as ?after= for the next page; null on the last page")


class Credentials(BaseModel):
    """What a client needs to reach a TLS cluster: its CA and a client certificate."""

    scheduler_address: str | None
    tls_ca: str
    tls_cert: str
    tls_key: str


class DashboardLink(BaseModel):
    """A signed link to a cluster's dashboard, for a browser (no token needed)."""

    url: str = Field(description="the dashboard's status page; opening it starts a browser "
                                 "session on this cluster's dashboard (a cookie)")
    path_url: str = Field(description="the dashboard's root with the link in its path, for "
                                      "tools that append pages to a URL (the JupyterLab "
                                      "Dask extension)")
    expires_at: int = Field(description="epoch seconds after which the link is refused")


class TenantOut(BaseModel):
    name: str
    quota: dict[str, Any]
    usage: dict[str, Any]
    defaults: dict[str, Any]


class ErrorOut(BaseModel):
    detail: str
    errors: list[dict[str, Any]] | None = None


class Health(BaseModel):
    """Liveness only: no count or name of tenants or clusters (it needs no token)."""

    status: str
    backend: str


class ProjectUsage(BaseModel):
    project: str
    core_seconds: float
    memory_gib_seconds: float


class UsageOut(BaseModel):
    """Quota held over a period (what clusters reserved, schedulers included)."""

    tenant: str
    since: float
    until: float
    core_seconds: float
    memory_gib_seconds: float
    projects: list[ProjectUsage]
