"""What tenants can do, in the core's terms: create, list, scale, adapt, stop, wait.

The HTTP layer is a thin translation of this; so is any other front end. Every operation is
scoped to the calling tenant: another tenant's cluster is simply not found.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from clusters.base import Backend
from clusters.logs import cluster_log
from provisioner.admission import InvalidRequest, adaptive_size, fixed_size, largest
from provisioner.events import EventRecorder
from provisioner.metrics import Metrics
from provisioner.models import (
    CLUSTER_ID_PATTERN,
    LIVE,
    ClusterRecord,
    Outcome,
    Status,
    StopReason,
    Wanted,
    new_cluster_id,
)
from provisioner.queue import AdmissionQueue
from provisioner.quota import OverQuota, Pool, Usage
from provisioner.reconciler import Reconciler
from provisioner.records import Records
from provisioner.settings import Settings
from provisioner.store import Event, NotFound, Store
from provisioner.tenants import Tenant, TenantDirectory
from provisioner.tls import cluster_credentials

logger = logging.getLogger("provisioner.service")

__all__ = [
    "ClusterRequest",
    "ClusterService",
    "Conflict",
    "InvalidRequest",
    "NotFound",
    "OverQuota",
]


class Conflict(InvalidRequest):
    """The cluster is in a state that does not allow this (e.g. scaling a stopped cluster)."""


@dataclass(frozen=True, slots=True)
class ClusterRequest:
    """A create request after parsing; None means "use the tenant's default"."""

    project: str = "default"
    workers: int | None = None
    worker_cores: float | None = None
    worker_memory: int | None = None
    adaptive_minimum: int | None = None
    adaptive_maximum: int | None = None
    idle_timeout: float | None = None
    no_client_timeout: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    image: str | None = None
    environment: str | None = None
    #: Wait in the queue when it does not fit now (None: the tenant's setting).
    queue: bool | None = None


def _bounded(name: str, value: float | None, default: float, limit: float) -> float:
    if value is None:
        return min(default, limit)
    if value <= 0:
        raise InvalidRequest(name, "must be greater than 0")
    if value > limit:
        raise InvalidRequest(name, f"{value:g}s is more than this tenant allows ({limit:g}s)")
    return value


class ClusterService:
    """The service core: tenants, records, reconciler and backend wired together."""

    def __init__(self, settings: Settings, tenants: TenantDirectory, store: Store,
                 backend: Backend) -> None:
        self.settings = settings
        self.tenants = tenants
        self.store = store
        self.records = Records(store)
        self.backend = backend
        self.reconciler = Reconciler(self.records, backend, tenants, settings)
        self.pool = Pool(settings.capacity_cores, settings.capacity_memory)
        self.reconciler.pool = self.pool
        self.recorder = EventRecorder(self.records, store)
        self.queue = AdmissionQueue(self.records, tenants, self.pool, self._admitted,
                                    settings.preemption_delay, self._preempted)
        self.reconciler.on_worker_lost = lambda cluster_id, name, reason: self.recorder.add(
            cluster_id, "worker-lost", f"{name}: {reason}")
        self.metrics = Metrics(self.records, tenants)
        self.metrics.live.queue_length = lambda: len(self.queue.positions)
        self.reconciler.on_backend_error = self.metrics.backend_errors.labels
        self._stopped = False

    def _admitted(self, record: ClusterRecord) -> None:
        """The queue admitted a cluster: it starts."""
        self.recorder.add(record.id, "admitted")
        self.metrics.queue_wait.labels(record.tenant).observe(time.time() - record.created_at)
        self.reconciler.ensure(record)

    def _preempted(self, record: ClusterRecord, workers: int, for_tenant: str) -> None:
        self.recorder.add(record.id, "preempted",
                          f"{workers} worker(s) taken back for tenant {for_tenant}")
        self.metrics.preemptions.labels(record.tenant, for_tenant).inc(workers)

    async def start(self) -> None:
        await self.store.open([t.name for t in self.tenants])
        await self.backend.open(self.reconciler)
        await self.reconciler.recover()
        self.queue.start()

    async def stop(self, keep_clusters: bool | None = None) -> None:
        """Stop serving: every live cluster is stopped, or with ``keep_clusters`` left running
        for the next start to adopt; says which, so whoever stopped it knows."""
        if self._stopped:
            return
        self._stopped = True
        keep = self.settings.keep_clusters if keep_clusters is None else keep_clusters
        await self.queue.stop()
        live = sorted(r.id for r in self.records.live() if r.status != Status.QUEUED)
        await self.reconciler.shutdown(stop_clusters=not keep)
        if not live:
            logger.info("shutdown: no live clusters")
        elif keep:
            logger.warning("shutdown: left %d cluster(s) running for the next start to adopt: %s",
                           len(live), " ".join(live))
        else:
            ended = await asyncio.gather(*(self.store.get(c) for c in live))
            done = [r.id for r in ended if r.status.terminal]
            logger.warning("shutdown: stopped %d cluster(s): %s", len(done), " ".join(done))
            if len(done) < len(live):
                logger.warning("shutdown: could not confirm the end of: %s",
                               " ".join(sorted(set(live) - set(done))))
        await self.recorder.flush()
        await self.store.close()

    # -- queries ---------------------------------------------------------------------------

    def waiting(self, record: ClusterRecord) -> str | None:
        """Why some of a live cluster's processes wait to run, as its backend says."""
        if record.status.terminal or record.status == Status.QUEUED:
            return None
        return self.backend.waiting(record.id)

    async def get(self, tenant: Tenant, cluster_id: str) -> ClusterRecord:
        if not re.fullmatch(CLUSTER_ID_PATTERN, cluster_id):
            raise NotFound(cluster_id)
        try:
            record = await self.records.get(cluster_id)
        except NotFound:
            raise NotFound(cluster_id) from None
        if record.tenant != tenant.name:
            raise NotFound(cluster_id)
        return record

    async def page(
        self, tenant: Tenant, status: Status | None = None, project: str | None = None,
        limit: int | None = None, after: str | None = None, live: bool = False,
    ) -> tuple[list[ClusterRecord], str | None]:
        """One page of the tenant's clusters, newest first (``live``: only those not ended),
        and the id to pass as ``after`` for the next page (None on the last)."""
        statuses = [status] if status else [Status.QUEUED, *LIVE] if live else None
        try:
            records = await self.store.clusters(tenant.name, statuses, project,
                                                None if limit is None else limit + 1, after)
        except NotFound:
            raise InvalidRequest("after", f"no cluster {after} of this tenant") from None
        if limit is not None and len(records) > limit:
            return records[:limit], records[limit - 1].id
        return records, None

    async def wait(self, tenant: Tenant, cluster_id: str, timeout: float) -> ClusterRecord:
        """Long-poll: return once the cluster is running (or terminal), or after ``timeout``."""
        await self.get(tenant, cluster_id)
        return await self.records.wait_for(
            cluster_id, lambda r: r.status == Status.RUNNING, timeout
        )

    async def events(self, tenant: Tenant, cluster_id: str) -> list[Event]:
        """What happened to one of the tenant's clusters, oldest first."""
        await self.get(tenant, cluster_id)  # another tenant's: NotFound
        await self.recorder.flush()
        return await self.store.events(cluster_id)

    async def usage(self, tenant: Tenant) -> Usage:
        return await self.records.usage(tenant.name)

    # -- changes ---------------------------------------------------------------------------

    async def create(self, tenant: Tenant, request: ClusterRequest) -> ClusterRecord:
        d = tenant.defaults
        if request.environment is not None and \
                self.tenants.environment(tenant.name, request.environment) is None:
            names = sorted(e.name for e in self.tenants.environments_of(tenant.name))
            raise InvalidRequest("environment", f"no environment {request.environment!r} for this "
                                 f"tenant; there are: {', '.join(names) or 'none'}")
        if request.adaptive_maximum is not None:
            size = adaptive_size(tenant, request.adaptive_minimum, request.adaptive_maximum,
                                 field="adaptive.minimum")
        else:
            size = fixed_size(tenant, request.workers)
        cluster_id = new_cluster_id()
        credentials = (await asyncio.to_thread(cluster_credentials, cluster_id)
                       if self.settings.tls else {})
        record = ClusterRecord(
            id=cluster_id,
            tenant=tenant.name,
            project=request.project,
            status=Status.PENDING,
            worker_cores=request.worker_cores or d.worker_cores,
            worker_memory=request.worker_memory or d.worker_memory,
            scheduler_cores=d.scheduler_cores,
            scheduler_memory=d.scheduler_memory,
            workers_requested=size.workers,
            idle_timeout=_bounded("idle_timeout", request.idle_timeout, d.idle_timeout,
                                  d.max_idle_timeout),
            no_client_timeout=_bounded("no_client_timeout", request.no_client_timeout,
                                       d.no_client_timeout, d.max_no_client_timeout),
            adaptive_minimum=size.adaptive_minimum,
            adaptive_maximum=size.adaptive_maximum,
            env=dict(request.env),
            image=request.image,
            environment=request.environment,
            credentials=credentials,
        )
        queue = tenant.queue if request.queue is None else request.queue
        record, reason = await self.records.admit(record, tenant.quota, self.pool, queue)
        log = cluster_log(logger, tenant.name, record.id)
        if reason is not None:
            log.info("queued project=%s workers=%d reason=%r", record.project, size.workers,
                     reason)
            self.recorder.add(record.id, "queued", reason)
            self.queue.note(record, reason)
            return record
        log.info("created project=%s workers=%d adaptive=%s", record.project, size.workers,
                 record.adaptive)
        self.recorder.add(record.id, "created", f"{size.workers} worker(s)")
        self.reconciler.ensure(record)
        return record

    async def _live(self, tenant: Tenant, cluster_id: str) -> ClusterRecord:
        record = await self.get(tenant, cluster_id)
        if record.status.terminal or record.stop_wanted:
            raise Conflict("status", f"cluster {cluster_id} is {record.status}")
        return record

    async def scale(self, tenant: Tenant, cluster_id: str, workers: int) -> ClusterRecord:
        await self._live(tenant, cluster_id)
        size = fixed_size(tenant, workers)
        record = await self.records.resize(
            cluster_id, tenant.quota, size.workers, pool=self.pool, adaptive_minimum=None,
            adaptive_maximum=None)
        self.reconciler.ensure(record)
        return record

    async def adapt(self, tenant: Tenant, cluster_id: str, minimum: int,
                    maximum: int | None = None) -> ClusterRecord:
        record = await self._live(tenant, cluster_id)
        if maximum is None:
            maximum = max(minimum, largest(tenant, record))
        size = adaptive_size(tenant, minimum, maximum, current=record.workers_requested)
        record = await self.records.resize(
            cluster_id, tenant.quota, size.workers, pool=self.pool,
            adaptive_minimum=size.adaptive_minimum, adaptive_maximum=size.adaptive_maximum)
        self.reconciler.ensure(record)
        return record

    async def delete(self, tenant: Tenant, cluster_id: str) -> ClusterRecord:
        record = await self.get(tenant, cluster_id)
        if record.status.terminal or record.stop_wanted:
            return record
        if record.status == Status.QUEUED or (
                record.status == Status.PENDING and record.id not in self.reconciler.runners):
            return await self.records.end(cluster_id, Outcome(StopReason.USER))
        record = await self.records.update(cluster_id, wanted=Wanted.STOPPED,
                                           stop_reason=StopReason.USER)
        self.reconciler.ensure(record)
        return record

    def describe_tenant(self, tenant: Tenant, usage: Usage) -> dict[str, Any]:
        return {
            "name": tenant.name,
            # No guaranteed part: nothing to say (the whole quota is then the ceiling).
            "quota": tenant.quota.model_dump(exclude={"guaranteed"}
                                             if tenant.quota.guaranteed is None else None),
            "usage": {"clusters": usage.clusters, "cores": usage.cores,
                      "memory": usage.memory, "workers": usage.workers},
            "defaults": tenant.defaults.model_dump(),
        }
