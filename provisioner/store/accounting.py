"""Usage accounting: one row per stretch of time a cluster held a fixed amount of its tenant's
quota, written in the same transaction as the change that starts or ends the stretch, so the
books always agree with the records; sums over a period per project."""

from __future__ import annotations

import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from provisioner.models import ClusterRecord
from provisioner.store.database import Database
from provisioner.store.schema import usage_table


@dataclass(frozen=True, slots=True)
class Accounting:
    """Quota held over a period: core-seconds and memory GiB-seconds, per project."""

    since: float
    until: float
    projects: dict[str, tuple[float, float]]

    @property
    def core_seconds(self) -> float:
        return sum(c for c, _ in self.projects.values())

    @property
    def memory_gib_seconds(self) -> float:
        return sum(m for _, m in self.projects.values())


class UsageBooks(Database):
    """Writes the stretches (inside other writes' transactions) and sums them."""

    def _account(self, conn: Connection, record: ClusterRecord) -> None:
        """Close the cluster's open stretch and open one at its new size (none once ended)."""
        now = time.time()
        conn.execute(
            usage_table.update()
            .where(usage_table.c.cluster_id == record.id, usage_table.c.end.is_(None))
            .values(end=now)
        )
        if record.cores or record.memory:
            conn.execute(usage_table.insert().values(
                cluster_id=record.id, tenant=record.tenant, project=record.project,
                cores=record.cores, memory=record.memory, start=now, end=None,
            ))

    def _accounting(self, tenant: str, since: float, until: float) -> Accounting:
        end = sa.func.coalesce(usage_table.c.end, until)
        overlap = sa.func.max(0.0, sa.func.min(end, until) - sa.func.max(usage_table.c.start, since)) \
            if self._sqlite else sa.func.greatest(
                0.0, sa.func.least(end, until) - sa.func.greatest(usage_table.c.start, since))
        query = (
            sa.select(
                usage_table.c.project,
                sa.func.sum(usage_table.c.cores * overlap),
                sa.func.sum(usage_table.c.memory * overlap),
            )
            .where(usage_table.c.tenant == tenant, usage_table.c.start < until,
                   sa.or_(usage_table.c.end.is_(None), usage_table.c.end > since))
            .group_by(usage_table.c.project)
        )
        with self._tx() as conn:
            rows = conn.execute(query).all()
        return Accounting(since, until, {
            project: (float(cores or 0), float(memory or 0) / 2**30)
            for project, cores, memory in rows
        })

    async def accounting(self, tenant: str, since: float, until: float | None = None) -> Accounting:
        """Core-seconds and memory GiB-seconds the tenant's clusters held in [since, until]."""
        return await self._call(self._accounting, tenant, since, until or time.time())

