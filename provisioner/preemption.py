"""Preemption: taking borrowed workers back for a tenant that asks within its guarantee.

A tenant's quota may name a guaranteed part (``quota.guaranteed``); what it holds beyond that
is borrowed from the pool. When a queued cluster would keep its tenant within its guarantee
but the pool is full, workers are taken from tenants holding more than their guarantee: the
largest borrowers first, their newest clusters first, never a scheduler, never below the
victim's guarantee. Only a request within its guarantee preempts, and only what is above a
guarantee is taken, so two tenants cannot preempt each other back and forth.

This module only plans (pure functions); :mod:`provisioner.queue` waits out the delay and
shrinks the victims, whose runners then retire the workers through Dask (their data moves,
their tasks are rescheduled) before stopping them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from provisioner.models import ClusterRecord
from provisioner.quota import Pool, Usage
from provisioner.tenants import Tenant


@dataclass(frozen=True, slots=True)
class Take:
    """Take ``workers`` workers of cluster ``cluster_id`` (of tenant ``tenant``)."""

    cluster_id: str
    tenant: str
    workers: int


def within_guarantee(tenant: Tenant, usage: Usage, record: ClusterRecord) -> bool:
    """Whether the tenant, with this cluster too, stays within its guaranteed part."""
    guaranteed = tenant.quota.guaranteed
    if guaranteed is None:
        return False
    return (usage.cores + record.cores <= guaranteed.cores + 1e-9
            and usage.memory + record.memory <= guaranteed.memory)


def plan(record: ClusterRecord, pool: Pool, pool_usage: Usage,
         running: Iterable[ClusterRecord], tenants: dict[str, Tenant]) -> list[Take] | None:
    """Workers to take so that ``record`` fits the pool, or None if borrowed workers are not
    enough (nothing is then taken)."""
    need_cores = max(0.0, pool_usage.cores + record.cores - pool.cores) \
        if pool.cores is not None else 0.0
    need_memory = float(max(0, pool_usage.memory + record.memory - pool.memory)) \
        if pool.memory is not None else 0.0
    if need_cores <= 1e-9 and need_memory <= 0:
        return []
    live = [r for r in running if r.tenant != record.tenant and r.workers_requested > 0]
    held: dict[str, Usage] = {}
    for r in live:
        held[r.tenant] = Usage.of([*(x for x in live if x.tenant == r.tenant)])
    takes: list[Take] = []
    # Largest borrowers first; within one, its newest clusters first.
    by_borrowed = sorted(held, key=lambda t: -_borrowed(tenants.get(t), held[t]))
    for name in by_borrowed:
        tenant = tenants.get(name)
        spare_cores, spare_memory = _spare(tenant, held[name])
        if spare_cores <= 1e-9 and spare_memory <= 0:
            continue  # within its guarantee: nothing of it is borrowed
        for r in sorted((x for x in live if x.tenant == name), key=lambda x: -x.created_at):
            if need_cores <= 1e-9 and need_memory <= 0:
                break
            count = _workers_to_take(r, need_cores, need_memory, spare_cores, spare_memory)
            if count:
                takes.append(Take(r.id, name, count))
                need_cores -= count * r.worker_cores
                need_memory -= count * r.worker_memory
                spare_cores -= count * r.worker_cores
                spare_memory -= count * r.worker_memory
    if need_cores > 1e-9 or need_memory > 0:
        return None
    return takes


def _spare(tenant: Tenant | None, usage: Usage) -> tuple[float, float]:
    """What may be taken from a tenant: what it holds beyond its guarantee. A resource it
    holds less of than guaranteed does not limit what goes of the other (it borrows that
    one), and one it holds none beyond while borrowing the other is no limit either."""
    if tenant is None or tenant.quota.guaranteed is None:
        return usage.cores, float(usage.memory)
    cores = usage.cores - tenant.quota.guaranteed.cores
    memory = float(usage.memory - tenant.quota.guaranteed.memory)
    if cores <= 1e-9 and memory <= 0:
        return 0.0, 0.0
    return (cores if cores > 1e-9 else math.inf), (memory if memory > 0 else math.inf)


def _borrowed(tenant: Tenant | None, usage: Usage) -> float:
    if tenant is None or tenant.quota.guaranteed is None:
        return usage.cores
    return usage.cores - tenant.quota.guaranteed.cores


def _workers_to_take(r: ClusterRecord, need_cores: float, need_memory: float,
                     spare_cores: float, spare_memory: float) -> int:
    """Fewest workers of ``r`` covering the need, within what its tenant may spare."""
    wanted = 0
    if need_cores > 1e-9 and r.worker_cores:
        wanted = max(wanted, math.ceil(need_cores / r.worker_cores - 1e-9))
    if need_memory > 0 and r.worker_memory:
        wanted = max(wanted, math.ceil(need_memory / r.worker_memory))
    spare = r.workers_requested
    if r.worker_cores and spare_cores != math.inf:
        spare = min(spare, int((spare_cores + 1e-9) // r.worker_cores))
    if r.worker_memory and spare_memory != math.inf:
        spare = min(spare, int(spare_memory // r.worker_memory))
    return max(0, min(wanted, spare))
