"""Cluster records in their table: rows become records and back in one place (credentials
sealed with the service's key there), reads, and plain field updates with their status
transitions checked."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import fields
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from provisioner.models import LIVE, ClusterRecord, Status, StopReason, Wanted
from provisioner.secrets import WrongKey
from provisioner.store.accounting import UsageBooks
from provisioner.store.database import NotFound
from provisioner.store.schema import clusters_table


class ClusterRows(UsageBooks):
    """Cluster records: reads and updates."""

    def _row_to_record(self, row: sa.Row[Any]) -> ClusterRecord:
        data = dict(row._mapping)
        data["status"] = Status(data["status"])
        data["wanted"] = Wanted(data["wanted"])
        data["stop_reason"] = StopReason(data["stop_reason"]) if data["stop_reason"] else None
        data["credentials"] = self._open_credentials(data["credentials"])
        return ClusterRecord(**data)

    def _record_to_row(self, record: ClusterRecord,
                       columns: Collection[str] | None = None) -> dict[str, Any]:
        """The row for ``record``; with ``columns``, only those (nothing else is sealed)."""
        row = {f.name: getattr(record, f.name) for f in fields(record)
               if columns is None or f.name in columns}
        if "status" in row:
            row["status"] = record.status.value
        if "wanted" in row:
            row["wanted"] = Wanted(record.wanted).value
        if row.get("stop_reason"):
            row["stop_reason"] = StopReason(row["stop_reason"]).value
        if "credentials" in row:
            row["credentials"] = self._seal_credentials(record.credentials)
        return row

    def _seal_credentials(self, credentials: dict[str, str]) -> str | dict[str, str]:
        """Credentials as stored: a Fernet token; none ({}, a --no-tls cluster) stay {}."""
        return self.keyring.encrypt_json(credentials) if credentials else {}

    def _open_credentials(self, stored: str | dict[str, str] | None) -> dict[str, str]:
        """A token is decrypted; a dict is a row of a release that stored them in clear
        (sealed at start by :meth:`seal_credentials`, read as is until then)."""
        if isinstance(stored, str):
            return self.keyring.decrypt_json(stored)
        return dict(stored or {})

    def seal_credentials(self) -> int:
        """Before serving: seal the credentials a previous release stored in clear, and check
        that every sealed row opens with this key, so a wrong or missing key stops start-up
        with a message naming its setting instead of failing requests later. Returns how
        many rows were sealed."""
        if not sa.inspect(self.engine).has_table(clusters_table.name):
            return 0
        c = clusters_table.c
        sealed, unreadable = 0, []
        with self._tx(write=True) as conn:
            for cluster_id, stored in conn.execute(sa.select(c.id, c.credentials)).all():
                if isinstance(stored, str):
                    try:
                        self._open_credentials(stored)
                    except WrongKey:
                        unreadable.append(cluster_id)
                elif stored:
                    conn.execute(clusters_table.update().where(c.id == cluster_id)
                                 .values(credentials=self._seal_credentials(stored)))
                    sealed += 1
            if unreadable:  # raising rolls back: nothing is sealed with a key that is wrong
                raise WrongKey(
                    f"the credentials of {len(unreadable)} cluster(s) in the state database "
                    f"(e.g. {', '.join(unreadable[:3])}) cannot be decrypted with the key from "
                    f"{self.keyring.source}; set it to the key they were sealed with")
        return sealed

    def _get(self, cluster_id: str) -> ClusterRecord:
        with self._tx() as conn:
            return self._read(conn, cluster_id)

    def _read(self, conn: Connection, cluster_id: str) -> ClusterRecord:
        """The cluster's record as this transaction sees it; NotFound if there is none."""
        row = conn.execute(
            sa.select(clusters_table).where(clusters_table.c.id == cluster_id)
        ).first()
        if row is None:
            raise NotFound(cluster_id)
        return self._row_to_record(row)

    async def get(self, cluster_id: str) -> ClusterRecord:
        return await self._call(self._get, cluster_id)

    def _list(
        self, tenant: str | None, statuses: list[Status] | None, project: str | None,
        limit: int | None, after: str | None = None,
    ) -> list[ClusterRecord]:
        c = clusters_table.c
        query = sa.select(clusters_table).order_by(c.created_at.desc(), c.id.desc())
        mark = sa.select(c.created_at).where(c.id == after)  # where the page starts
        if tenant is not None:
            query = query.where(c.tenant == tenant)
            mark = mark.where(c.tenant == tenant)
        if statuses:
            query = query.where(c.status.in_([s.value for s in statuses]))
        if project is not None:
            query = query.where(c.project == project)
        if limit is not None:
            query = query.limit(limit)
        with self._tx() as conn:
            if after is not None:
                start = conn.execute(mark).scalar()
                if start is None:
                    raise NotFound(after)
                query = query.where(sa.or_(c.created_at < start,
                                           sa.and_(c.created_at == start, c.id < after)))
            return [self._row_to_record(r) for r in conn.execute(query)]

    async def clusters(
        self, tenant: str | None = None, statuses: list[Status] | None = None,
        project: str | None = None, limit: int | None = None, after: str | None = None,
    ) -> list[ClusterRecord]:
        """Newest first; ``after`` (a cluster id) starts just past that cluster, for paging."""
        return await self._call(self._list, tenant, statuses, project, limit, after)

    def live_backend_states(self) -> list[tuple[str, dict[str, Any]]]:
        """Blocking, for start-up checks before serving: each live cluster's id and saved
        backend state (nothing else is read: no credentials are opened)."""
        if not sa.inspect(self.engine).has_table(clusters_table.name):
            return []
        c = clusters_table.c
        with self._tx() as conn:
            rows = conn.execute(sa.select(c.id, c.backend_state)
                                .where(c.status.in_([s.value for s in LIVE])).order_by(c.id))
            return [(cid, state if isinstance(state, dict) else {}) for cid, state in rows]

    async def list_live(self) -> list[ClusterRecord]:
        return await self.clusters(statuses=list(LIVE))

    def _update(self, cluster_id: str, changes: dict[str, Any]) -> ClusterRecord:
        with self._tx(write=True) as conn:
            before = self._read(conn, cluster_id)
            updated = before.evolve(**changes)
            values = self._record_to_row(updated, {*changes, "stopped_at"})
            conn.execute(
                clusters_table.update().where(clusters_table.c.id == cluster_id).values(**values)
            )
            if updated.cores != before.cores or updated.memory != before.memory:
                self._account(conn, updated)
        return updated

    async def update(self, cluster_id: str, **changes: Any) -> ClusterRecord:
        """Apply field changes (status transitions checked) and return the new record."""
        return await self._call(self._update, cluster_id, changes)

