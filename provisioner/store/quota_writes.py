"""Writes that change what a tenant holds, each in one transaction under the tenant's lock
(``BEGIN IMMEDIATE`` on SQLite, ``SELECT ... FOR UPDATE`` of the tenant's row on PostgreSQL):
admitting a cluster and resizing one. The rules themselves are :mod:`provisioner.quota`'s;
this only checks the fit against what the database holds at that moment."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from provisioner.models import LIVE, ClusterRecord, Status
from provisioner.quota import (
    OverQuota,
    Pool,
    Usage,
    check_fits,
    check_pool,
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

    def _usage_of(self, conn: Connection, tenant: str | None) -> Usage:
        """What the tenant's live clusters hold (every tenant's: None), summed by the
        database (one row, any size). Queued clusters hold nothing."""
        c = clusters_table.c
        query = sa.select(
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(c.scheduler_cores + c.workers_requested * c.worker_cores), 0.0),
            sa.func.coalesce(sa.func.sum(c.scheduler_memory + c.workers_requested * c.worker_memory), 0),
            sa.func.coalesce(sa.func.sum(c.workers_requested), 0),
        ).where(c.status.in_([s.value for s in LIVE]))
        if tenant is not None:
            query = query.where(c.tenant == tenant)
        clusters, cores, memory, workers = conn.execute(query).one()
        return Usage(clusters=int(clusters), cores=round(float(cores), 6), memory=int(memory),
                     workers=int(workers))

    async def usage(self, tenant: str) -> Usage:
        def run() -> Usage:
            with self._tx() as conn:
                return self._usage_of(conn, tenant)

        return await self._call(run)

    def _check_room(self, conn: Connection, record: ClusterRecord, quota: Quota,
                     pool: Pool) -> None:
        """OverQuota unless the whole cluster fits its tenant's quota and the pool now."""
        check_fits(quota, self._usage_of(conn, record.tenant), cores=record.cores,
                   memory=record.memory, clusters=1, explain=cluster_costs(record))
        if pool.limited:
            check_pool(pool, self._usage_of(conn, None), cores=record.cores,
                       memory=record.memory)

    @staticmethod
    def _check_ever_fits(record: ClusterRecord, quota: Quota, pool: Pool) -> None:
        """OverQuota for a cluster bigger than its tenant's whole quota or the whole pool:
        no wait would ever make it fit (it is refused, never queued)."""
        check_fits(quota, Usage(), cores=record.cores, memory=record.memory, clusters=1,
                   explain=cluster_costs(record))
        if pool.limited:
            check_pool(pool, Usage(), cores=record.cores, memory=record.memory)

    def _queued(self, conn: Connection, tenant: str) -> int:
        c = clusters_table.c
        return int(conn.execute(sa.select(sa.func.count()).where(
            c.tenant == tenant, c.status == Status.QUEUED.value)).scalar() or 0)

    def _admit(self, record: ClusterRecord, quota: Quota, pool: Pool,
               queue: bool) -> tuple[ClusterRecord, str | None]:
        with self._tx(lock_tenant=record.tenant, lock_pool=pool.limited) as conn:
            check_workers_per_cluster(quota, record.workers_requested)  # no wait makes it fit
            self._check_ever_fits(record, quota, pool)
            # One that would wait goes behind its tenant's queued clusters; one that would
            # rather not wait is admitted if it fits now, else refused.
            waiting = self._queued(conn, record.tenant) if queue else 0
            reason = "behind this tenant's clusters queued before it" if waiting else None
            if reason is None:
                try:
                    self._check_room(conn, record, quota, pool)
                except OverQuota as exc:
                    if not queue:
                        raise
                    reason = str(exc)
            if reason is not None:
                if waiting >= quota.clusters:
                    raise OverQuota(f"queue full: {waiting} clusters of this tenant are queued "
                                    f"already, as many as its quota of {quota.clusters} runs")
                record = replace(record, status=Status.QUEUED)  # new: no transition yet
            conn.execute(clusters_table.insert().values(**self._record_to_row(record)))
            if reason is None:
                self._account(conn, record)
        return record, reason

    async def admit(self, record: ClusterRecord, quota: Quota, pool: Pool = Pool(),
                    queue: bool = False) -> tuple[ClusterRecord, str | None]:
        """Insert a new cluster if it fits the tenant's quota and the pool, atomically, and
        then with no reason. Else, with ``queue``, insert it queued, with the reason it
        waits; without, OverQuota."""
        return await self._call(self._admit, record, quota, pool, queue)

    def _promote(self, cluster_id: str, quota: Quota, pool: Pool,
                 ) -> tuple[ClusterRecord | None, str | None]:
        with self.engine.connect() as probe:
            tenant = probe.execute(sa.select(clusters_table.c.tenant)
                                   .where(clusters_table.c.id == cluster_id)).scalar()
        if tenant is None:
            return None, None
        with self._tx(lock_tenant=tenant, lock_pool=pool.limited) as conn:
            record = self._read(conn, cluster_id)
            if record.status != Status.QUEUED:
                return None, None
            try:
                self._check_room(conn, record, quota, pool)
            except OverQuota as exc:
                return None, str(exc)
            record = record.evolve(status=Status.PENDING)
            conn.execute(clusters_table.update().where(clusters_table.c.id == cluster_id)
                         .values(status=Status.PENDING.value))
            self._account(conn, record)
        return record, None

    async def promote(self, cluster_id: str, quota: Quota, pool: Pool,
                      ) -> tuple[ClusterRecord | None, str | None]:
        """Admit a queued cluster if it fits now: (the pending record, None); else (None,
        why it still waits); (None, None) when it is no longer queued."""
        return await self._call(self._promote, cluster_id, quota, pool)

    def _resize(
        self, cluster_id: str, quota: Quota, workers: int, best_effort: bool,
        changes: dict[str, Any], pool: Pool = Pool(),
    ) -> ClusterRecord:
        with self.engine.connect() as probe:
            tenant = probe.execute(
                sa.select(clusters_table.c.tenant).where(clusters_table.c.id == cluster_id)
            ).scalar()
        if tenant is None:
            raise NotFound(cluster_id)
        with self._tx(lock_tenant=tenant, lock_pool=pool.limited) as conn:
            record = self._read(conn, cluster_id)
            if record.status.terminal or record.stop_wanted:
                return record
            # A queued cluster holds nothing yet: only its own limit applies until admitted.
            queued = record.status == Status.QUEUED
            usage = self._usage_of(conn, tenant)  # this cluster is live: it is counted
            if queued:
                check_workers_per_cluster(quota, workers)
                self._check_ever_fits(record.evolve(workers_requested=workers), quota, pool)
            elif best_effort:
                workers = workers_that_fit(quota, usage, record, workers)
                if pool.limited:
                    workers = workers_that_fit(pool.as_quota(), self._usage_of(conn, None),
                                               record, workers)
            elif workers > record.workers_requested:
                check_workers_per_cluster(quota, workers)
                extra = workers - record.workers_requested
                check_fits(quota, usage, cores=extra * record.worker_cores,
                           memory=extra * record.worker_memory)
                if pool.limited:
                    check_pool(pool, self._usage_of(conn, None), cores=extra * record.worker_cores,
                               memory=extra * record.worker_memory)
            else:
                check_workers_per_cluster(quota, workers)
            updated = record.evolve(workers_requested=workers, **changes)
            conn.execute(
                clusters_table.update()
                .where(clusters_table.c.id == cluster_id)
                .values(workers_requested=workers, **changes)
            )
            if not queued and (updated.cores != record.cores or updated.memory != record.memory):
                self._account(conn, updated)
        return updated

    async def resize(
        self, cluster_id: str, quota: Quota, workers: int, *, best_effort: bool = False,
        pool: Pool = Pool(), **changes: Any,
    ) -> ClusterRecord:
        """Set the worker count under the tenant's lock.

        Strict (scale): OverQuota if the growth does not fit. Best effort (adaptive):
        grow only as far as the free quota allows.
        """
        return await self._call(self._resize, cluster_id, quota, workers, best_effort, changes,
                                pool)

