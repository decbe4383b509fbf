"""Service-wide values kept beside the records (the schema version, a backend's own state)."""

from __future__ import annotations

import sqlalchemy as sa

from provisioner.store.database import Database
from provisioner.store.schema import meta_table


class ServiceMeta(Database):
    """One text value per key."""

    def _get_meta(self, key: str) -> str | None:
        with self._tx() as conn:
            return conn.execute(
                sa.select(meta_table.c.value).where(meta_table.c.key == key)
            ).scalar()

    async def get_meta(self, key: str) -> str | None:
        return await self._call(self._get_meta, key)

    def _set_meta(self, key: str, value: str | None) -> None:
        with self._tx(write=True) as conn:
            conn.execute(meta_table.delete().where(meta_table.c.key == key))
            if value is not None:
                conn.execute(meta_table.insert().values(key=key, value=value))

    async def set_meta(self, key: str, value: str | None) -> None:
        """Set (or, with None, remove) one service-wide value."""
        await self._call(self._set_meta, key, value)

