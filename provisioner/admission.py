"""Admission: what a create, scale or adapt asks for, after the tenant's defaults and limits.

One pure function of the tenant and the request, used by every call that sets a cluster's
size, so the same request always means the same thing: a fixed worker count above the
tenant's ``workers_per_cluster`` is refused (403), an adaptive maximum above it is clamped to
it (a maximum is "up to"), a minimum above it is refused. Whether the result fits the tenant's
free quota is the store's question, asked under the tenant's lock.
"""

from __future__ import annotations

from dataclasses import dataclass

from provisioner.models import ClusterRecord
from provisioner.quota import check_workers_per_cluster
from provisioner.tenants import Tenant


class InvalidRequest(ValueError):
    """A request the tenant may not make; ``field`` names what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class Size:
    """A cluster's worker count now, and its adaptive bounds (None: a fixed count)."""

    workers: int
    adaptive_minimum: int | None = None
    adaptive_maximum: int | None = None


def fixed_size(tenant: Tenant, workers: int | None) -> Size:
    """A fixed worker count (default 1)."""
    count = 1 if workers is None else workers
    _workers(tenant, "workers", count)
    return Size(count)


def adaptive_size(tenant: Tenant, minimum: int | None, maximum: int,
                  current: int | None = None, field: str = "minimum") -> Size:
    """Adaptive bounds, the maximum clamped to the tenant's per-cluster limit; the count
    starts at ``current`` (a running cluster's) kept within the bounds, else the minimum."""
    lo = minimum or 0
    if lo > maximum:
        raise InvalidRequest(field, f"{lo} is more than maximum {maximum}")
    _workers(tenant, field, lo)
    limit = tenant.quota.workers_per_cluster
    hi = maximum if limit is None else min(maximum, limit)
    start = lo if current is None else min(max(current, lo), hi)
    return Size(start, lo, hi)


def largest(tenant: Tenant, record: ClusterRecord) -> int:
    """The most workers this cluster could ever have: the tenant's per-cluster limit, and
    what its whole quota holds beside the cluster's scheduler (an adaptive maximum when the
    tenant names none, as dask-gateway's ``adapt()``)."""
    quota = tenant.quota
    bounds = [quota.workers_per_cluster] if quota.workers_per_cluster is not None else []
    if record.worker_cores:
        bounds.append(int((quota.cores - record.scheduler_cores + 1e-9) // record.worker_cores))
    if record.worker_memory:
        bounds.append((quota.memory - record.scheduler_memory) // record.worker_memory)
    return max(0, min(bounds)) if bounds else 0


def _workers(tenant: Tenant, field: str, value: int) -> None:
    if value < 0:
        raise InvalidRequest(field, "must not be negative")
    check_workers_per_cluster(tenant.quota, value)
