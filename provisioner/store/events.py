"""A cluster's events: what happened and why, in the order it happened."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from provisioner.store.database import Database
from provisioner.store.schema import events_table

#: Longest detail kept (a reason the service wrote; never a tenant's text).
DETAIL_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class Event:
    cluster_id: str
    at: float
    kind: str
    detail: str | None = None


class EventLog(Database):
    def _add_events(self, events: list[Event]) -> None:
        with self._tx(write=True) as conn:
            conn.execute(events_table.insert(), [
                {"cluster_id": e.cluster_id, "at": e.at, "kind": e.kind,
                 "detail": e.detail[:DETAIL_LIMIT] if e.detail else None} for e in events])

    async def add_events(self, events: list[Event]) -> None:
        if events:
            await self._call(self._add_events, events)

    def _events(self, cluster_id: str, limit: int) -> list[Event]:
        c = events_table.c
        with self._tx() as conn:
            rows = conn.execute(sa.select(c.at, c.kind, c.detail)
                                .where(c.cluster_id == cluster_id)
                                .order_by(c.id.desc()).limit(limit)).all()
        return [Event(cluster_id, at, kind, detail) for at, kind, detail in reversed(rows)]

    async def events(self, cluster_id: str, limit: int = 500) -> list[Event]:
        """The cluster's last ``limit`` events, oldest first."""
        return await self._call(self._events, cluster_id, limit)
