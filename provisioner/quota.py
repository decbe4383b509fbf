"""Quota arithmetic: what a tenant holds, and whether a change fits.

Pure functions; the store calls them inside the transaction that holds the tenant's lock,
which is what makes admission atomic.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from provisioner.models import ClusterRecord, Status
from provisioner.sizes import format_bytes
from provisioner.tenants import Quota


class OverQuota(Exception):
    """A create or scale does not fit; the message names the limit and the numbers."""


@dataclass(frozen=True, slots=True)
class Usage:
    clusters: int = 0
    cores: float = 0.0
    memory: int = 0
    workers: int = 0

    @classmethod
    def of(cls, records: Iterable[ClusterRecord]) -> Usage:
        """What these records hold: live ones, not those still queued."""
        live = [r for r in records if not r.status.terminal and r.status != Status.QUEUED]
        return cls(
            clusters=len(live),
            cores=round(sum(r.cores for r in live), 6),
            memory=sum(r.memory for r in live),
            workers=sum(r.workers_requested for r in live),
        )


def _num(value: float) -> str:
    return f"{value:g}"


def check_fits(quota: Quota, usage: Usage, *, cores: float, memory: int, clusters: int = 0,
               explain: dict[str, str] | None = None) -> None:
    """Raise OverQuota unless ``usage`` plus the extra amounts stays within ``quota``;
    ``explain`` adds, per resource, what the amount is made of."""
    explain = explain or {}
    if clusters and usage.clusters + clusters > quota.clusters:
        raise OverQuota(
            f"quota exceeded: clusters {clusters} requested, "
            f"{max(quota.clusters - usage.clusters, 0)} of {quota.clusters} free"
        )
    if cores > 0 and usage.cores + cores > quota.cores + 1e-9:
        free = max(quota.cores - usage.cores, 0)
        raise OverQuota(
            f"quota exceeded: cores {_num(cores)} requested, "
            f"{_num(round(free, 6))} of {_num(quota.cores)} free{explain.get('cores', '')}"
        )
    if memory > 0 and usage.memory + memory > quota.memory:
        free = max(quota.memory - usage.memory, 0)
        raise OverQuota(
            f"quota exceeded: memory {format_bytes(memory)} requested, "
            f"{format_bytes(free)} of {format_bytes(quota.memory)} free{explain.get('memory', '')}"
        )


@dataclass(frozen=True, slots=True)
class Pool:
    """The capacity every tenant's clusters share (``--capacity-cores``/``-memory``)."""

    cores: float | None = None
    memory: int | None = None

    @property
    def limited(self) -> bool:
        return self.cores is not None or self.memory is not None

    def as_quota(self) -> Quota:
        """The pool as one tenant's quota would be (for the same arithmetic)."""
        return Quota(cores=self.cores or 1e18, memory=self.memory or 2**62, clusters=2**31)


def check_pool(pool: Pool, used: Usage, *, cores: float, memory: int) -> None:
    """Raise OverQuota unless ``cores`` and ``memory`` more fit the pool beside ``used``."""
    if pool.cores is not None and cores > 0 and used.cores + cores > pool.cores + 1e-9:
        free = max(pool.cores - used.cores, 0)
        raise OverQuota(f"pool full: cores {_num(cores)} requested, {_num(round(free, 6))} "
                        f"of {_num(pool.cores)} free in the pool")
    if pool.memory is not None and memory > 0 and used.memory + memory > pool.memory:
        free = max(pool.memory - used.memory, 0)
        raise OverQuota(f"pool full: memory {format_bytes(memory)} requested, "
                        f"{format_bytes(free)} of {format_bytes(pool.memory)} free in the pool")


def cluster_costs(record: ClusterRecord) -> dict[str, str]:
    """What a new cluster's cores and memory are made of, for a refusal people understand:
    the scheduler counts too."""
    n = record.workers_requested
    workers = f"{n} worker{'' if n == 1 else 's'}"
    return {
        "cores": f" ({workers} of {_num(record.worker_cores)} and the scheduler's "
                 f"{_num(record.scheduler_cores)})",
        "memory": f" ({workers} of {format_bytes(record.worker_memory)} and the scheduler's "
                  f"{format_bytes(record.scheduler_memory)})",
    }


def check_workers_per_cluster(quota: Quota, workers: int) -> None:
    limit = quota.workers_per_cluster
    if limit is not None and workers > limit:
        raise OverQuota(
            f"quota exceeded: workers_per_cluster {workers} requested, limit is {limit}"
        )


def workers_that_fit(quota: Quota, usage: Usage, record: ClusterRecord, wanted: int) -> int:
    """How many workers of ``record``'s shape, up to ``wanted``, fit the free quota now."""
    if quota.workers_per_cluster is not None:
        wanted = min(wanted, quota.workers_per_cluster)
    extra = wanted - record.workers_requested
    if extra <= 0:
        return wanted
    free_cores = quota.cores - usage.cores
    free_memory = quota.memory - usage.memory
    by_cores = int((free_cores + 1e-9) // record.worker_cores) if record.worker_cores else extra
    by_memory = int(free_memory // record.worker_memory) if record.worker_memory else extra
    return record.workers_requested + max(0, min(extra, by_cores, by_memory))
