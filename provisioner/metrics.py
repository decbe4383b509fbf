"""Prometheus metrics: live gauges read at scrape time, counters fed by record changes.

Gauges come straight from the live records and the tenants' quotas when scraped, so they are
never stale; counters and the start-latency histogram listen to every record write, so each
start and each stop is counted exactly once, whatever path caused it.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from provisioner.models import LIVE, ClusterRecord, Status
from provisioner.records import Records
from provisioner.tenants import TenantDirectory

START_BUCKETS = (0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 120)


class _Live(Collector):
    def __init__(self, records: Records, tenants: TenantDirectory) -> None:
        self.records = records
        self.tenants = tenants
        #: How many clusters wait in the queue (set by the service to its queue's count).
        self.queue_length: Callable[[], int] = lambda: 0

    def collect(self) -> Iterator[GaugeMetricFamily]:
        clusters = GaugeMetricFamily("provisioner_clusters", "Live clusters by tenant and status",
                                     labels=["tenant", "status"])
        workers = GaugeMetricFamily("provisioner_workers", "Workers by tenant (requested/running)",
                                    labels=["tenant", "state"])
        cores = GaugeMetricFamily("provisioner_cores", "Cores held and quota by tenant",
                                  labels=["tenant", "kind"])
        memory = GaugeMetricFamily("provisioner_memory_bytes", "Memory held and quota by tenant",
                                   labels=["tenant", "kind"])
        borrowed = GaugeMetricFamily("provisioner_borrowed_cores",
                                     "Cores a tenant holds above its guaranteed part",
                                     labels=["tenant"])
        queued = GaugeMetricFamily("provisioner_queue_length", "Clusters waiting in the queue")
        queued.add_metric([], self.queue_length())
        live = self.records.live()
        by_status = Tally((r.tenant, r.status.value) for r in live)
        by_tenant: dict[str, list[ClusterRecord]] = {}
        for r in live:
            if r.status != Status.QUEUED:  # a queued cluster holds nothing
                by_tenant.setdefault(r.tenant, []).append(r)
        for tenant in self.tenants:
            mine = by_tenant.get(tenant.name, [])
            for status in (Status.QUEUED, *LIVE):
                clusters.add_metric([tenant.name, status.value], by_status[(tenant.name, status.value)])
            guaranteed = tenant.quota.guaranteed
            if guaranteed is not None:
                borrowed.add_metric([tenant.name],
                                    max(0.0, sum(r.cores for r in mine) - guaranteed.cores))
            workers.add_metric([tenant.name, "requested"], sum(r.workers_requested for r in mine))
            workers.add_metric([tenant.name, "running"], sum(r.workers_running for r in mine))
            cores.add_metric([tenant.name, "used"], sum(r.cores for r in mine))
            cores.add_metric([tenant.name, "quota"], tenant.quota.cores)
            memory.add_metric([tenant.name, "used"], sum(r.memory for r in mine))
            memory.add_metric([tenant.name, "quota"], tenant.quota.memory)
        yield from (clusters, workers, cores, memory, borrowed, queued)


class Metrics:
    """The service's registry; ``observe`` is a Records listener."""

    def __init__(self, records: Records, tenants: TenantDirectory) -> None:
        self.registry = CollectorRegistry()
        self.start_latency = Histogram(
            "provisioner_cluster_start_seconds", "From create request to scheduler running",
            ["tenant"], buckets=START_BUCKETS, registry=self.registry,
        )
        self.stops = Counter(
            "provisioner_cluster_stops", "Clusters ended, by reason (user, idle, no-client, failed)",
            ["tenant", "reason"], registry=self.registry,
        )
        self.reaps = Counter(
            "provisioner_reaps", "Clusters reaped, by reason", ["tenant", "reason"],
            registry=self.registry,
        )
        self.backend_errors = Counter(
            "provisioner_backend_errors", "Backend failures (scheduler or worker start, loss)",
            ["kind"], registry=self.registry,
        )
        self.queue_wait = Histogram(
            "provisioner_queue_wait_seconds", "From create request to admission, queued clusters",
            ["tenant"], buckets=(*START_BUCKETS, 300, 900, 3600), registry=self.registry,
        )
        self.preemptions = Counter(
            "provisioner_preempted_workers", "Borrowed workers taken back, by the tenant that "
            "lost them and the tenant they went to", ["tenant", "for_tenant"],
            registry=self.registry,
        )
        self.live = _Live(records, tenants)
        self.registry.register(self.live)
        records.listeners.append(self.observe)

    def observe(self, before: ClusterRecord | None, after: ClusterRecord) -> None:
        was = before.status if before else None
        if after.status == Status.RUNNING and was != Status.RUNNING and after.started_at:
            self.start_latency.labels(after.tenant).observe(after.started_at - after.created_at)
        if after.status.terminal and was is not None and not was.terminal:
            reason = after.stop_reason.value if after.stop_reason else "unknown"
            self.stops.labels(after.tenant, reason).inc()
            if reason in ("idle", "no-client"):
                self.reaps.labels(after.tenant, reason).inc()
            if reason == "failed":
                self.backend_errors.labels("cluster-failed").inc()
