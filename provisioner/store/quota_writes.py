"""Writes that change what a tenant holds, each in one transaction under the tenant's lock
(``BEGIN IMMEDIATE`` on SQLite, ``SELECT ... FOR UPDATE`` of the tenant's row on PostgreSQL):
admitting a cluster and resizing one. The rules themselves are :mod:`provisioner.quota`'s;
this only checks the fit against what the database holds at that moment."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from provisioner.models import LIVE, ClusterRecord
from provisioner.quota import (
    Usage,
    check_fits,
    check_workers_per_cluster,
    cluster_costs,
    workers_that_fit,
)
from provisioner.store.cluster_rows import ClusterRows
from provisioner.store.database import NotFound
from provisioner.store.schema import clusters_table
from provisioner.tenants import Quota


class QuotaWrites(ClusterRows):
    """Admission and resizing under the tenant's lock, and the usage they check against."""

    def _usage_of(self, conn: Connection, tenant: str) -> Usage:
        """What the tenant's live clusters hold, summed by the database (one row, any size)."""
        c = clusters_table.c
        query = sa.select(
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(c.scheduler_cores + c.workers_requested * c.worker_cores), 0.0),
            sa.func.coalesce(sa.func.sum(c.scheduler_memory + c.workers_requested * c.worker_memory), 0),
            sa.func.coalesce(sa.func.sum(c.workers_requested), 0),
        ).where(c.tenant == tenant, c.status.in_([s.value for s in LIVE]))
        clusters, cores, memory, workers = conn.execute(query).one()
        return Usage(clusters=int(clusters), cores=round(float(cores), 6), memory=int(memory),
                     workers=int(workers))

    async def usage(self, tenant: str) -> Usage:
        def run() -> Usage:
            with self._tx() as conn:
                return self._usage_of(conn, tenant)

        return await self._call(run)

    def _admit(self, record: ClusterRecord, quota: Quota) -> ClusterRecord:
        with self._tx(lock_tenant=record.tenant) as conn:
            usage = self._usage_of(conn, record.tenant)
            check_workers_per_cluster(quota, record.workers_requested)
            check_fits(quota, usage, cores=record.cores, memory=record.memory, clusters=1,
                       explain=cluster_costs(record))
            conn.execute(clusters_table.insert().values(**self._record_to_row(record)))
            self._account(conn, record)
        return record

    async def admit(self, record: ClusterRecord, quota: Quota) -> ClusterRecord:
        """Insert a new cluster if it fits the tenant's quota, atomically; else OverQuota."""
        return await self._call(self._admit, record, quota)

    def _resize(
        self, cluster_id: str, quota: Quota, workers: int, best_effort: bool,
        changes: dict[str, Any],
    ) -> ClusterRecord:
        with self.engine.connect() as probe:
            tenant = probe.execute(
                sa.select(clusters_table.c.tenant).where(clusters_table.c.id == cluster_id)
            ).scalar()
        if tenant is None:
            raise NotFound(cluster_id)
        with self._tx(lock_tenant=tenant) as conn:
            record = self._read(conn, cluster_id)
            if record.status.terminal or record.stop_wanted:
                return record
            usage = self._usage_of(conn, tenant)  # this cluster is live: it is counted
            if best_effort:
                workers = workers_that_fit(quota, usage, record, workers)
            elif workers > record.workers_requested:
                check_workers_per_cluster(quota, workers)
                extra = workers - record.workers_requested
                check_fits(quota, usage, cores=extra * record.worker_cores,
                           memory=extra * record.worker_memory)
            else:
                check_workers_per_cluster(quota, workers)
            updated = record.evolve(workers_requested=workers, **changes)
            conn.execute(
                clusters_table.update()
                .where(clusters_table.c.id == cluster_id)
                .values(workers_requested=workers, **changes)
            )
            if updated.cores != record.cores or updated.memory != record.memory:
                self._account(conn, updated)
        return updated

    async def resize(
        self, cluster_id: str, quota: Quota, workers: int, *, best_effort: bool = False,
        **changes: Any,
    ) -> ClusterRecord:
        """Set the worker count under the tenant's lock.

        Strict (scale): OverQuota if the growth does not fit. Best effort (adaptive):
        grow only as far as the free quota allows.
        """
        return await self._call(self._resize, cluster_id, quota, workers, best_effort, changes)

